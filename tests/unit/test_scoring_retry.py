"""Delayed retries through TTL retry queues (REL-08), on the in-process bus with a fake clock."""

from __future__ import annotations

import random
from collections.abc import Sequence
from concurrent.futures import Future
from datetime import datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.bus import InMemoryBus, Message, Outcome, Publisher, QueueSpec, Topology
from gateway.bus.retry import RetrySchedule
from gateway.errors import PermanentError, TransientError
from gateway.events import Event
from gateway.scoring import ScoreResult, ScoringWorker
from gateway.store import EventStore
from tests.unit.test_scoring_worker import TEST_QUEUE, make_events

# ---------------------------------------------------------------------------------- the schedule


@settings(max_examples=200, deadline=None)
@given(
    min_delay=st.floats(0.0, 5.0),
    base=st.floats(0.01, 5.0),
    factor=st.floats(1.0, 100.0),
    window=st.floats(0.01, 500.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_each_delay_is_full_jitter_within_its_cap_and_the_sum_within_the_window(
    min_delay: float, base: float, factor: float, window: float, seed: int
) -> None:
    max_delay = max(base, min_delay) * factor
    window = max(window, min_delay)
    schedule = RetrySchedule(min_delay, base, max_delay, window)
    rng = random.Random(seed).random
    spent, attempt = 0.0, 1
    while attempt <= 200:  # bus.max_attempts is at most 100
        delay = schedule.delay(attempt, spent, rng)
        if delay is None:
            assert window - spent < min_delay or window - spent <= 0  # only when the window is used up
            break
        assert min_delay <= delay <= max(min_delay, min(max_delay, base * 2.0 ** min(attempt - 1, 64))) + 1e-9
        spent += delay
        assert spent <= window + 1e-9
        attempt += 1
    else:
        assert 200 * min_delay <= window + 1e-6  # 200 delays fit in the window only when they are that short


def test_jitter_spans_the_whole_range() -> None:
    schedule = RetrySchedule(min_delay=0.5, base_delay=1.0, max_delay=8.0, window=1000.0)
    assert schedule.delay(4, 0.0, lambda: 0.0) == 0.5
    assert schedule.delay(4, 0.0, lambda: 0.999999) == pytest.approx(8.0, abs=1e-4)
    assert schedule.delay(9, 0.0, lambda: 0.999999) == pytest.approx(8.0, abs=1e-4)  # capped
    assert schedule.delay(3, 999.0, lambda: 0.999999) == 1.0  # clipped to what is left of the window
    assert schedule.delay(2, 999.6, lambda: 0.9) is None  # less than min_delay left


def test_levels_follow_the_caps_of_the_attempts_that_can_be_retried() -> None:
    schedule = RetrySchedule(min_delay=1.5, base_delay=1.0, max_delay=5.0, window=60.0)
    assert schedule.level_ttls_ms(1) == ()  # one attempt: nothing is retried
    assert schedule.level_ttls_ms(6) == (1500, 2000, 4000, 5000)


@pytest.mark.parametrize(
    ("kw", "problem"),
    [
        ({"base_delay": 0.0}, "positive"),
        ({"max_delay": 0.5, "base_delay": 1.0}, "max_delay"),
        ({"window": 0.5, "min_delay": 1.0}, "window"),
    ],
)
def test_invalid_schedules_are_refused(kw: dict[str, float], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        RetrySchedule(**kw)


# ---------------------------------------------------------------------------------- the worker


class SpyPublisher:
    """Delegates to the bus publisher; records every message per exchange; may refuse retries."""

    def __init__(self, inner: Publisher, refuse_retries: Outcome | None = None) -> None:
        self.inner = inner
        self.refuse_retries = refuse_retries
        self.sent: list[tuple[str, Message]] = []

    def publish(self, exchange: str, messages: Sequence[Message]) -> Future[list[Outcome]]:
        self.sent.extend((exchange, m) for m in messages)
        if self.refuse_retries is not None and exchange.endswith(".retry"):
            fut: Future[list[Outcome]] = Future()
            fut.set_result([self.refuse_retries] * len(messages))
            return fut
        return self.inner.publish(exchange, messages)

    def close(self) -> None:
        pass


class Model:
    """Fails the first ``fail_times`` calls per event with ``error``; records the bus time of every call."""

    name, version = "flaky", "1"

    def __init__(self, now: Any, fail_times: int | None = 2, error: Exception | None = None) -> None:
        self.now = now
        self.fail_times = fail_times  # None: always
        self.error = error if error is not None else TransientError("model backend hiccup")
        self.calls: dict[str, list[float]] = {}

    def score_batch(self, events: Sequence[Event]) -> list[ScoreResult]:
        for e in events:
            self.calls.setdefault(e.id, []).append(self.now())
        if any(self.fail_times is None or len(self.calls[e.id]) <= self.fail_times for e in events):
            raise self.error
        return [ScoreResult(0.25, None) for _ in events]


class RetryRig:
    def __init__(self, prefix: str, store: EventStore, *, schedule: RetrySchedule, max_attempts: int = 3,
                 model: Model | None = None, refuse_retries: Outcome | None = None, seed: int = 7) -> None:
        self.t = 0.0
        self.topo = Topology(prefix, delivery_limit=20, retry_ttls_ms=schedule.level_ttls_ms(max_attempts))
        self.bus = InMemoryBus(self.topo, clock=lambda: self.t)
        self.bus.declare_topology()
        self.bus.declare_queue(QueueSpec(TEST_QUEUE, {}, ((self.topo.scored_exchange, "#"),)))
        self.store = store
        self.consumer = self.bus.consumer(self.topo.scoring_queue, prefetch=100)
        self.publisher = SpyPublisher(self.bus.publisher(), refuse_retries)
        self.model = model if model is not None else Model(lambda: self.t)
        self.sleeps: list[float] = []
        self.worker = ScoringWorker(
            self.consumer, self.publisher, store, self.model, self.topo, batch_max=10, batch_linger_ms=0,
            max_attempts=max_attempts, publish_timeout=1.0, sleep=self.sleeps.append, retry=schedule,
            rng=random.Random(seed).random, score_timeout=None,
        )

    def send(self, events: Sequence[Event]) -> None:
        msgs = [Message(e.to_json(), e.type, e.id) for e in events]
        assert set(self.bus.publisher().publish(self.topo.events_exchange, msgs).result()) == {Outcome.ACK}

    def retry_depth(self) -> int:
        return sum(self.bus.queue_depth(q.name) for q in self.topo.retry_queues())

    def run_for(self, seconds: float, step: float = 0.01) -> None:
        """Advance the fake clock in ``step``s, letting expiries happen and the worker work."""
        end = self.t + seconds
        while self.t < end - 1e-12:
            while self.worker.process_once(0.0):
                pass
            self.t = round(self.t + step, 9)
            self.bus.expire()
        while self.worker.process_once(0.0):
            pass

    def retries_sent(self) -> list[Message]:
        return [m for ex, m in self.publisher.sent if ex == self.topo.retry_exchange]


SCHEDULE = RetrySchedule(min_delay=1.0, base_delay=1.0, max_delay=4.0, window=60.0)


def test_transient_failure_waits_in_a_retry_queue_and_is_scored_on_attempt_3(bus_prefix: str, sqlite_store: EventStore) -> None:
    rig = RetryRig(bus_prefix, sqlite_store, schedule=SCHEDULE)
    rig.send(make_events(1))
    assert rig.worker.process_once(0.0) == 1
    # Attempt 1 failed: the event waits in a retry level, the worker is free (and never slept).
    assert rig.bus.queue_depth(rig.topo.scoring_queue) == 0 and rig.retry_depth() == 1
    assert rig.worker.process_once(0.0) == 0
    assert rig.sleeps == [] and rig.worker.retried == 1

    rig.run_for(0.99)
    assert len(rig.model.calls["evt-0"]) == 1  # not before the minimum delay
    rig.run_for(20.0)
    calls = rig.model.calls["evt-0"]
    assert len(calls) == 3  # failed, failed, scored
    assert sqlite_store.count_scores() == 1 and rig.worker.scored == 1
    assert sqlite_store.list_dead_letters() == []
    assert rig.bus.queue_depth(TEST_QUEUE) == 1 and rig.retry_depth() == 0
    retries = rig.retries_sent()
    assert [m.headers["x-gw-attempts"] for m in retries] == [1, 2]
    for n, (m, (before, after)) in enumerate(zip(retries, zip(calls, calls[1:])), start=1):
        # Each delay was respected (the fake clock steps 10 ms) and within its cap.
        assert 1.0 <= m.expiration_ms / 1000 <= SCHEDULE.cap(n)
        assert m.expiration_ms / 1000 <= after - before <= m.expiration_ms / 1000 + 0.02
        level = rig.topo.retry_level(m.expiration_ms)
        assert level is not None and m.routing_key == level[0] and m.expiration_ms <= level[1]
        assert m.headers["x-gw-last-error"] == "TransientError: model backend hiccup"
        assert m.message_id == "evt-0" and m.body == make_events(1)[0].to_json()
    assert retries[0].headers["x-gw-first-failed-at"] == retries[1].headers["x-gw-first-failed-at"]
    datetime.fromisoformat(retries[0].headers["x-gw-first-failed-at"])
    assert retries[1].headers["x-gw-retry-delay-ms"] == retries[0].expiration_ms + retries[1].expiration_ms


def test_the_fake_clock_schedule_of_a_message_that_keeps_failing(bus_prefix: str, sqlite_store: EventStore) -> None:
    schedule = RetrySchedule(min_delay=0.5, base_delay=0.5, max_delay=3.0, window=8.0)
    for seed in range(5):
        prefix = f"{bus_prefix}-{seed}"
        rig = RetryRig(prefix, sqlite_store, schedule=schedule, max_attempts=50, seed=seed)
        rig.model.fail_times = None
        rig.send(make_events(1, start=seed * 10))
        rig.run_for(30.0)
        eid = f"evt-{seed * 10}"
        calls = rig.model.calls[eid]
        gaps = [b - a for a, b in zip(calls, calls[1:])]
        assert 2 <= len(calls) < 50  # the window, not max_attempts, ended it
        delays = [m.expiration_ms / 1000 for m in rig.retries_sent()]
        assert len(delays) == len(gaps)
        assert sum(delays) <= 8.0
        for n, (gap, delay) in enumerate(zip(gaps, delays), start=1):
            assert 0.5 <= delay <= max(0.5, min(3.0, 0.5 * 2 ** (n - 1)))  # [min, min(cap, base*2^(n-1))]
            assert delay - 1e-9 <= gap <= delay + 0.011  # waited its delay (10 ms clock steps)
        dead = [d for d in sqlite_store.list_dead_letters() if d.event_id == eid]
        assert len(dead) == 1 and "retry window of 8 s used up" in dead[0].reason
        assert dead[0].attempts == len(calls)


def test_permanent_error_is_dead_lettered_at_once(bus_prefix: str, sqlite_store: EventStore) -> None:
    rig = RetryRig(bus_prefix, sqlite_store, schedule=SCHEDULE)
    rig.model.fail_times, rig.model.error = None, PermanentError("feature vector rejected")
    rig.send(make_events(2))
    rig.run_for(10.0)
    assert {k: len(v) for k, v in rig.model.calls.items()} == {"evt-0": 2, "evt-1": 2}  # batch, then alone
    dead = sqlite_store.list_dead_letters(stage="scoring")
    assert sorted((d.event_id, d.error_class, d.attempts) for d in dead) == [
        ("evt-0", "PermanentError", 1), ("evt-1", "PermanentError", 1)]
    assert all("permanent scoring error" in d.reason for d in dead)
    assert rig.retries_sent() == [] and rig.retry_depth() == 0
    assert rig.bus.queue_depth(rig.topo.dead_letter_queue) == 2


def test_malformed_answer_is_permanent(bus_prefix: str, sqlite_store: EventStore) -> None:
    class NaNModel(Model):
        def score_batch(self, events: Sequence[Event]) -> list[ScoreResult]:
            super().score_batch(events)
            return [ScoreResult(float("nan"))]

    rig = RetryRig(bus_prefix, sqlite_store, schedule=SCHEDULE, model=NaNModel(lambda: 0.0, fail_times=0))
    rig.send(make_events(1))
    rig.run_for(5.0)
    assert [(d.error_class, d.attempts) for d in sqlite_store.list_dead_letters()] == [("ContractError", 1)]
    assert rig.retries_sent() == []


def test_max_attempts_dead_letters_with_attempts_and_reason(bus_prefix: str, sqlite_store: EventStore) -> None:
    rig = RetryRig(bus_prefix, sqlite_store, schedule=SCHEDULE, max_attempts=3)
    rig.model.fail_times = None
    rig.send(make_events(1))
    rig.run_for(20.0)
    assert len(rig.model.calls["evt-0"]) == 3
    [dead] = sqlite_store.list_dead_letters(stage="scoring")
    assert (dead.event_id, dead.error_class, dead.attempts) == ("evt-0", "TransientError", 3)
    assert dead.reason == "scoring failed 3 times: TransientError: model backend hiccup"
    assert dead.headers is not None and dead.headers["x-gw-attempts"] == 2  # the last retry copy's
    assert "x-death" in dead.headers  # it came back from its retry level by expiry
    dlq = rig.bus.consumer(rig.topo.dead_letter_queue, 10).get_batch(10, 0.0, 0.0)
    assert [d.message_id for d in dlq] == ["evt-0"] and dlq[0].headers["x-death"][0]["reason"] == "rejected"
    assert sqlite_store.count_scores() == 0


def test_unconfirmed_retry_publish_requeues_the_original(bus_prefix: str, sqlite_store: EventStore) -> None:
    rig = RetryRig(bus_prefix, sqlite_store, schedule=SCHEDULE, max_attempts=3, refuse_retries=Outcome.NACK)
    rig.model.fail_times = None
    rig.send(make_events(1))
    rig.worker.process_once(0.0)
    assert rig.bus.queue_depth(rig.topo.scoring_queue) == 1  # not lost, not acked
    assert rig.retry_depth() == 0 and rig.worker.retried == 0 and rig.worker.publish_failures == 1
    assert rig.sleeps  # a publish outage still backs off
    rig.worker.process_once(0.0)
    rig.worker.process_once(0.0)
    # The attempts were counted all the same: the third failure dead-letters it.
    assert len(rig.model.calls["evt-0"]) == 3
    assert [d.attempts for d in sqlite_store.list_dead_letters()] == [3]


def test_a_retry_of_an_already_scored_event_republishes_the_stored_score(bus_prefix: str, sqlite_store: EventStore) -> None:
    # A crash between the retry publish and the ack leaves a duplicate; an operator replay is one too.
    rig = RetryRig(bus_prefix, sqlite_store, schedule=SCHEDULE, model=Model(lambda: 0.0, fail_times=0))
    [ev] = make_events(1)
    rig.send([ev])
    rig.run_for(0.1)
    assert len(rig.model.calls[ev.id]) == 1 and sqlite_store.count_scores() == 1
    for header in ({"x-gw-attempts": 1}, {"x-gw-replayed": "2024-01-01T00:00:00+00:00"}):
        msg = Message(ev.to_json(), rig.topo.scoring_queue, ev.id, header)
        assert rig.bus.publisher().publish(rig.topo.retry_exchange, [msg]).result() == [Outcome.ACK]
        rig.run_for(0.1)
    assert len(rig.model.calls[ev.id]) == 1  # not scored (learned) again
    assert sqlite_store.count_scores() == 1
    out = rig.bus.consumer(TEST_QUEUE, 10).get_batch(10, 0.0, 0.0)
    assert len(out) == 3 and len({d.body for d in out}) == 1  # the same scored event each time


def test_broker_count_is_not_an_attempt_and_not_copied_to_the_retry(bus_prefix: str, sqlite_store: EventStore) -> None:
    rig = RetryRig(bus_prefix, sqlite_store, schedule=SCHEDULE)
    [ev] = make_events(1)
    msg = Message(ev.to_json(), ev.type, ev.id, {"origin": "legacy"})
    rig.bus.publisher().publish(rig.topo.events_exchange, [msg]).result()
    other = rig.bus.consumer(rig.topo.scoring_queue, 10)  # e.g. a paused consumer handing it back
    [d] = other.get_batch(1, 0.0, 0.0)
    other.reject(d, requeue=True)
    rig.worker.process_once(0.0)
    [retry] = rig.retries_sent()
    assert retry.headers["origin"] == "legacy" and "x-delivery-count" not in retry.headers
    assert retry.headers["x-gw-attempts"] == 1  # the gateway's count; x-delivery-count 1 is no attempt


def test_topology_declares_the_retry_levels_with_explicit_arguments() -> None:
    from gateway.config import BusSettings, ScoringSettings

    scoring = ScoringSettings(retry_min_delay=0.5, retry_base_delay=0.5, retry_max_delay=1.5, retry_window=10)
    topo = Topology.from_settings(BusSettings(prefix="gw", max_attempts=4, delivery_limit=7), scoring)
    assert topo.retry_ttls_ms == (500, 1000, 1500)
    levels = {q.name: q for q in topo.retry_queues()}
    assert set(levels) == {"gw.scoring.retry.500ms", "gw.scoring.retry.1000ms", "gw.scoring.retry.1500ms"}
    assert levels["gw.scoring.retry.1000ms"].arguments == {
        "x-queue-type": "quorum", "x-message-ttl": 1000, "x-dead-letter-exchange": "gw.retry",
        "x-dead-letter-routing-key": "gw.scoring", "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish", "x-delivery-limit": 7,
    }
    assert ("gw.retry", "direct") in topo.exchanges()
    assert ("gw.retry", "gw.scoring") in {q.name: q for q in topo.queues()}["gw.scoring"].bindings
    assert topo.retry_level(700) == ("gw.scoring.retry.1000ms", 1000)
    assert topo.retry_level(99_000) == ("gw.scoring.retry.1500ms", 1500)  # clipped to the longest
    assert Topology.from_settings(BusSettings(max_attempts=1)).retry_queues() == []
