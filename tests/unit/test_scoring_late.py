"""The scoring deadline (issue 7): ``scoring.late_after`` routes events that waited too long for
their score to the late queue, and an open breaker without a fallback parks events in the retry
levels (no attempt counted) instead of pausing intake, so no event waits past its deadline."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from gateway.bus import InMemoryBus, Message, Outcome, QueueSpec, Topology
from gateway.bus.memory import InMemoryConsumer
from gateway.bus.protocols import PUBLISHED_AT_HEADER
from gateway.config import BusSettings, RelaySettings, ScoringSettings
from gateway.events import Event
from gateway.relay import Relay
from gateway.resilience import BreakerState, CircuitBreaker
from gateway.scoring import ScoringWorker
from gateway.scoring.resilience import scorer_breaker_policy
from gateway.store import EventStore
from tests.unit.test_scoring_backpressure import POLICY, SCHEDULE, Clock, Model, SpyPublisher
from tests.unit.test_scoring_worker import TEST_QUEUE, make_events

EPOCH = 1_800_000_000.0  # wall-clock seconds at fake time 0
LATE_AFTER = 30.0


class Rig:
    def __init__(self, prefix: str, store: EventStore, *, late_after: float | None = LATE_AFTER) -> None:
        self.clock = Clock()  # one fake clock: bus TTLs, the breaker, the worker's wall clock
        self.topo = Topology(prefix, delivery_limit=50, retry_ttls_ms=SCHEDULE.level_ttls_ms(3),
                             late=late_after is not None)
        self.bus = InMemoryBus(self.topo, clock=self.clock)
        self.bus.declare_topology()
        self.bus.declare_queue(QueueSpec(TEST_QUEUE, {}, ((self.topo.scored_exchange, "#"),)))
        self.consumer: InMemoryConsumer = self.bus.consumer(self.topo.scoring_queue, prefetch=32)
        self.model = Model()
        self.model.down = False
        self.breaker = CircuitBreaker("scorer:ext-model", scorer_breaker_policy(POLICY), clock=self.clock)
        self.publisher = SpyPublisher(self.bus.publisher())
        self.store = store
        self.worker = ScoringWorker(
            self.consumer, self.publisher, store, self.model, self.topo, batch_max=5, batch_linger_ms=0,
            max_attempts=3, publish_timeout=1.0, sleep=lambda s: None, retry=SCHEDULE, breaker=self.breaker,
            score_timeout=None, prefetch=32, rng=random.Random(3).random, late_after=late_after,
            clock=lambda: datetime.fromtimestamp(EPOCH + self.clock.t, UTC),
        )

    def send(self, events: list[Event], published_at: float | None) -> None:
        """Publish as the relay does; ``published_at`` in fake seconds (None: no stamp, a foreign publisher)."""
        headers = {} if published_at is None else {PUBLISHED_AT_HEADER: int((EPOCH + published_at) * 1000)}
        msgs = [Message(e.to_json(), e.type, e.id, headers=headers) for e in events]
        assert set(self.bus.publisher().publish(self.topo.events_exchange, msgs).result()) == {Outcome.ACK}

    def advance(self, seconds: float) -> None:
        self.clock.t += seconds
        self.bus.expire()

    def run_until_idle(self, limit: int = 500) -> None:
        for _ in range(limit):
            if self.worker.process_once(0.0) == 0:
                return
        raise AssertionError("worker did not go idle")

    def late_messages(self) -> list[tuple[str, dict[str, object]]]:
        con = self.bus.consumer(self.topo.late_queue, prefetch=10_000)
        got = con.get_batch(10_000, 0.0, 0.0)
        con.ack(got)
        con.close()
        return [(d.message_id, dict(d.headers)) for d in got]

    def depth(self, queue: str) -> int:
        return self.bus.queue_depth(queue)


@pytest.fixture
def rig(bus_prefix: str, sqlite_store: EventStore) -> Rig:
    return Rig(bus_prefix, sqlite_store)


def test_events_past_the_deadline_go_to_the_late_queue_the_others_are_scored(rig: Rig) -> None:
    old, fresh, foreign = make_events(4), make_events(6, start=100), make_events(2, start=200)
    rig.clock.t = 100.0
    rig.send(old, published_at=100.0 - LATE_AFTER - 5)  # waited 35 s
    rig.send(fresh, published_at=100.0 - 1)
    rig.send(foreign, published_at=None)  # no relay stamp: no deadline
    rig.run_until_idle()
    assert rig.worker.late == 4 and rig.worker.scored == 8
    assert set(rig.model.scored) == {e.id for e in fresh + foreign}
    late = rig.late_messages()
    assert sorted(mid for mid, _ in late) == sorted(e.id for e in old)
    assert all(h["x-gw-late-by-ms"] == 5000 and PUBLISHED_AT_HEADER in h for _, h in late)
    assert rig.depth(rig.topo.scoring_queue) == 0 and rig.store.list_dead_letters() == []


def test_open_breaker_without_fallback_parks_events_until_the_trial_or_their_deadline(rig: Rig) -> None:
    rig.model.down = True
    events = make_events(20)
    rig.send(events, published_at=0.0)
    rig.run_until_idle()  # the first batch fails (retried), the breaker opens, the rest is parked
    assert rig.breaker.state is BreakerState.OPEN
    assert not rig.consumer.paused and rig.worker.pauses == 0  # no pause: parked instead
    parked = [m for ex, m in rig.publisher.sent if ex == rig.topo.retry_exchange and "x-gw-parked" in m.headers]
    assert len(parked) == rig.worker.parked > 0
    # Parked until the trial (10 s) or the deadline (30 s after publish), the first of them.
    assert all(m.expiration_ms is not None and m.expiration_ms <= 10_000 for m in parked)
    assert all("x-gw-attempts" not in m.headers for m in parked)  # not an attempt
    # The model stays down: every event comes back, is parked again, and is late at 30 s -- or,
    # if it was tried in a half-open trial max_attempts times, dead-lettered. None waits longer.
    for _ in range(40):
        rig.advance(1.0)
        rig.run_until_idle()
    dead = rig.store.list_dead_letters()
    assert all("scoring failed 3 times" in d.reason for d in dead)
    late = sorted(mid for mid, _ in rig.late_messages())
    assert rig.worker.late == len(late) >= 15 and rig.model.scored == {}
    assert sorted(late + [d.event_id for d in dead]) == sorted(e.id for e in events)
    assert rig.depth(rig.topo.scoring_queue) == 0
    assert sum(rig.depth(q.name) for q in rig.topo.retry_queues()) == 0


def test_parked_events_are_scored_once_when_the_model_recovers_before_their_deadline(rig: Rig) -> None:
    rig.model.down = True
    events = make_events(12)
    rig.send(events, published_at=0.0)
    rig.run_until_idle()
    assert rig.breaker.state is BreakerState.OPEN and rig.worker.parked > 0
    rig.model.down = False
    for _ in range(25):  # the trial at 10 s closes the breaker; every event is scored before 30 s
        rig.advance(1.0)
        rig.run_until_idle()
    assert rig.model.scored == {e.id: 1 for e in events}
    assert rig.worker.late == 0 and rig.breaker.state is BreakerState.CLOSED


def test_without_a_deadline_the_open_breaker_pauses_intake_as_before(bus_prefix: str, sqlite_store: EventStore) -> None:
    rig = Rig(bus_prefix, sqlite_store, late_after=None)
    rig.model.down = True
    rig.send(make_events(20), published_at=0.0)
    rig.run_until_idle()
    assert rig.consumer.paused and rig.worker.parked == 0 and rig.worker.late == 0


def test_late_routing_needs_the_late_topology(bus_prefix: str, sqlite_store: EventStore) -> None:
    topo = Topology(bus_prefix)
    bus = InMemoryBus(topo)
    bus.declare_topology()
    with pytest.raises(ValueError, match="late exchange"):
        ScoringWorker(bus.consumer(topo.scoring_queue, 1), bus.publisher(), sqlite_store, Model(), topo, late_after=5.0)


def test_the_topology_declares_the_late_exchange_and_queue_only_with_a_deadline() -> None:
    with_late = Topology.from_settings(BusSettings(), ScoringSettings(late_after=60))
    without = Topology.from_settings(BusSettings(), ScoringSettings())
    assert (with_late.late_exchange, "topic") in with_late.exchanges()
    assert with_late.late_queue in {q.name for q in with_late.queues()}
    assert with_late.late_exchange not in {n for n, _ in without.exchanges()}


def test_the_relay_stamps_when_it_published(bus_prefix: str, sqlite_store: EventStore) -> None:
    topo = Topology(bus_prefix)
    bus = InMemoryBus(topo)
    bus.declare_topology()
    spy = SpyPublisher(bus.publisher())
    sqlite_store.accept(make_events(3), source_name="orders")
    before = int(datetime.now(UTC).timestamp() * 1000)
    Relay(sqlite_store, spy, topo, RelaySettings(), publish_timeout=5).run_once()
    after = int(datetime.now(UTC).timestamp() * 1000)
    stamps = [m.headers[PUBLISHED_AT_HEADER] for _, m in spy.sent]
    assert len(stamps) == 3 and all(before <= s <= after for s in stamps)
