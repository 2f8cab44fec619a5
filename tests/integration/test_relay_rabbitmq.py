"""REL-01 against real RabbitMQ: rows are marked published only on the broker's ack."""

from __future__ import annotations

import pika
import pytest

from gateway.bus import Topology
from gateway.bus.rabbitmq import RabbitBus
from gateway.config import BusSettings, RelaySettings
from gateway.events import Event, event_id, utcnow
from gateway.relay import Relay
from gateway.store import EventStore
from tests.rabbit import delete_broker_objects

pytestmark = pytest.mark.integration


def _events(n: int) -> list[Event]:
    return [
        Event(id=event_id("s", "e", i, 1), source="/s", type="com.acme.x", time=utcnow(), data={"i": i},
              extensions={"sourcename": "s"})
        for i in range(n)
    ]


def test_unroutable_events_stay_pending_then_publish_once_routable(
    pg_store: EventStore, amqp_url: str, bus_prefix: str
) -> None:
    settings = BusSettings(url=amqp_url, prefix=bus_prefix, publish_timeout=10)
    topo = Topology.from_settings(settings)
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    bus = RabbitBus(settings, topo)
    bus.declare_topology()
    publisher = bus.publisher()
    # No queue bound for the events any more: every publish is returned (mandatory).
    ch.exchange_unbind(topo.router_exchange, topo.events_exchange, "#")
    try:
        pg_store.accept(_events(20), source_name="s")
        relay = Relay(pg_store, publisher, topo, RelaySettings(retry_base_delay=0.001, retry_max_delay=0.001),
                      publish_timeout=10)
        assert relay.run_once() == 20
        assert pg_store.stats()["pending"] == 20 and pg_store.stats()["published"] == 0
        assert relay.stats.returned == 20  # the alert counter
        ch.exchange_bind(topo.router_exchange, topo.events_exchange, "#")  # routable again
        for _ in range(50):
            relay.run_once()
            if pg_store.stats()["published"] == 20:
                break
        assert pg_store.stats()["published"] == 20 and pg_store.stats()["pending"] == 0
        assert bus.queue_depth(topo.scoring_queue) == 20
    finally:
        publisher.close()
        bus.close()
        conn.close()
        delete_broker_objects(amqp_url, topo)
