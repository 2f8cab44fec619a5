"""The scoring worker against the in-process bus and a SQLite store (gateway.scoring.worker)."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from datetime import datetime, timezone
from typing import Any

import pytest
from cloudevents.core.formats.json import JSONFormat

from gateway.bus import InMemoryBus, Message, Outcome, QueueSpec, Topology
from gateway.bus.protocols import Delivery
from gateway.errors import StoreUnavailableError
from gateway.events import Event
from gateway.events.scored import scored_event_id
from gateway.scoring import OnlineAnomalyScorer, ScoreResult, ScoringWorker
from gateway.store import EventStore

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
TEST_QUEUE = "test.scored"


class Rig:
    """Bus with the gateway topology plus a test queue bound to the scored exchange with '#'."""

    def __init__(self, prefix: str, store: EventStore, **worker_kw: Any) -> None:
        self.topo = Topology(prefix, delivery_limit=10)
        self.bus_time = 0.0  # the bus's fake clock: drain() jumps it over retry delays (REL-08)
        self.bus = InMemoryBus(self.topo, clock=lambda: self.bus_time)
        self.bus.declare_topology()
        self.bus.declare_queue(QueueSpec(TEST_QUEUE, {}, ((self.topo.scored_exchange, "#"),)))
        self.store = store
        self.consumer = self.bus.consumer(self.topo.scoring_queue, prefetch=1000)
        self.sleeps: list[float] = []
        kw: dict[str, Any] = dict(
            batch_max=10, batch_linger_ms=0, max_attempts=3, publish_timeout=1.0, sleep=self.sleeps.append
        )
        kw.update(worker_kw)
        self.publisher = kw.pop("publisher", None) or self.bus.publisher()
        scorer = kw.pop("scorer", None) or OnlineAnomalyScorer(warmup=3)
        self.worker = ScoringWorker(self.consumer, self.publisher, kw.pop("store_override", store), scorer, self.topo, **kw)

    def send(self, events: Sequence[Event]) -> None:
        msgs = [Message(e.to_json(), e.type, e.id) for e in events]
        assert set(self.bus.publisher().publish(self.topo.events_exchange, msgs).result()) == {Outcome.ACK}

    def send_raw(self, body: bytes, key: str = "com.acme.x", msg_id: str = "raw-1") -> None:
        self.bus.publisher().publish(self.topo.events_exchange, [Message(body, key, msg_id, {"origin": "legacy"})])

    def drain(self, max_batches: int = 100) -> None:
        """Process until the scoring queue and the retry levels are empty (retry delays skipped)."""
        for _ in range(max_batches):
            if self.worker.process_once(max_wait=0.0) == 0 and not self.skip_retry_delay():
                return
        raise AssertionError("worker did not drain the queue")

    def skip_retry_delay(self) -> bool:
        """Advance the bus clock past the longest retry level's TTL; True if a retry was waiting."""
        if not any(self.depth(q.name) for q in self.topo.retry_queues()):
            return False
        self.bus_time += max(self.topo.retry_ttls_ms) / 1000.0 + 0.001
        self.bus.expire()
        return True

    def take(self, queue: str) -> list[Delivery]:
        c = self.bus.consumer(queue, prefetch=10_000)
        out = c.get_batch(10_000, 0.0, 0.0)
        c.ack(out)
        return out

    def depth(self, queue: str) -> int:
        return self.bus.queue_depth(queue)


def make_events(n: int, type_: str = "com.acme.order.changed", start: int = 0) -> list[Event]:
    return [
        Event(
            id=f"evt-{i}",
            source="/legacy-gateway/sources/orders",
            type=type_,
            time=T0,
            subject=f"order/{i}",
            data={"order_id": i, "amount": f"{10 + i % 7}.50", "status": ["new", "paid"][i % 2]},
            extensions={"sourcename": "orders"},
        )
        for i in range(start, start + n)
    ]


@pytest.fixture
def rig(bus_prefix: str, sqlite_store: EventStore) -> Rig:
    return Rig(bus_prefix, sqlite_store)


class NackPublisher:
    """Resolves every message with a fixed outcome."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.calls = 0

    def publish(self, exchange: str, messages: Sequence[Message]) -> Future[list[Outcome]]:
        self.calls += 1
        fut: Future[list[Outcome]] = Future()
        fut.set_result([self.outcome] * len(messages))
        return fut

    def close(self) -> None:
        pass


class FailingScorer:
    name, version = "failing", "1"

    def __init__(self, bad_ids: set[str] | None = None) -> None:
        self.bad_ids = bad_ids  # None: every event fails
        self.calls: dict[str, int] = {}

    def score_batch(self, events: Sequence[Event]) -> list[ScoreResult]:
        for e in events:
            self.calls[e.id] = self.calls.get(e.id, 0) + 1
        if any(self.bad_ids is None or e.id in self.bad_ids for e in events):
            raise RuntimeError("model exploded")
        return [ScoreResult(0.5, {"const": True}) for _ in events]


def test_events_in_scores_and_scored_events_out(rig: Rig) -> None:
    events = make_events(25)
    rig.send(events)
    rig.drain()
    assert rig.store.count_scores() == 25
    assert rig.depth(rig.topo.scoring_queue) == 0
    out = rig.take(TEST_QUEUE)
    assert len(out) == 25
    by_original = {}
    for d in out:
        ce = JSONFormat().read(None, d.body)  # the official SDK accepts it
        data = ce.get_data()
        assert 0.0 <= data["score"] <= 1.0
        assert data["model"] == {"name": "online-anomaly", "version": "1"}
        assert ce.get_type() == d.routing_key + ".scored"
        assert d.message_id == ce.get_id() == scored_event_id(data["event"]["id"], "online-anomaly", "1")
        by_original[data["event"]["id"]] = d
    assert {e.id: e.type for e in events} == {k: d.routing_key for k, d in by_original.items()}
    assert rig.worker.scored == 25 and rig.worker.dead_lettered == 0


def test_poison_message_is_dead_lettered_and_others_flow(rig: Rig) -> None:
    rig.send(make_events(3))
    rig.send_raw(b"{not json", msg_id="poison-1")
    rig.send(make_events(3, start=3))
    rig.drain()
    assert rig.store.count_scores() == 6
    dead = rig.store.list_dead_letters(stage="scoring")
    assert len(dead) == 1
    assert (dead[0].event_id, dead[0].error_class, dead[0].payload) == ("poison-1", "ContractError", "{not json")
    assert dead[0].headers == {"origin": "legacy"} and "JSON" in dead[0].reason
    dlq = rig.take(rig.topo.dead_letter_queue)
    assert [d.body for d in dlq] == [b"{not json"]
    assert dlq[0].headers["x-death"][0]["reason"] == "rejected"
    assert rig.worker.dead_lettered == 1 and rig.worker.scored == 6


def test_redelivered_event_keeps_one_score_row_and_the_same_scored_event(bus_prefix: str, sqlite_store: EventStore) -> None:
    # First pass: the score commits but the scored event is nacked, so the delivery comes back
    # (the "committed but not acked" crash window of REL-06).
    nack = NackPublisher(Outcome.NACK)
    rig = Rig(bus_prefix, sqlite_store, publisher=nack)
    scorer = rig.worker.scorer
    rig.send(make_events(5))
    rig.worker.process_once(0.0)
    assert sqlite_store.count_scores() == 5
    assert rig.depth(rig.topo.scoring_queue) == 5
    learned = scorer.state_dict()

    rig.worker.publisher = rig.bus.publisher()
    rig.drain()
    assert sqlite_store.count_scores() == 5
    assert rig.worker.redelivered == 5
    assert scorer.state_dict() == learned  # redeliveries were not learned twice
    bodies = [json.loads(d.body) for d in rig.take(TEST_QUEUE)]
    stored = {s["event_id"]: s for s in _scores(sqlite_store)}
    for b in bodies:
        original = b["data"]["event"]["id"]
        assert b["id"] == scored_event_id(original, "online-anomaly", "1")
        assert b["data"]["score"] == stored[original]["score"]  # the committed score, republished

    # A replay of the same event (not flagged redelivered) still gives one row.
    rig.send(make_events(5))
    rig.drain()
    assert sqlite_store.count_scores() == 5


def _scores(store: EventStore) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from gateway.store.schema import scores

    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(scores)).all()]


@pytest.mark.parametrize("outcome", [Outcome.NACK, Outcome.TIMEOUT, Outcome.LOST])
def test_unconfirmed_scored_events_are_not_acked(bus_prefix: str, sqlite_store: EventStore, outcome: Outcome) -> None:
    rig = Rig(bus_prefix, sqlite_store, publisher=NackPublisher(outcome))
    rig.send(make_events(4))
    assert rig.worker.process_once(0.0) == 4
    assert rig.depth(rig.topo.scoring_queue) == 4  # all came back
    assert rig.worker.scored == 0 and rig.worker.requeued == 4
    assert rig.sleeps  # backed off


def test_returned_scored_events_count_as_done(bus_prefix: str, sqlite_store: EventStore) -> None:
    rig = Rig(bus_prefix, sqlite_store, publisher=NackPublisher(Outcome.RETURNED))
    rig.send(make_events(4))
    rig.drain()
    assert rig.depth(rig.topo.scoring_queue) == 0 and rig.worker.scored == 4


def test_publish_future_timeout_requeues(bus_prefix: str, sqlite_store: EventStore) -> None:
    class Hanging(NackPublisher):
        def publish(self, exchange: str, messages: Sequence[Message]) -> Future[list[Outcome]]:
            return Future()  # never resolves

    rig = Rig(bus_prefix, sqlite_store, publisher=Hanging(Outcome.ACK), publish_timeout=0.05)
    rig.send(make_events(2))
    rig.worker.process_once(0.0)
    assert rig.depth(rig.topo.scoring_queue) == 2 and rig.worker.scored == 0


def test_store_failure_acks_nothing(bus_prefix: str, sqlite_store: EventStore) -> None:
    class DownStore:
        engine = sqlite_store.engine

        def save_scores(self, records: Any) -> int:
            raise StoreUnavailableError("database is down")

        def add_dead_letter(self, **kw: Any) -> int:
            raise StoreUnavailableError("database is down")

    rig = Rig(bus_prefix, sqlite_store, store_override=DownStore())
    rig.send(make_events(4))
    rig.send_raw(b"garbage")
    rig.worker.process_once(0.0)
    assert rig.depth(rig.topo.scoring_queue) == 5  # poison included: no dead letter without its row
    assert rig.depth(TEST_QUEUE) == 0 and rig.depth(rig.topo.dead_letter_queue) == 0
    assert rig.worker.store_failures == 1 and rig.sleeps


def test_scorer_that_always_raises_is_dead_lettered_after_max_attempts(bus_prefix: str, sqlite_store: EventStore) -> None:
    scorer = FailingScorer()
    rig = Rig(bus_prefix, sqlite_store, scorer=scorer, max_attempts=3)
    rig.send(make_events(1))
    rig.drain()
    assert scorer.calls == {"evt-0": 3}
    dead = sqlite_store.list_dead_letters(stage="scoring")
    assert [(d.event_id, d.error_class, d.attempts) for d in dead] == [("evt-0", "RuntimeError", 3)]
    assert len(rig.take(rig.topo.dead_letter_queue)) == 1
    assert rig.depth(rig.topo.scoring_queue) == 0 and sqlite_store.count_scores() == 0


def test_one_failing_event_does_not_block_the_others(bus_prefix: str, sqlite_store: EventStore) -> None:
    scorer = FailingScorer(bad_ids={"evt-2"})
    rig = Rig(bus_prefix, sqlite_store, scorer=scorer, max_attempts=2)
    rig.send(make_events(6))
    rig.drain()
    assert sqlite_store.count_scores() == 5
    assert [d.event_id for d in sqlite_store.list_dead_letters()] == ["evt-2"]
    assert rig.depth(TEST_QUEUE) == 5 and rig.worker.dead_lettered == 1


def test_order_is_commit_then_publish_then_ack(bus_prefix: str, sqlite_store: EventStore) -> None:
    log: list[str] = []
    rig = Rig(bus_prefix, sqlite_store)
    real_save, real_publish, real_ack = sqlite_store.save_scores, rig.publisher.publish, rig.consumer.ack
    sqlite_store.save_scores = lambda r: (log.append("save"), real_save(r))[1]  # type: ignore[method-assign]
    rig.publisher.publish = lambda ex, m: (log.append("publish"), real_publish(ex, m))[1]  # type: ignore[method-assign]
    rig.consumer.ack = lambda d: (log.append("ack"), real_ack(d))[1]  # type: ignore[method-assign]
    rig.send(make_events(3))
    rig.worker.process_once(0.0)
    assert log == ["save", "publish", "ack"]


def test_run_stops_gracefully(rig: Rig) -> None:
    stop = threading.Event()
    t = threading.Thread(target=rig.worker.run, args=(stop,))
    t.start()
    rig.send(make_events(20))
    for _ in range(200):
        if rig.worker.scored == 20:
            break
        threading.Event().wait(0.01)
    stop.set()
    t.join(timeout=5)
    assert not t.is_alive()
    assert rig.worker.scored == 20 and rig.store.count_scores() == 20


class CountingScorer:
    """Scores every event with a new value each call, remembering how often each event was scored."""

    name, version = "counting", "1"

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def score_batch(self, events: Sequence[Event]) -> list[ScoreResult]:
        out = []
        for ev in events:
            self.calls[ev.id] = self.calls.get(ev.id, 0) + 1
            out.append(ScoreResult(min(1.0, 0.1 * self.calls[ev.id]), None))
        return out


def test_a_duplicate_first_delivery_republishes_the_committed_score(bus_prefix: str, sqlite_store: EventStore) -> None:
    # A relay killed between the broker's confirm and marking its rows published sends them again:
    # the copies are first deliveries (not flagged redelivered), and must not be scored again.
    scorer = CountingScorer()
    rig = Rig(bus_prefix, sqlite_store, scorer=scorer)
    events = make_events(5)
    rig.send(events)
    rig.drain()
    rig.send(events)  # the relay's second copy
    rig.send(events[:2] + events[:2])  # and duplicates inside one batch
    rig.drain()
    assert all(n == 1 for n in scorer.calls.values()) and len(scorer.calls) == 5
    assert sqlite_store.count_scores() == 5
    out = rig.take(TEST_QUEUE)
    assert len(out) == 14
    by_id: dict[str, set[bytes]] = {}
    for d in out:
        by_id.setdefault(d.message_id, set()).add(d.body)
    assert len(by_id) == 5 and all(len(bodies) == 1 for bodies in by_id.values())  # identical copies


def test_a_concurrent_duplicate_publishes_the_score_that_won_the_insert(bus_prefix: str, sqlite_store: EventStore) -> None:
    scorer = CountingScorer()
    rig = Rig(bus_prefix, sqlite_store, scorer=scorer)
    [ev] = make_events(1)
    real = sqlite_store.get_scores

    def late_lookup(ids: Any, name: str, version: str) -> Any:
        # The first look-up misses: another worker commits its score meanwhile (here: before ours).
        sqlite_store.get_scores = real  # type: ignore[method-assign]
        from gateway.store.repository import ScoreRecord

        sqlite_store.save_scores([ScoreRecord(ev.id, "counting", "1", 0.77, None, ev.type, "orders", ev.time, T0)])
        return {}

    sqlite_store.get_scores = late_lookup  # type: ignore[method-assign]
    rig.send([ev])
    rig.drain()
    [out] = rig.take(TEST_QUEUE)
    assert json.loads(out.body)["data"]["score"] == 0.77  # not our own 0.1: every copy is identical
    assert sqlite_store.count_scores() == 1


class Die(BaseException):
    """Stands for the process dying inside the model (os._exit, a segfault)."""


class PoisonScorer(CountingScorer):
    def __init__(self, poison: str) -> None:
        super().__init__()
        self.poison = poison
        self.batches: list[list[str]] = []

    def score_batch(self, events: Sequence[Event]) -> list[ScoreResult]:
        self.batches.append([e.id for e in events])
        if any(e.id == self.poison for e in events):
            raise Die(self.poison)
        return super().score_batch(events)


def test_a_crash_loop_is_stopped_after_max_attempts_without_taking_the_batch_mates(
    bus_prefix: str, sqlite_store: EventStore
) -> None:
    """REL-07 in one process: each "process" dies on the poison; its replacement is a new worker on
    a new consumer (the dead one's deliveries come back redelivered)."""
    topo = Topology(bus_prefix, delivery_limit=10)
    bus = InMemoryBus(topo)
    bus.declare_topology()
    bus.declare_queue(QueueSpec(TEST_QUEUE, {}, ((topo.scored_exchange, "#"),)))
    events = make_events(8)
    poison = events[5].id
    msgs = [Message(e.to_json(), e.type, e.id) for e in events]
    assert set(bus.publisher().publish(topo.events_exchange, msgs).result()) == {Outcome.ACK}
    scorer = PoisonScorer(poison)
    crashes = 0
    for _run in range(6):
        consumer = bus.consumer(topo.scoring_queue, prefetch=100)
        worker = ScoringWorker(consumer, bus.publisher(), sqlite_store, scorer, topo, batch_max=100,
                               batch_linger_ms=0, max_attempts=3, sleep=lambda _s: None)
        try:
            while worker.process_once(max_wait=0.0):
                pass
        except Die:
            crashes += 1
            consumer.close()  # the process is gone: the broker takes its deliveries back
            continue
        break
    assert crashes == 3  # first delivery, then two recorded started attempts; the fourth is refused
    assert sqlite_store.count_scores() == 7 and set(scorer.calls) == {e.id for e in events} - {poison}
    [row] = sqlite_store.list_dead_letters()
    assert (row.event_id, row.error_class, row.attempts) == (poison, "ScorerCrashLoop", 3)
    assert sqlite_store.scoring_attempts([e.id for e in events]) == {}  # nothing left behind
    # After the second crash the batch-mates were scored alone, never again with the poison.
    assert [b for b in scorer.batches if poison in b][-1] == [poison]


def test_scoring_metrics_record_calls_scores_and_outcomes(bus_prefix: str, sqlite_store: EventStore) -> None:
    from prometheus_client import CollectorRegistry

    from gateway.metrics import ScoringMetrics

    registry = CollectorRegistry()
    rig = Rig(bus_prefix, sqlite_store, metrics=ScoringMetrics(registry), scorer=FailingScorer({"evt-2"}))
    rig.send(make_events(5))
    rig.drain()

    def value(name: str, **labels: str) -> float:
        got = registry.get_sample_value(name, labels)
        return 0.0 if got is None else got

    assert value("gateway_scoring_events_total", outcome="scored") == 4
    assert value("gateway_scoring_events_total", outcome="retried") == 2  # evt-2: attempts 1 and 2
    assert value("gateway_scoring_events_total", outcome="dead_lettered") == 1  # then attempt 3
    # Calls that answered: the batch of 5 failed (not observed), then one by one.
    assert value("gateway_scoring_batch_size_count", model="failing") == value("gateway_scoring_call_seconds_count", model="failing")
    assert value("gateway_scoring_score_count", model="failing") == 4
    assert value("gateway_scoring_score_bucket", model="failing", le="1.0") == 4
