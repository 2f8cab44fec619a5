"""Breaker-coupled backpressure on the model (issue 6): an open breaker pauses intake, no attempt burnt."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future

import pytest

from gateway.bus import InMemoryBus, Message, Outcome, Publisher, QueueSpec, Topology
from gateway.bus.memory import InMemoryConsumer
from gateway.bus.retry import RetrySchedule
from gateway.events import Event
from gateway.resilience import BreakerPolicy, BreakerState, CircuitBreaker
from gateway.scoring import ScoreResult, ScoringWorker
from gateway.scoring.resilience import scorer_breaker_policy
from gateway.store import EventStore
from tests.unit.test_scoring_worker import TEST_QUEUE, make_events


class Model:
    """Raises while ``down``; records every call's event ids and every successful score per id."""

    name, version = "ext-model", "1"

    def __init__(self) -> None:
        self.down = True
        self.calls: list[list[str]] = []
        self.scored: dict[str, int] = {}
        self.lock = threading.Lock()

    def score_batch(self, events: Sequence[Event]) -> list[ScoreResult]:
        with self.lock:
            self.calls.append([e.id for e in events])
            if self.down:
                raise ConnectionError("model service unreachable")
            for e in events:
                self.scored[e.id] = self.scored.get(e.id, 0) + 1
        return [ScoreResult(0.1) for _ in events]


class SpyPublisher:
    def __init__(self, inner: Publisher) -> None:
        self.inner = inner
        self.sent: list[tuple[str, Message]] = []

    def publish(self, exchange: str, messages: Sequence[Message]) -> Future[list[Outcome]]:
        self.sent.extend((exchange, m) for m in messages)
        return self.inner.publish(exchange, messages)

    def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


POLICY = BreakerPolicy(window_size=4, minimum_calls=4, failure_rate_threshold=50, wait_in_open=10.0,
                       half_open_permits=2, slow_call_duration=60.0)
SCHEDULE = RetrySchedule(min_delay=1.0, base_delay=1.0, max_delay=2.0, window=60.0)


class Rig:
    def __init__(self, prefix: str, store: EventStore, *, max_attempts: int = 3, prefetch: int = 32) -> None:
        self.clock = Clock()  # one fake clock for the bus TTLs and the breaker
        self.topo = Topology(prefix, delivery_limit=50, retry_ttls_ms=SCHEDULE.level_ttls_ms(max_attempts))
        self.bus = InMemoryBus(self.topo, clock=self.clock)
        self.bus.declare_topology()
        self.bus.declare_queue(QueueSpec(TEST_QUEUE, {}, ((self.topo.scored_exchange, "#"),)))
        self.consumer: InMemoryConsumer = self.bus.consumer(self.topo.scoring_queue, prefetch=prefetch)
        self.model = Model()
        self.breaker = CircuitBreaker("scorer:ext-model", scorer_breaker_policy(POLICY), clock=self.clock)
        self.publisher = SpyPublisher(self.bus.publisher())
        self.store = store
        self.worker = ScoringWorker(
            self.consumer, self.publisher, store, self.model, self.topo, batch_max=5, batch_linger_ms=0,
            max_attempts=max_attempts, publish_timeout=1.0, sleep=lambda s: None, retry=SCHEDULE,
            breaker=self.breaker, score_timeout=None, prefetch=prefetch, rng=random.Random(3).random,
        )

    def send(self, n: int) -> None:
        events = make_events(n)
        msgs = [Message(e.to_json(), e.type, e.id) for e in events]
        assert set(self.bus.publisher().publish(self.topo.events_exchange, msgs).result()) == {Outcome.ACK}

    def depth(self) -> int:
        return self.bus.queue_depth(self.topo.scoring_queue)

    def advance(self, seconds: float) -> None:
        self.clock.t += seconds
        self.bus.expire()

    def retry_attempts(self) -> list[int]:
        return [m.headers["x-gw-attempts"] for ex, m in self.publisher.sent if ex == self.topo.retry_exchange]

    def dead(self) -> int:
        return len(self.store.list_dead_letters()) + self.bus.queue_depth(self.topo.dead_letter_queue)


def test_open_breaker_keeps_events_in_the_queue_and_every_event_is_scored_once(bus_prefix: str, sqlite_store: EventStore) -> None:
    rig = Rig(bus_prefix, sqlite_store, max_attempts=2)
    rig.send(30)

    # The batch call and three single calls fail: 4 failures of 4 calls open the breaker; the
    # two events not yet tried are handed back untried.
    assert rig.worker.process_once(0.0) == 5
    assert rig.breaker.state is BreakerState.OPEN
    assert rig.worker.handed_back == 2 and rig.worker.retried == 3
    assert rig.retry_attempts() == [1, 1, 1]

    # Open: intake paused, the events wait in the queue, nothing is taken.
    for _ in range(3):
        assert rig.worker.process_once(0.0) == 0
    assert rig.consumer.paused and rig.worker.pauses == 1
    assert rig.depth() == 27
    rig.advance(5.0)  # the three retries come back (still open: wait_in_open is 10 s)
    assert rig.worker.process_once(0.0) == 0
    assert rig.depth() == 30 and rig.dead() == 0

    # Still down through two half-open trials; each tries exactly the permitted 2 events.
    for wait in (5.0, 10.0):  # to the end of the first, then the second wait in open
        rig.advance(wait)
        assert rig.breaker.state is BreakerState.HALF_OPEN
        calls_before = len(rig.model.calls)
        assert rig.worker.process_once(0.0) == 2
        assert rig.consumer.prefetch == 2
        assert [len(c) for c in rig.model.calls[calls_before:]] == [1, 1]  # one trial call per event
        assert rig.breaker.state is BreakerState.OPEN
        assert rig.worker.process_once(0.0) == 0 and rig.consumer.paused
    assert rig.dead() == 0

    # Handed-back deliveries were not attempts: every event failed at most once so far, although
    # the broker counted the hand-backs as deliveries.
    assert max(rig.retry_attempts()) == 1

    # The model recovers: trial, close, and a gradual resume.
    rig.model.down = False
    prefetches: list[int | None] = []
    real_resume = rig.consumer.resume
    rig.consumer.resume = lambda p=None: (prefetches.append(p), real_resume(p))[1]  # type: ignore[method-assign]
    for _ in range(200):
        rig.advance(1.0)
        while rig.worker.process_once(0.0):
            pass
        if len(rig.model.scored) == 30:
            break
    assert rig.breaker.state is BreakerState.CLOSED
    assert rig.model.scored == {f"evt-{i}": 1 for i in range(30)}  # every event scored exactly once
    assert sqlite_store.count_scores() == 30 and rig.dead() == 0
    assert rig.depth() == 0 and rig.bus.queue_depth(TEST_QUEUE) == 30
    # Half-open: the trial size; closed: the configured prefetch at once (batches grow instead).
    assert prefetches == [2, 32]
    assert not rig.consumer.paused and rig.consumer.prefetch == 32


def test_half_open_admits_only_the_permitted_trial_size(bus_prefix: str, sqlite_store: EventStore) -> None:
    rig = Rig(bus_prefix, sqlite_store)
    rig.send(20)
    rig.breaker.force_open(wait=3.0)
    assert rig.worker.process_once(0.0) == 0 and rig.depth() == 20
    rig.model.down = False
    rig.advance(3.0)
    taken = rig.consumer.get_batch  # count what the worker takes in the trial

    sizes: list[int] = []

    def spy(max_messages: int, max_wait: float, linger: float) -> list:  # type: ignore[type-arg]
        out = taken(max_messages, max_wait, linger)
        sizes.append(len(out))
        return out

    rig.consumer.get_batch = spy  # type: ignore[method-assign]
    assert rig.worker.process_once(0.0) == 2
    assert sizes == [2] and [len(c) for c in rig.model.calls] == [1, 1]
    assert rig.breaker.state is BreakerState.CLOSED  # both trials succeeded
    assert rig.worker.process_once(0.0) == 4  # closed: the batch size doubles from the trial size
    assert rig.worker.process_once(0.0) == 5 and rig.consumer.prefetch == 32  # up to batch_max (5)


def test_events_refused_by_a_breaker_another_worker_opened_are_not_attempts(bus_prefix: str, sqlite_store: EventStore) -> None:
    rig = Rig(bus_prefix, sqlite_store)
    rig.send(5)
    real_score = rig.model.score_batch

    def open_then_fail(events: Sequence[Event]) -> list[ScoreResult]:
        rig.breaker.force_open()  # another worker of the same model opened the shared breaker
        return real_score(events)  # and this call fails too (the model is down)

    rig.model.score_batch = open_then_fail  # type: ignore[method-assign]
    assert rig.worker.process_once(0.0) == 5
    # The batch call failed and the breaker is open: the events were handed back, not retried.
    assert rig.worker.handed_back == 5 and rig.worker.retried == 0 and rig.dead() == 0
    assert rig.depth() == 5


def test_a_call_slower_than_score_timeout_is_a_failure_and_a_slow_call(bus_prefix: str, sqlite_store: EventStore) -> None:
    rig = Rig(bus_prefix, sqlite_store)
    breaker = CircuitBreaker(
        "scorer:slow", scorer_breaker_policy(BreakerPolicy(slow_call_duration=0.02, minimum_calls=10))
    )
    release = threading.Event()

    class Slow(Model):
        def score_batch(self, events: Sequence[Event]) -> list[ScoreResult]:
            release.wait(5.0)
            return [ScoreResult(0.1) for _ in events]

    worker = ScoringWorker(
        rig.consumer, rig.publisher, sqlite_store, Slow(), rig.topo, batch_max=5, batch_linger_ms=0,
        publish_timeout=1.0, sleep=lambda s: None, retry=SCHEDULE, breaker=breaker, score_timeout=0.05,
    )
    rig.send(1)
    assert worker.process_once(0.0) == 1
    release.set()
    snap = breaker.snapshot()
    assert (snap["failed_calls"], snap["slow_calls"], snap["buffered_calls"]) == (1, 1, 1)
    assert worker.retried == 1 and rig.retry_attempts() == [1]
    assert "TimeoutError" in rig.publisher.sent[-1][1].headers["x-gw-last-error"]


def test_run_loop_with_a_real_clock_scores_everything_once(bus_prefix: str, sqlite_store: EventStore) -> None:
    """The whole loop in a thread: the model is down for a while, then recovers."""
    topo = Topology(bus_prefix, delivery_limit=50, retry_ttls_ms=(50, 100))
    bus = InMemoryBus(topo)
    bus.declare_topology()
    consumer = bus.consumer(topo.scoring_queue, prefetch=16)
    model = Model()
    breaker = CircuitBreaker("scorer:ext-model", scorer_breaker_policy(
        BreakerPolicy(window_size=4, minimum_calls=4, wait_in_open=0.05, half_open_permits=2)))
    worker = ScoringWorker(
        consumer, bus.publisher(), sqlite_store, model, topo, batch_max=8, batch_linger_ms=0, max_attempts=10,
        publish_timeout=1.0, retry=RetrySchedule(min_delay=0.02, base_delay=0.05, max_delay=0.1, window=5.0),
        breaker=breaker, score_timeout=1.0, prefetch=16,
    )
    states: list[str] = []
    breaker.add_listener(lambda name, old, new: states.append(new.value))
    msgs = [Message(e.to_json(), e.type, e.id) for e in make_events(40)]
    bus.publisher().publish(topo.events_exchange, msgs).result()
    stop = threading.Event()
    t = threading.Thread(target=worker.run, args=(stop,))
    t.start()
    try:
        deadline = time.monotonic() + 10
        while "open" not in states and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "open" in states
        model.down = False
        while len(model.scored) < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        t.join(5)
    assert not t.is_alive()
    assert model.scored == {f"evt-{i}": 1 for i in range(40)}
    assert sqlite_store.count_scores() == 40 and sqlite_store.list_dead_letters() == []
    assert worker.pauses >= 1 and states[-1] == "closed"


def test_memory_consumer_pause_and_resume(bus_prefix: str) -> None:
    topo = Topology(bus_prefix)
    bus = InMemoryBus(topo)
    bus.declare_topology()
    con = bus.consumer(topo.scoring_queue, prefetch=10)
    bus.publisher().publish(topo.events_exchange, [Message(b"x%d" % i, "k", f"m{i}") for i in range(6)]).result()
    [first] = con.get_batch(1, 0.0, 0.0)
    con.pause()
    con.pause()  # idempotent
    assert con.get_batch(5, 0.05, 0.0) == []
    con.ack([first])  # handed-out deliveries stay valid
    assert bus.queue_depth(topo.scoring_queue) == 5
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(len(con.get_batch(5, 5.0, 0.0))))
    waiter.start()
    time.sleep(0.05)
    con.resume(2)  # wakes the waiter, with the new prefetch
    waiter.join(5)
    assert got == [2] and con.prefetch == 2
    with pytest.raises(ValueError):
        con.resume(0)


def test_memory_bus_expiry_dead_letters_to_the_routing_key_and_is_at_least_once(bus_prefix: str) -> None:
    clock = Clock()
    topo = Topology(bus_prefix, max_queue_length=1, retry_ttls_ms=(1000,))
    bus = InMemoryBus(topo, clock=clock)
    bus.declare_topology()
    pub = bus.publisher()
    level = topo.retry_queue(1000)
    out = pub.publish(topo.retry_exchange, [
        Message(b"a", level, "a", expiration_ms=300), Message(b"b", level, "b", expiration_ms=100),
        Message(b"c", level, "c"),
    ]).result()
    assert out == [Outcome.ACK] * 3
    clock.t = 0.2
    assert bus.expire() == 0  # b is due, but only the head expires (as on RabbitMQ)
    clock.t = 0.3
    bus.expire()  # a (the bus's own timer thread may be the one that moves it: check the queues)
    assert bus.queue_depth(topo.scoring_queue) == 1  # a; b would be next, but the queue is full (max 1)
    assert bus.queue_depth(level) == 2  # at-least-once: b waits at the head instead of being dropped
    con = bus.consumer(topo.scoring_queue, 10)
    [a] = con.get_batch(10, 0.0, 0.0)
    assert a.body == b"a" and a.routing_key == topo.scoring_queue
    assert a.headers["x-death"][0]["reason"] == "expired" and a.headers["x-death"][0]["queue"] == level
    con.ack([a])
    clock.t = 1.0
    bus.expire()
    assert bus.queue_depth(level) == 1 and bus.queue_depth(topo.scoring_queue) == 1  # b in; c (queue TTL 1 s) blocked by the full queue
