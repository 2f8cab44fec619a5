"""Acceptance: a downstream consumer written with ``gateway.consumer`` receives scored events by
type pattern, on a real RabbitMQ.

The scored events are real (``scored_event`` of real ``Event`` objects) and are published by the
gateway's own publisher to ``<prefix>.scored`` -- so the gateway's declaration of that exchange
and the helper's run side by side. Every test has its own prefix and queue and deletes them
afterwards; the connection cut closes only the helper's named connection.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import pika
import pytest
from pydantic import SecretStr

from gateway.bus import Message, Outcome, Topology
from gateway.bus.protocols import Delivery
from gateway.bus.rabbitmq import RabbitBus
from gateway.config import BusSettings
from gateway.consumer import ScoredEvent, ScoredEventConsumer
from gateway.events import Event
from gateway.events.scored import scored_event
from tests.rabbit import delete_broker_objects, queue_depth

pytestmark = pytest.mark.integration


def _settings(amqp_url: str, prefix: str) -> BusSettings:
    return BusSettings(url=SecretStr(amqp_url), prefix=prefix, heartbeat=10, reconnect_max_delay=1.0,
                       publish_timeout=10.0, watchdog_interval=2.0)


@pytest.fixture
def queue(bus_prefix: str) -> str:
    return f"{bus_prefix}-app.scored"


@pytest.fixture
def gateway_bus(amqp_url: str, bus_prefix: str, queue: str) -> Iterator[RabbitBus]:
    """The gateway side: its topology and publisher; afterwards every object of the test is deleted."""
    settings = _settings(amqp_url, bus_prefix)
    bus = RabbitBus(settings, Topology.from_settings(settings), thread_guard=True)
    bus.declare_topology()
    yield bus
    bus.close()
    delete_broker_objects(amqp_url, bus.topology, queues=[queue, f"{queue}.dead"], exchanges=[f"{queue}.dlx"])


def make_app(amqp_url: str, bus_prefix: str, queue: str, **kw: Any) -> ScoredEventConsumer:
    kw.setdefault("prefetch", 20)
    kw.setdefault("stop_timeout", 10.0)
    return ScoredEventConsumer(
        amqp_url, queue=queue, prefix=bus_prefix, name=f"{bus_prefix}-helper",
        settings=_settings(amqp_url, bus_prefix), thread_guard=True, **kw,
    )


def started(app: ScoredEventConsumer) -> ScoredEventConsumer:
    app.start()
    con = app.consumer
    assert con is not None and con.wait_ready(15), getattr(con, "last_error", "")  # type: ignore[attr-defined]
    return app


def original(n: int, type_: str) -> Event:
    return Event(
        id=f"00000000-0000-5000-8000-{n:012d}", source="/legacy-gateway/sources/cards", type=type_,
        time=datetime(2024, 1, 1, 12, 0, n % 60, tzinfo=timezone.utc), subject=f"transaction/{n}",
        data={"txn_id": n, "amount": "18.22"},
        extensions={"sourcename": "cards", "sourceadapter": "sql", "sourceposition": f'{{"key":{n}}}'},
    )


def scored(n: int, type_: str, score: float = 0.5) -> Message:
    """A scored event as the scorer publishes it: routing key = original type, message_id = scored id."""
    se = scored_event(original(n, type_), score=score, model_name="online-anomaly", model_version="1",
                      explanation={"amount": 2.0})
    return Message(body=se.to_json(), routing_key=type_, message_id=se.id)


def publish(bus: RabbitBus, messages: list[Message]) -> list[Outcome]:
    pub = bus.publisher()
    try:
        return pub.publish(bus.topology.scored_exchange, messages).result(15)
    finally:
        pub.close()


def wait_until(cond: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def close_connection_named(name: str) -> int:
    """Force-close, from the broker, the connections whose client-provided name is ``name``."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties", "--no-table-headers"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    closed = 0
    for line in out.splitlines():
        pid, _, props = line.partition("\t")
        if f'{{"connection_name","{name}"}}' in props:
            subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "test cut"], timeout=30, check=True)
            closed += 1
    return closed


def test_handlers_receive_exactly_the_types_their_patterns_match(
    amqp_url: str, bus_prefix: str, queue: str, gateway_bus: RabbitBus
) -> None:
    cards: list[str] = []
    orders: list[str] = []
    limits: list[str] = []
    lock = threading.Lock()
    app = make_app(amqp_url, bus_prefix, queue, workers=2)

    @app.on("com.acme.cards.#")
    def on_cards(event: ScoredEvent) -> None:
        with lock:
            cards.append(event.original_type)

    @app.on("*.order.*")
    def on_orders(event: ScoredEvent, delivery: Delivery) -> None:
        assert delivery.message_id == event.id
        with lock:
            orders.append(event.original_type)

    @app.on("#.limit")  # overlaps com.acme.cards.# for com.acme.cards.limit
    def on_limits(event: ScoredEvent) -> None:
        with lock:
            limits.append(event.original_type)

    with started(app):
        msgs = [
            scored(1, "com.acme.cards.transaction.changed"), scored(2, "acme.order.created"),
            scored(3, "com.acme.order.created"), scored(4, "com.acme.cards.limit"), scored(5, "acme.order.cancelled"),
        ]
        out = publish(gateway_bus, msgs)
        # Nothing is bound for com.acme.order.created (three words only for *.order.*): returned.
        assert out == [Outcome.ACK, Outcome.ACK, Outcome.RETURNED, Outcome.ACK, Outcome.ACK]
        wait_until(lambda: app.stats.acked == 4, what="4 acks")
        time.sleep(0.5)  # nothing more may arrive
    assert sorted(cards) == ["com.acme.cards.limit", "com.acme.cards.transaction.changed"]
    assert sorted(orders) == ["acme.order.cancelled", "acme.order.created"]
    assert limits == ["com.acme.cards.limit"]  # once per queue, although two bindings match
    assert app.stats.acked == 4 and app.stats.handler_calls == 5
    assert queue_depth(amqp_url, queue) == 0 and queue_depth(amqp_url, f"{queue}.dead") == 0


def test_failing_handler_is_retried_then_acked_or_dead_lettered(
    amqp_url: str, bus_prefix: str, queue: str, gateway_bus: RabbitBus
) -> None:
    counts: dict[str, list[int]] = {"flaky": [], "broken": []}
    app = make_app(amqp_url, bus_prefix, queue, max_attempts=3)

    @app.on("com.acme.#")
    def handler(event: ScoredEvent, delivery: Delivery) -> None:
        key = "flaky" if event.subject == "transaction/1" else "broken"
        counts[key].append(delivery.delivery_count)
        if key == "broken" or len(counts[key]) < 3:
            raise RuntimeError(f"{key} fails")

    with started(app):
        assert publish(gateway_bus, [scored(1, "com.acme.x"), scored(2, "com.acme.y")]) == [Outcome.ACK] * 2
        wait_until(lambda: app.stats.acked == 1 and app.stats.dead_lettered == 1, what="ack and dead letter")
        wait_until(lambda: queue_depth(amqp_url, f"{queue}.dead") == 1, what="the dead letter")
        time.sleep(0.5)
    assert counts["flaky"] == [0, 1, 2]  # the broker's x-delivery-count: three deliveries, then acked
    assert counts["broken"] == [0, 1, 2]  # max_attempts deliveries, then the dead queue
    assert app.stats.retried == 4
    assert queue_depth(amqp_url, queue) == 0


def test_poison_body_goes_to_the_consumers_dead_queue(
    amqp_url: str, bus_prefix: str, queue: str, gateway_bus: RabbitBus
) -> None:
    got: list[str] = []
    app = make_app(amqp_url, bus_prefix, queue)
    app.on("com.acme.#")(lambda e: got.append(e.id))
    good = scored(7, "com.acme.z")
    with started(app):
        poison = Message(body=b'{"specversion": "1.0", "id": "x"}', routing_key="com.acme.z", message_id="poison-1")
        assert publish(gateway_bus, [poison, good]) == [Outcome.ACK] * 2
        wait_until(lambda: app.stats.acked == 1 and app.stats.parse_errors == 1, what="ack and parse error")
    assert got == [good.message_id]
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        ch = conn.channel()
        method, props, body = None, None, None
        deadline = time.monotonic() + 10
        while method is None and time.monotonic() < deadline:
            method, props, body = ch.basic_get(f"{queue}.dead", auto_ack=True)
            if method is None:
                time.sleep(0.1)
        assert method is not None, "nothing in the dead queue"
        assert body == poison.body and props.message_id == "poison-1"
        death = props.headers["x-death"][0]
        assert death["queue"] == queue and death["reason"] == "rejected"
    finally:
        conn.close()
    assert queue_depth(amqp_url, queue) == 0


def test_survives_a_forced_connection_close(
    amqp_url: str, bus_prefix: str, queue: str, gateway_bus: RabbitBus
) -> None:
    got: list[str] = []
    app = make_app(amqp_url, bus_prefix, queue)
    app.on("com.acme.#")(lambda e: got.append(e.subject or ""))
    with started(app):
        assert publish(gateway_bus, [scored(1, "com.acme.a")]) == [Outcome.ACK]
        wait_until(lambda: app.stats.acked == 1, what="the first message")
        con = app.consumer
        assert con is not None
        assert close_connection_named(f"{bus_prefix}-helper") == 1
        wait_until(lambda: con.connects >= 2 and con.ready, what="the reconnect")  # type: ignore[attr-defined]
        assert publish(gateway_bus, [scored(n, "com.acme.b") for n in range(2, 7)]) == [Outcome.ACK] * 5
        wait_until(lambda: app.stats.acked == 6, what="the messages after the cut")
    assert sorted(got) == [f"transaction/{n}" for n in range(1, 7)]
    assert queue_depth(amqp_url, queue) == 0


def test_run_blocks_until_stop_and_stops_gracefully(
    amqp_url: str, bus_prefix: str, queue: str, gateway_bus: RabbitBus
) -> None:
    entered = threading.Event()
    release = threading.Event()
    done: list[str] = []
    app = make_app(amqp_url, bus_prefix, queue, prefetch=5)

    @app.on("com.acme.#")
    def slow(event: ScoredEvent) -> None:
        entered.set()
        release.wait(10)
        done.append(event.id)

    runner = threading.Thread(target=app.run)
    runner.start()
    try:
        wait_until(lambda: app.consumer is not None and app.consumer.ready, what="the consumer")  # type: ignore[attr-defined]
        assert publish(gateway_bus, [scored(n, "com.acme.s") for n in range(1, 4)]) == [Outcome.ACK] * 3
        assert entered.wait(15)
        stopper = threading.Thread(target=app.stop)
        stopper.start()
        time.sleep(0.3)
        assert runner.is_alive() and stopper.is_alive()  # waiting for the in-flight handler
        release.set()
        stopper.join(15)
        runner.join(15)
        assert not runner.is_alive() and not stopper.is_alive()
    finally:
        release.set()
        app.stop()
    assert len(done) == 1 and app.stats.acked == 1
    wait_until(lambda: queue_depth(amqp_url, queue) == 2, what="the two untouched messages back in the queue")
