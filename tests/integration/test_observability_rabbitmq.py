"""Queue depth and consumer count of the gateway queues on real RabbitMQ (issue 8)."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry

from gateway.bus import Message, Outcome, Topology
from gateway.bus.rabbitmq import RabbitBus
from gateway.config import BusSettings
from gateway.observability.metrics import QueueCollector
from tests.rabbit import delete_broker_objects
from tests.unit.test_observability_metrics import samples, value

pytestmark = pytest.mark.integration


def test_queue_collector_reports_ready_messages_and_consumers(amqp_url: str, bus_prefix: str) -> None:
    settings = BusSettings(url=amqp_url, prefix=bus_prefix, publish_timeout=10)
    topo = Topology.from_settings(settings)
    bus = RabbitBus(settings, topo)
    bus.declare_topology()
    try:
        publisher = bus.publisher()
        msgs = [Message(b"{}", "com.acme.x", f"m{i}") for i in range(7)]
        assert publisher.publish(topo.events_exchange, msgs).result(15) == [Outcome.ACK] * 7
        registry = CollectorRegistry()
        registry.register(QueueCollector(bus, [q.name for q in topo.queues()] + [f"{bus_prefix}.missing"], ttl=0))
        snap = samples(registry)
        assert value(snap, "gateway_queue_messages", queue=topo.scoring_queue) == 7
        assert value(snap, "gateway_queue_consumers", queue=topo.scoring_queue) == 0
        assert value(snap, "gateway_queue_messages", queue=topo.dead_letter_queue) == 0
        assert value(snap, "gateway_queue_messages", queue=f"{bus_prefix}.missing") is None  # 404: skipped
        assert value(snap, "gateway_collector_up", collector="queues") == 1

        consumer = bus.consumer(topo.scoring_queue, 2)  # holds 2 unacked: ready drops to 5
        deadline = time.monotonic() + 15
        while True:
            snap = samples(registry)
            if (value(snap, "gateway_queue_consumers", queue=topo.scoring_queue) == 1
                    and value(snap, "gateway_queue_messages", queue=topo.scoring_queue) == 5):
                break
            assert time.monotonic() < deadline, snap
            time.sleep(0.1)
        consumer.close()
    finally:
        bus.close()
        delete_broker_objects(amqp_url, topo)


def test_an_unreachable_broker_is_reported_not_raised(bus_prefix: str) -> None:
    settings = BusSettings(url="amqp://guest:guest@127.0.0.1:1/%2F", prefix=bus_prefix, socket_timeout=1)
    bus = RabbitBus(settings, Topology.from_settings(settings))
    registry = CollectorRegistry()
    registry.register(QueueCollector(bus, ["q"], ttl=0))
    snap = samples(registry)
    assert value(snap, "gateway_collector_up", collector="queues") == 0
    assert value(snap, "gateway_queue_messages", queue="q") is None
