"""Degradation to a fallback model while the primary model's breaker is open (issue 7)."""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence

from gateway.bus import InMemoryBus, Message, Outcome, QueueSpec, Topology
from gateway.bus.memory import InMemoryConsumer
from gateway.config import ScoringSettings
from gateway.events import Event
from gateway.resilience import BreakerState, CircuitBreaker
from gateway.scoring import ScoreResult, ScoringWorker
from gateway.scoring.resilience import scorer_breaker_policy
from gateway.scoring.routing import build_fallback
from gateway.store import EventStore
from tests.unit.test_scoring_backpressure import (
    POLICY,
    SCHEDULE,
    Clock,
    Model,
    SpyPublisher,
)
from tests.unit.test_scoring_worker import TEST_QUEUE, make_events


class Fallback:
    """A local model: scores 0.42 (raises while ``broken``)."""

    name, version = "guard", "rules-abc"

    def __init__(self) -> None:
        self.broken = False
        self.calls: list[list[str]] = []
        self.lock = threading.Lock()

    def score_batch(self, events: Sequence[Event]) -> list[ScoreResult]:
        with self.lock:
            self.calls.append([e.id for e in events])
        if self.broken:
            raise RuntimeError("fallback broken")
        return [ScoreResult(0.42, {"rule": None, "reason": "no rule matched", "matched": {}}) for _ in events]


class Rig:
    def __init__(self, prefix: str, store: EventStore, *, fallback: object | None, max_attempts: int = 2) -> None:
        self.clock = Clock()
        self.topo = Topology(prefix, delivery_limit=50, retry_ttls_ms=SCHEDULE.level_ttls_ms(max_attempts))
        self.bus = InMemoryBus(self.topo, clock=self.clock)
        self.bus.declare_topology()
        self.bus.declare_queue(QueueSpec(TEST_QUEUE, {}, ((self.topo.scored_exchange, "#"),)))
        self.consumer: InMemoryConsumer = self.bus.consumer(self.topo.scoring_queue, prefetch=32)
        self.model = Model()
        self.fallback = fallback
        self.breaker = CircuitBreaker("scorer:ext-model", scorer_breaker_policy(POLICY), clock=self.clock)
        self.publisher = SpyPublisher(self.bus.publisher())
        self.store = store
        self.worker = ScoringWorker(
            self.consumer, self.publisher, store, self.model, self.topo, batch_max=5, batch_linger_ms=0,
            max_attempts=max_attempts, publish_timeout=1.0, sleep=lambda s: None, retry=SCHEDULE,
            breaker=self.breaker, score_timeout=None, prefetch=32, rng=random.Random(3).random,
            fallback=fallback,  # type: ignore[arg-type]
        )
        self.out = self.bus.consumer(TEST_QUEUE, prefetch=10_000)

    def send(self, events: list[Event]) -> None:
        msgs = [Message(e.to_json(), e.type, e.id) for e in events]
        assert set(self.bus.publisher().publish(self.topo.events_exchange, msgs).result()) == {Outcome.ACK}

    def advance(self, seconds: float) -> None:
        self.clock.t += seconds
        self.bus.expire()

    def run_until_idle(self, limit: int = 200) -> None:
        for _ in range(limit):
            if self.worker.process_once(0.0) == 0:
                return
        raise AssertionError("worker did not go idle")

    def published(self) -> list[Event]:
        got = self.out.get_batch(10_000, 0.0, 0.0)
        self.out.ack(got)
        return [Event.from_json(d.body) for d in got]

    def depth(self) -> int:
        return self.bus.queue_depth(self.topo.scoring_queue)

    def dead(self) -> int:
        return len(self.store.list_dead_letters()) + self.bus.queue_depth(self.topo.dead_letter_queue)


def test_open_breaker_scores_with_the_fallback_and_nothing_waits(bus_prefix: str, sqlite_store: EventStore) -> None:
    rig = Rig(bus_prefix, sqlite_store, fallback=Fallback())
    events = make_events(30)
    rig.send(events)

    # Batch call + 3 single calls fail and open the breaker; the 2 refused events go to the fallback.
    assert rig.worker.process_once(0.0) == 5
    assert rig.breaker.state is BreakerState.OPEN
    assert rig.worker.retried == 3 and rig.worker.handed_back == 0 and rig.worker.fallback_scored == 2

    # Open: intake is NOT paused, the fallback scores everything, the primary is not called.
    calls = len(rig.model.calls)
    rig.run_until_idle()
    rig.advance(2.5)  # the 3 retries come back (still open: wait_in_open is 10 s)
    rig.run_until_idle()
    assert len(rig.model.calls) == calls
    assert not rig.consumer.paused and rig.worker.pauses == 0
    assert rig.depth() == 0 and rig.dead() == 0
    assert rig.worker.fallback_scored == 30 and rig.worker.scored == 30

    stored = sqlite_store.get_scores([e.id for e in events], "guard", "rules-abc")
    assert len(stored) == 30 and {r.score for r in stored.values()} == {0.42}
    assert sqlite_store.get_scores([e.id for e in events], "ext-model", "1") == {}
    out = rig.published()
    assert len(out) == 30 and {e.data["event"]["id"] for e in out} == {e.id for e in events}
    for se in out:
        assert se.data["model"] == {"name": "guard", "version": "rules-abc"}
        assert se.extensions["degraded"] is True

    # A redelivered copy republishes the fallback's committed score: not scored again.
    rig.model.down = False
    rig.send(events[:3])
    rig.advance(10.0)
    rig.run_until_idle()
    again = rig.published()
    assert len(again) == 3 and all(se.data["model"]["name"] == "guard" for se in again)
    assert rig.model.scored == {} and rig.worker.fallback_scored == 30


def test_primary_recovers_through_a_half_open_trial(bus_prefix: str, sqlite_store: EventStore) -> None:
    fb = Fallback()
    rig = Rig(bus_prefix, sqlite_store, fallback=fb)
    rig.send(make_events(5))
    rig.worker.process_once(0.0)
    assert rig.breaker.state is BreakerState.OPEN
    rig.advance(2.5)
    rig.run_until_idle()
    rig.published()

    rig.model.down = False
    rig.advance(10.0)
    assert rig.breaker.state is BreakerState.HALF_OPEN
    fresh = make_events(20, start=100)
    rig.send(fresh)
    fb_calls = len(fb.calls)
    # The trial batch (half_open_permits = 2) goes to the primary, one event per call.
    assert rig.worker.process_once(0.0) == 2
    assert [len(c) for c in rig.model.calls[-2:]] == [1, 1]
    assert rig.breaker.state is BreakerState.CLOSED
    rig.run_until_idle()
    assert len(fb.calls) == fb_calls  # the fallback was not needed any more
    out = rig.published()
    assert len(out) == 20
    assert all(se.data["model"]["name"] == "ext-model" and "degraded" not in se.extensions for se in out)
    assert rig.depth() == 0 and rig.dead() == 0 and rig.consumer.prefetch == 32


def test_a_breaker_reset_while_a_batch_is_taken_gives_that_batch_to_the_primary(
    bus_prefix: str, sqlite_store: EventStore
) -> None:
    """The breaker is asked before the batch is fetched; if it closes during the fetch (an operator
    reset, or the wait ending), the batch goes to the primary, not to the fallback."""
    fb = Fallback()
    rig = Rig(bus_prefix, sqlite_store, fallback=fb)
    rig.send(make_events(5))
    rig.worker.process_once(0.0)
    rig.advance(2.5)
    rig.run_until_idle()
    assert rig.breaker.state is BreakerState.OPEN and rig.worker.fallback_scored == 5
    rig.model.down = False
    fresh = make_events(5, start=100)
    rig.send(fresh)
    fetch = rig.consumer.get_batch

    def fetch_while_an_operator_resets(*args: object) -> object:
        rig.breaker.reset()
        return fetch(*args)  # type: ignore[arg-type]

    rig.consumer.get_batch = fetch_while_an_operator_resets  # type: ignore[method-assign]
    fb_calls = len(fb.calls)
    assert rig.worker.process_once(0.0) == 5
    assert len(fb.calls) == fb_calls and rig.model.scored == {e.id: 1 for e in fresh}
    assert all(se.data["model"]["name"] == "ext-model" for se in rig.published()[-5:])


def test_a_failing_fallback_pauses_intake_as_without_one(bus_prefix: str, sqlite_store: EventStore) -> None:
    fb = Fallback()
    fb.broken = True
    rig = Rig(bus_prefix, sqlite_store, fallback=fb)
    rig.send(make_events(30))

    assert rig.worker.process_once(0.0) == 5
    assert rig.breaker.state is BreakerState.OPEN
    assert rig.worker.fallback_failures == 1 and rig.worker.handed_back == 2 and rig.worker.fallback_scored == 0
    assert rig.worker.process_once(0.0) == 0
    assert rig.consumer.paused and rig.worker.pauses == 1
    rig.advance(5.0)
    assert rig.worker.process_once(0.0) == 0 and rig.depth() == 30 and rig.dead() == 0

    # The next open period gives the fallback another chance; now it works: nothing waits.
    fb.broken = False
    rig.advance(5.0)  # half-open: the trial fails, the breaker opens again
    rig.worker.process_once(0.0)
    assert rig.breaker.state is BreakerState.OPEN
    rig.run_until_idle()
    rig.advance(2.5)
    rig.run_until_idle()
    assert rig.depth() == 0 and rig.dead() == 0 and rig.worker.scored == 30


def test_fallback_from_settings_is_a_rules_model() -> None:
    sc = ScoringSettings.model_validate({
        "model": "online-anomaly",
        "fallback": "guard",
        "models": {"guard": {"kind": "rules", "options": {"default": 0.1,
                                                            "rules": [{"when": "data.amount > 5000", "score": 0.9,
                                                                       "reason": "large"}]}}},
    })
    fb = build_fallback(sc)
    assert fb is not None and fb.name == "guard" and fb.version.startswith("rules-")
    assert build_fallback(ScoringSettings()) is None
