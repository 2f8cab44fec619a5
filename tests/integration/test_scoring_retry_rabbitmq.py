"""Delayed retries (REL-08) and breaker-coupled backpressure (issue 6) on a real RabbitMQ.

Every test uses its own ``bus_prefix`` and deletes its queues (retry levels included) and
exchanges afterwards. The store is a fresh PostgreSQL database.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future

import pika
import pytest
from pydantic import SecretStr

from gateway.bus import Message, Outcome, Publisher, Topology
from gateway.bus.rabbitmq import RabbitBus
from gateway.bus.retry import RetrySchedule
from gateway.config import BusSettings, ScoringSettings
from gateway.errors import ConfigurationError, TransientError
from gateway.events import Event
from gateway.resilience import BreakerPolicy, BreakerState, CircuitBreaker
from gateway.scoring import ScoreResult, ScoringWorker
from gateway.scoring.resilience import scorer_breaker_policy
from gateway.store import EventStore
from tests.rabbit import delete_broker_objects
from tests.unit.test_scoring_worker import make_events

pytestmark = pytest.mark.integration

SCORING = ScoringSettings(retry_min_delay=1.0, retry_base_delay=1.0, retry_max_delay=2.0, retry_window=30.0)


def bus_settings(amqp_url: str, prefix: str, **kw: object) -> BusSettings:
    base: dict[str, object] = {"url": SecretStr(amqp_url), "prefix": prefix, "heartbeat": 10,
                               "reconnect_max_delay": 1.0, "publish_timeout": 10.0, "max_attempts": 3}
    base.update(kw)
    return BusSettings(**base)  # type: ignore[arg-type]


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=30, check=True).stdout


def wait_until(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


class SpyPublisher:
    """Records what the worker publishes, then publishes it for real."""

    def __init__(self, inner: Publisher) -> None:
        self.inner = inner
        self.sent: list[tuple[str, Message]] = []
        self._lock = threading.Lock()

    def publish(self, exchange: str, messages: Sequence[Message]) -> Future[list[Outcome]]:
        with self._lock:
            self.sent.extend((exchange, m) for m in messages)
        return self.inner.publish(exchange, messages)

    def close(self) -> None:
        self.inner.close()


class Model:
    """Fails everything while ``down``; fails ``fail`` ids on their first ``fail_times`` attempts.

    A batch holding a failing id fails without counting (the worker then scores one by one), so
    ``attempts`` holds the time of each single-event call per id: one per delivery.
    """

    name, version = "it-model", "1"

    def __init__(self, fail: frozenset[str] = frozenset(), fail_times: int = 0) -> None:
        self.fail, self.fail_times = fail, fail_times
        self.down = False
        self.calls: dict[str, list[float]] = {}
        self.attempts: dict[str, list[float]] = {}
        self.batches: list[list[str]] = []
        self.scored: dict[str, int] = {}
        self.lock = threading.Lock()

    def score_batch(self, events: Sequence[Event]) -> list[ScoreResult]:
        with self.lock:
            now = time.monotonic()
            self.batches.append([e.id for e in events])
            for e in events:
                self.calls.setdefault(e.id, []).append(now)
            if self.down:
                raise ConnectionError("model service unreachable")
            if len(events) == 1:
                self.attempts.setdefault(events[0].id, []).append(now)
            if any(e.id in self.fail and len(self.attempts.get(e.id, ())) <= self.fail_times for e in events):
                raise TransientError("model backend hiccup")
            for e in events:
                self.scored[e.id] = self.scored.get(e.id, 0) + 1
        return [ScoreResult(0.3) for _ in events]


@pytest.fixture
def topology(amqp_url: str, bus_prefix: str) -> Iterator[Topology]:
    """The topology of this test; its queues and exchanges are deleted afterwards."""
    topo = Topology.from_settings(bus_settings(amqp_url, bus_prefix), SCORING)
    yield topo
    delete_broker_objects(amqp_url, topo, queues=[f"{bus_prefix}.sink"])


def start_worker(bus: RabbitBus, store: EventStore, model: Model, **kw: object) -> tuple[ScoringWorker, Callable[[], None]]:
    t = bus.topology
    consumer = bus.consumer(t.scoring_queue, int(kw.pop("prefetch", 10)))  # type: ignore[call-overload]
    publisher = SpyPublisher(bus.publisher())
    worker = ScoringWorker(consumer, publisher, store, model, t, batch_max=10, batch_linger_ms=5,
                           publish_timeout=10.0, **kw)  # type: ignore[arg-type]
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()

    def finish() -> None:
        stop.set()
        thread.join(10)
        assert not thread.is_alive()
        consumer.close()
        publisher.close()

    return worker, finish


def send(bus: RabbitBus, events: Sequence[Event]) -> None:
    pub = bus.publisher()
    try:
        msgs = [Message(e.to_json(), e.type, e.id) for e in events]
        assert pub.publish(bus.topology.events_exchange, msgs).result(10) == [Outcome.ACK] * len(msgs)
    finally:
        pub.close()


def test_transient_failure_is_scored_on_attempt_3_after_the_delays(
    amqp_url: str, bus_prefix: str, topology: Topology, pg_store: EventStore
) -> None:
    bus = RabbitBus(bus_settings(amqp_url, bus_prefix), topology, thread_guard=True)
    bus.declare_topology()
    model = Model(fail=frozenset({"evt-0"}), fail_times=2)
    worker, finish = start_worker(bus, pg_store, model, max_attempts=3, retry=RetrySchedule.from_settings(SCORING))
    try:
        send(bus, make_events(5))
        assert wait_until(lambda: pg_store.count_scores() == 5, 30)
    finally:
        finish()
        bus.close()
    calls = model.attempts["evt-0"]
    assert len(calls) == 3  # failed, failed, scored on attempt 3
    assert model.scored == {f"evt-{i}": 1 for i in range(5)}  # each scored once, the others not held back
    assert worker.retried == 2 and worker.scored == 5
    retries = [m for ex, m in worker.publisher.sent if ex == topology.retry_exchange]  # type: ignore[attr-defined]
    assert [m.headers["x-gw-attempts"] for m in retries] == [1, 2]
    assert retries[0].expiration_ms == 1000  # attempt 1: [min 1 s, cap 1 s]
    assert 1000 <= retries[1].expiration_ms <= 2000  # attempt 2: [min 1 s, cap 2 s]
    for m, before, after in zip(retries, calls, calls[1:]):
        assert after - before >= m.expiration_ms / 1000  # the broker held it at least its delay
        assert m.routing_key.startswith(f"{topology.scoring_queue}.retry.")
    assert pg_store.list_dead_letters() == []


def test_retry_levels_are_declared_with_exact_arguments_and_checked(
    amqp_url: str, bus_prefix: str, topology: Topology
) -> None:
    bus = RabbitBus(bus_settings(amqp_url, bus_prefix), topology, thread_guard=True)
    bus.declare_topology()
    bus.close()
    listed = json.loads(rabbitmqctl("list_queues", "name", "arguments", "durable", "type",
                                    "--vhost", "/", "--formatter", "json"))
    mine = {q["name"]: q for q in listed if q["name"].startswith(bus_prefix + ".")}
    levels = {spec.name: spec.arguments for spec in topology.retry_queues()}
    assert set(levels) == {f"{bus_prefix}.scoring.retry.1000ms", f"{bus_prefix}.scoring.retry.2000ms"}
    for name, args in levels.items():
        assert {key: value for key, _type, value in mine[name]["arguments"]} == args
        assert mine[name]["durable"] is True and mine[name]["type"] == "quorum"
        assert args["x-dead-letter-strategy"] == "at-least-once" and args["x-overflow"] == "reject-publish"
        assert args["x-dead-letter-exchange"] == topology.retry_exchange
        assert args["x-dead-letter-routing-key"] == topology.scoring_queue
    # Passive declares see them too.
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        ch = conn.channel()
        for name in levels:
            ch.queue_declare(name, passive=True)
        # A retry level that exists with another TTL stops the start (REL-03).
        level = topology.retry_queue(1000)
        ch.queue_delete(level)
        ch.queue_declare(level, durable=True, arguments={**levels[level], "x-message-ttl": 1500})
    finally:
        conn.close()
    bus = RabbitBus(bus_settings(amqp_url, bus_prefix), topology, thread_guard=True)
    with pytest.raises(ConfigurationError) as err:
        bus.declare_topology()
    bus.close()
    assert "PRECONDITION_FAILED" in str(err.value) and level in str(err.value)


def test_open_breaker_pauses_intake_and_every_event_is_scored_once(
    amqp_url: str, bus_prefix: str, topology: Topology, pg_store: EventStore
) -> None:
    """Needs ``PikaConsumer.pause``/``resume``: while the breaker is open the broker keeps the events."""
    n = 40
    bus = RabbitBus(bus_settings(amqp_url, bus_prefix), topology, thread_guard=True)
    bus.declare_topology()
    model = Model()
    model.down = True
    breaker = CircuitBreaker("scorer:it-model", scorer_breaker_policy(BreakerPolicy(
        window_size=4, minimum_calls=4, wait_in_open=4.0, half_open_permits=2)))
    states: list[str] = []
    breaker.add_listener(lambda name, old, new: states.append(new.value))
    worker, finish = start_worker(
        bus, pg_store, model, max_attempts=3, retry=RetrySchedule(0.3, 0.3, 0.6, 30.0), breaker=breaker,
        prefetch=16,
    )
    try:
        send(bus, make_events(n))
        assert wait_until(lambda: "open" in states, 20)
        opened = time.monotonic()
        # Paused: nothing is held by the consumer, the retries come back, so the broker has them all.
        assert wait_until(lambda: bus.queue_depth(topology.scoring_queue) == n, 3.0)
        assert breaker.state is BreakerState.OPEN and time.monotonic() - opened < 4.0
        assert bus.queue_depth(topology.dead_letter_queue) == 0 and pg_store.list_dead_letters() == []
        tried = len(model.batches)
        model.down = False
        assert wait_until(lambda: pg_store.count_scores() == n, 60)
    finally:
        finish()
        bus.close()
    assert model.scored == {f"evt-{i}": 1 for i in range(n)}  # every event scored exactly once
    assert pg_store.list_dead_letters() == []
    assert worker.pauses >= 1 and states[:3] == ["open", "half_open", "closed"]
    assert [len(b) for b in model.batches[tried:tried + 2]] == [1, 1]  # the half-open trial: 2 single calls


def test_poison_is_attempted_exactly_max_attempts_times_then_dead_lettered_with_its_headers(
    amqp_url: str, bus_prefix: str, topology: Topology, pg_store: EventStore
) -> None:
    """REL-07: a message that always fails is attempted exactly ``max_attempts`` times (counted by
    the gateway), then is in the DLQ with the reason, its original headers and ``x-death``; the
    other messages keep flowing meanwhile."""
    bus = RabbitBus(bus_settings(amqp_url, bus_prefix), topology, thread_guard=True)
    bus.declare_topology()
    model = Model(fail=frozenset({"evt-3"}), fail_times=1_000)
    worker, finish = start_worker(bus, pg_store, model, max_attempts=3, retry=RetrySchedule.from_settings(SCORING))
    events = make_events(20)
    pub = bus.publisher()
    try:
        msgs = [Message(e.to_json(), e.type, e.id, {"origin": "mainframe", "batch": 7}) for e in events]
        assert pub.publish(topology.events_exchange, msgs).result(10) == [Outcome.ACK] * 20
        assert wait_until(lambda: pg_store.count_scores() == 19, 30), "the 19 good events were not scored"
        assert wait_until(lambda: len(pg_store.list_dead_letters()) == 1, 30), "the poison was not dead-lettered"
    finally:
        pub.close()
        finish()
        bus.close()
    assert len(model.attempts["evt-3"]) == 3  # exactly max_attempts, counted by the gateway
    assert worker.dead_lettered == 1 and worker.scored == 19
    [row] = pg_store.list_dead_letters()
    assert (row.event_id, row.stage, row.attempts) == ("evt-3", "scoring", 3)
    assert "3 times" in row.reason and "TransientError" in row.reason
    assert row.headers is not None and row.headers["origin"] == "mainframe" and row.headers["x-gw-attempts"] == 2

    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        method, props, body = conn.channel().basic_get(topology.dead_letter_queue, auto_ack=True)
    finally:
        conn.close()
    assert method is not None, "the broker's dead-letter queue is empty"
    assert json.loads(body)["id"] == "evt-3" and props.message_id == "evt-3"
    assert props.headers["origin"] == "mainframe" and props.headers["batch"] == 7  # original headers kept
    [death] = [d for d in props.headers["x-death"] if d["queue"] == topology.scoring_queue]
    assert death["reason"] == "rejected"
