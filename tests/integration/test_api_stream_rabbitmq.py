"""``GET /v1/events/stream`` on a real RabbitMQ: relay and scorer publish to ``<prefix>.scored``; the
API process's stream hub consumes it through its own ``x-expires`` queue and serves SSE clients.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
from pydantic import SecretStr

from gateway.api.routers.stream import StreamSettings
from gateway.runtime import Gateway
from tests.rabbit import delete_broker_objects
from tests.unit.test_api_stream import Rig, event, gateway_settings, served

pytestmark = pytest.mark.integration


@pytest.fixture
def rig(tmp_path: Path, amqp_url: str, bus_prefix: str) -> Iterator[Rig]:
    settings = gateway_settings(tmp_path).model_copy(update={
        "bus": gateway_settings(tmp_path).bus.model_copy(update={"url": SecretStr(amqp_url), "prefix": bus_prefix}),
    })
    gw = Gateway(settings, roles=["relay", "scorer"])
    gw.start()
    hub_queue = None
    try:
        with served(gw, StreamSettings(heartbeat=0.5, buffer=100, replay=100, send_timeout=5)) as r:
            try:
                yield r
            finally:
                hub = getattr(r.app.state, "stream_hub", None)
                hub_queue = hub.queue if hub is not None else None
    finally:
        gw.stop()
        delete_broker_objects(amqp_url, gw.topology, queues=[hub_queue] if hub_queue else [])


def test_scored_events_reach_sse_clients_through_the_hubs_own_queue(rig: Rig, amqp_url: str) -> None:
    key = rig.key(["events:read"], ["orders"])
    everything = rig.stream(key)
    payments = rig.stream(key, type="com.acme.payment.#", min_score=0.5)
    try:
        evs = [event(1), event(2, source="billing"), event(3, type_="com.acme.payment.in", amount=700.0)]
        rig.accept(*evs)
        got = sorted([everything.next_scored(30).id, everything.next_scored(30).id])  # type: ignore[type-var]
        assert got == sorted([rig.scored_id(evs[0]), rig.scored_id(evs[2])])  # not billing's
        assert payments.next_scored(30).id == rig.scored_id(evs[2])
        heartbeat = payments.next(timeout=2)  # and nothing else for this filter
        assert heartbeat is not None and heartbeat.event is None
        # The hub's queue: classic, expiring once the process is gone, bound to the scored exchange.
        conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        try:
            declared = conn.channel().queue_declare(rig.hub.queue, passive=True)
            assert declared.method.consumer_count == 1
        finally:
            conn.close()
        assert rig.hub.queue.startswith(f"{rig.gw.settings.bus.prefix}.stream.")
    finally:
        everything.close()
        payments.close()
