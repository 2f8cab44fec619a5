"""Dead-letter replay through the outbox and the broker DLQ drain (gateway.deadletters), on SQLite
and the in-process bus. REL-13: replaying never creates a second outbox row or score."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import func, select, update

from adapters.base import Record
from gateway.bus import InMemoryBus, Message, Outcome, Topology
from gateway.config import Settings
from gateway.deadletters import (
    DeadLetterDrain,
    DeadLetterReplayer,
    DeadLetterSelection,
    TokenBucket,
    broker_dead_letter,
)
from gateway.errors import ContractError, StoreUnavailableError
from gateway.events import Event, event_id, jsonable
from gateway.events.jsonsafe import dumps
from gateway.events.scored import scored_event
from gateway.sources.mapping import Mapper
from gateway.store import EventStore
from gateway.store.schema import EVENT_PENDING, EVENT_PUBLISHED, dead_letters, events

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def make_event(i: int, source: str = "orders") -> Event:
    return Event(
        id=event_id(source, "order", i, "v1"), source=f"/legacy-gateway/sources/{source}",
        type="com.acme.order.changed", time=T0, subject=f"order/{i}", data={"id": i, "amount": "1.50"},
        extensions={"sourcename": source},
    )


def publish_all(store: EventStore) -> None:
    """What the relay does: claim every pending row and mark it published (after a broker ack)."""
    rows = store.claim_pending("relay-test", 10_000, 30)
    store.mark_published([r.seq for r in rows])


def outbox(store: EventStore) -> dict[str, Any]:
    with store.engine.connect() as conn:
        return {r.id: r for r in conn.execute(select(events)).all()}


def dead_count(store: EventStore) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(dead_letters)).scalar_one())


def scoring_dead_letter(store: EventStore, ev: Event) -> int:
    """A dead letter as the scorer writes it after max_attempts failures."""
    return store.add_dead_letter(
        stage="scoring", error_class="RuntimeError", reason="scoring failed 3 times: RuntimeError: boom",
        payload=ev.to_json().decode(), event_id=ev.id, source_name=ev.source_name,
        headers={"x-delivery-count": 2}, attempts=3,
    )


# The source mapping: version 1 (what the runner used) needs 'id'; version 2 (the fix) reads 'order_no'.
MAPPING_V1 = {"type": "com.acme.order.changed", "entity": "order", "key": ["id"], "version": "rev"}
MAPPING_V2 = {**MAPPING_V1, "key": ["order_no"]}


def settings_with(mapping: dict[str, Any]) -> Settings:
    return Settings(sources=[{
        "name": "orders", "adapter": "sql", "mapping": mapping,
        "config": {"url": "sqlite://", "table": "legacy_orders", "mode": "timestamp_key",
                   "timestamp_column": "rev", "key_column": "order_no"},
    }])


def park_record(store: EventStore, data: dict[str, Any], position: Any = None) -> int:
    """Map a record with mapping v1 like the source runner does; park it the same way when it fails."""
    src = settings_with(MAPPING_V1).sources[0]
    try:
        Mapper(src.mapping, src.name, "sql").to_event(Record(data=data, position=position))
    except ContractError as exc:
        store.accept([], source_name="orders", rejects=[{
            "stage": "source", "source_name": "orders", "error_class": type(exc).__name__, "reason": str(exc),
            "payload": dumps(jsonable({"data": data, "position": position})).decode(),
        }])
        return store.list_dead_letters()[-1].id
    raise AssertionError("the record maps with v1")


def replayer(store: EventStore, mapping: dict[str, Any] = MAPPING_V2, **kw: Any) -> DeadLetterReplayer:
    kw.setdefault("rate", None)
    return DeadLetterReplayer(store, settings_with(mapping).sources, **kw)


def ids(*dl: int) -> DeadLetterSelection:
    return DeadLetterSelection(ids=dl)


# ---------------------------------------------------------------------------- replay
def test_event_in_the_outbox_is_set_back_to_pending_and_the_dead_letter_marked(sqlite_store: EventStore) -> None:
    ev = make_event(1)
    sqlite_store.accept([ev], source_name="orders")
    publish_all(sqlite_store)
    with sqlite_store.engine.begin() as conn:  # a failed publish attempt and a stale claim before
        conn.execute(update(events).values(attempts=4, claimed_by="old", last_error="nack"))
    dl = scoring_dead_letter(sqlite_store, ev)

    report = replayer(sqlite_store).replay(ids(dl))
    assert (report.replayed, report.skipped, report.failed) == (1, 0, 0)
    (item,) = report.items
    assert (item.outcome, item.event_ids) == ("requeued", (ev.id,))
    row = outbox(sqlite_store)[ev.id]
    assert (row.status, row.attempts, row.claimed_by, row.claimed_until, row.last_error) == (EVENT_PENDING, 0, None, None, None)
    assert row.next_attempt_at <= datetime.now(UTC)
    assert len(outbox(sqlite_store)) == 1
    d = sqlite_store.get_dead_letter(dl)
    assert d is not None and d.state == "replayed" and d.replay_count == 1 and d.last_replay_outcome == "requeued"
    assert d.replayed_at is not None and ev.id in (d.last_replay_detail or "")
    # The relay picks it up again.
    assert [r.id for r in sqlite_store.claim_pending("relay-2", 10, 30)] == [ev.id]


def test_a_cloudevent_payload_is_accepted_once_and_replays_are_idempotent(sqlite_store: EventStore) -> None:
    ev = make_event(2)
    dl = sqlite_store.add_dead_letter(stage="broker", error_class="delivery_limit", reason="x",
                                      payload=ev.to_json().decode(), event_id=ev.id)
    rp = replayer(sqlite_store)
    first = rp.replay(ids(dl))
    assert [(i.outcome, i.event_ids) for i in first.items] == [("accepted", (ev.id,))]
    assert list(outbox(sqlite_store)) == [ev.id] and outbox(sqlite_store)[ev.id].source_name == "orders"

    second = rp.replay(ids(dl))  # replayed already: skipped, nothing written
    assert (second.replayed, second.skipped) == (0, 1) and "replayed already" in second.items[0].detail
    assert sqlite_store.get_dead_letter(dl).replay_count == 1  # type: ignore[union-attr]

    publish_all(sqlite_store)
    third = rp.replay(ids(dl), again=True)  # again: the stored event goes out again, no second row
    assert [i.outcome for i in third.items] == ["requeued"]
    assert list(outbox(sqlite_store)) == [ev.id] and outbox(sqlite_store)[ev.id].status == EVENT_PENDING
    assert sqlite_store.get_dead_letter(dl).replay_count == 2  # type: ignore[union-attr]


def test_a_replay_committed_meanwhile_by_someone_else_is_not_written_twice(sqlite_store: EventStore) -> None:
    ev = make_event(3)
    dl = sqlite_store.add_dead_letter(stage="broker", error_class="rejected", reason="x", payload=ev.to_json().decode())
    assert sqlite_store.replay_dead_letter(dl, events_in=[ev]) is not None
    publish_all(sqlite_store)
    assert sqlite_store.replay_dead_letter(dl, events_in=[ev]) is None  # lost the race: rolled back
    assert outbox(sqlite_store)[ev.id].status == EVENT_PUBLISHED  # the rollback left the outbox alone
    assert sqlite_store.get_dead_letter(dl).replay_count == 1  # type: ignore[union-attr]


def test_a_source_record_is_mapped_again_with_the_current_mapping(sqlite_store: EventStore) -> None:
    dl = park_record(sqlite_store, {"order_no": 7, "rev": "2024-01-01T00:00:00Z", "amount": "9.99"}, {"ts": "t", "key": 7})
    before = sqlite_store.get_dead_letter(dl)
    assert before is not None and before.error_class == "ContractError" and "no field 'id'" in before.reason

    report = replayer(sqlite_store).replay(ids(dl))
    expected = event_id("orders", "order", 7, "2024-01-01T00:00:00Z")
    assert [(i.outcome, i.event_ids) for i in report.items] == [("accepted", (expected,))]
    assert "current mapping of source 'orders'" in report.items[0].detail
    stored = sqlite_store.get_event(expected)
    assert stored is not None and stored.event["data"]["order_no"] == 7 and stored.event["sourceposition"] == '{"ts":"t","key":7}'
    after = sqlite_store.get_dead_letter(dl)
    assert after is not None and after.event_id == expected and after.state == "replayed"

    # Replaying it again publishes the same event again: still one outbox row.
    again = replayer(sqlite_store).replay(ids(dl), again=True)
    assert [i.outcome for i in again.items] == ["requeued"] and list(outbox(sqlite_store)) == [expected]


def test_a_record_the_current_mapping_still_rejects_stays_one_dead_letter_with_the_new_error(sqlite_store: EventStore) -> None:
    dl = park_record(sqlite_store, {"ref": 1, "rev": "r"})
    report = replayer(sqlite_store).replay(ids(dl))  # v2 needs 'order_no', which the record lacks too
    (item,) = report.items
    assert item.outcome == "failed" and report.failed == 1
    assert f"dead letter {dl} (stage source)" in item.detail and "no field 'order_no'" in item.detail
    d = sqlite_store.get_dead_letter(dl)
    assert d is not None and d.state == "open" and d.attempts == 2 and "no field 'order_no'" in d.reason
    assert (d.replay_count, d.last_replay_outcome, d.event_id) == (1, "failed", None)
    assert dead_count(sqlite_store) == 1 and outbox(sqlite_store) == {}
    # Once the mapping fits, the same row is replayed.
    fixed = replayer(sqlite_store, {**MAPPING_V1, "key": ["ref"]}).replay(ids(dl))
    assert [i.outcome for i in fixed.items] == ["accepted"] and dead_count(sqlite_store) == 1


@pytest.mark.parametrize(
    ("row", "why"),
    [
        ({"stage": "source", "source_name": "orders", "error_class": "SoapFaultError", "reason": "fault",
          "payload": '{"cursor": {"page": 3}, "error": {"class": "SoapFaultError"}}'},
         ("permanent read failure of source 'orders' at a cursor, not a record: fix the cause, then run "
          "`gateway sources resume orders`")),
        ({"stage": "source", "source_name": "queue", "error_class": "DecodeError", "reason": "bad sign nibble",
          "payload": "\\u00c1", "headers": {"position": {"offset": 4}}},
         "raw item the adapter could not decode (DecodeError)"),
        ({"stage": "source", "source_name": "elsewhere", "error_class": "ContractError", "reason": "no field",
          "payload": '{"data": {"x": 1}}'},
         "source 'elsewhere' is not configured here"),
        ({"stage": "bridge", "error_class": "EncodeError", "reason": "too wide", "payload": "{}", "event_id": "s-1"},
         "scored event the bridge could not encode"),
        ({"stage": "scoring", "error_class": "ContractError", "reason": "unparseable", "payload": "{not json",
          "event_id": "poison-1"},
         "its payload is not a CloudEvent"),
        ({"stage": "broker", "error_class": "rejected", "reason": "r", "payload": None},
         "it has no payload"),
    ],
)
def test_what_cannot_be_replayed_fails_with_a_reason_naming_id_and_stage(
    sqlite_store: EventStore, row: dict[str, Any], why: str
) -> None:
    dl = sqlite_store.add_dead_letter(**row)
    report = replayer(sqlite_store).replay(ids(dl))
    (item,) = report.items
    assert item.outcome == "failed" and item.detail.startswith(f"dead letter {dl} (stage {row['stage']}) cannot be replayed: ")
    assert why in item.detail
    d = sqlite_store.get_dead_letter(dl)
    assert d is not None and d.state == "open" and d.attempts == 1 and d.last_replay_outcome == "failed"
    assert outbox(sqlite_store) == {}


def test_a_scored_event_is_not_replayed_as_a_new_event(sqlite_store: EventStore) -> None:
    original = make_event(4)
    scored = scored_event(original, score=0.9, model_name="m", model_version="1")
    dl = sqlite_store.add_dead_letter(stage="broker", error_class="delivery_limit", reason="r",
                                      payload=scored.to_json().decode(), event_id=scored.id)
    (item,) = replayer(sqlite_store).replay(ids(dl)).items
    assert item.outcome == "failed" and f"scored event (of event {original.id})" in item.detail


def test_unknown_ids_are_reported(sqlite_store: EventStore) -> None:
    report = replayer(sqlite_store).replay(ids(999, 1000))
    assert report.not_found == [999, 1000] and report.failed == 2 and report.items == []


def test_dry_run_writes_nothing_and_predicts_the_outcomes(sqlite_store: EventStore) -> None:
    stored, fresh = make_event(5), make_event(6)
    sqlite_store.accept([stored], source_name="orders")
    publish_all(sqlite_store)
    rows = [
        scoring_dead_letter(sqlite_store, stored),
        sqlite_store.add_dead_letter(stage="broker", error_class="rejected", reason="r", payload=fresh.to_json().decode()),
        park_record(sqlite_store, {"order_no": 8, "rev": "r8"}),
        park_record(sqlite_store, {"nothing": 1}),
    ]
    before_dead = sqlite_store.list_dead_letters()
    before_outbox = {k: tuple(v) for k, v in outbox(sqlite_store).items()}

    preview = replayer(sqlite_store).replay(ids(*rows), dry_run=True)
    assert preview.dry_run and [i.outcome for i in preview.items] == ["requeued", "accepted", "accepted", "failed"]
    assert preview.items[0].detail.startswith("would be requeued")
    assert sqlite_store.list_dead_letters() == before_dead
    assert {k: tuple(v) for k, v in outbox(sqlite_store).items()} == before_outbox

    real = replayer(sqlite_store).replay(ids(*rows))
    assert [(i.outcome, i.event_ids) for i in real.items] == [(i.outcome, i.event_ids) for i in preview.items]


def test_selection_by_filters_and_state(sqlite_store: EventStore) -> None:
    a, b, c = make_event(10), make_event(11, source="billing"), make_event(12)
    dls = [
        sqlite_store.add_dead_letter(stage="broker", error_class="rejected", reason="r", payload=a.to_json().decode(),
                                     source_name="orders"),
        sqlite_store.add_dead_letter(stage="broker", error_class="rejected", reason="r", payload=b.to_json().decode(),
                                     source_name="billing"),
        sqlite_store.add_dead_letter(stage="broker", error_class="delivery_limit", reason="r",
                                     payload=c.to_json().decode(), source_name="orders"),
    ]
    rp = replayer(sqlite_store)
    report = rp.replay(DeadLetterSelection(stage="broker", source_name="orders", error_class="rejected"))
    assert [i.id for i in report.items] == [dls[0]]
    assert [d.id for d in sqlite_store.list_dead_letters(state="open")] == dls[1:]
    assert [d.id for d in sqlite_store.list_dead_letters(state="replayed")] == [dls[0]]
    assert sqlite_store.count_dead_letters(state="open", source_name="orders") == 1
    # By default a filter selects open rows; with again also replayed ones; limit caps the selection.
    assert [i.id for i in rp.replay(DeadLetterSelection(stage="broker"), dry_run=True).items] == dls[1:]
    assert [i.id for i in rp.replay(DeadLetterSelection(stage="broker"), again=True, dry_run=True).items] == dls
    assert [i.id for i in rp.replay(DeadLetterSelection(limit=2), again=True, dry_run=True).items] == dls[:2]
    with pytest.raises(ValueError, match="state"):
        sqlite_store.list_dead_letters(state="closed")


# ---------------------------------------------------------------------------- rate limit
class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_token_bucket_spaces_acquisitions_and_allows_bursts() -> None:
    t = FakeTime()
    bucket = TokenBucket(4.0, clock=t.clock, sleep=t.sleep)
    stamps = []
    for _ in range(9):
        bucket.acquire()
        stamps.append(t.now)
    assert stamps[0] == 100.0 and all(b - a == pytest.approx(0.25) for a, b in zip(stamps, stamps[1:]))
    t.now += 10  # idle: the bucket refills only up to its burst
    burst = TokenBucket(4.0, burst=3, clock=t.clock, sleep=t.sleep)
    t.now += 10
    start = t.now
    for _ in range(5):
        burst.acquire()
    assert t.now - start == pytest.approx(0.5)  # 3 at once, then 2 more at 4/s
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_replay_is_paced_by_rate_with_an_injected_clock(sqlite_store: EventStore) -> None:
    t = FakeTime()
    written: list[float] = []
    rows = [sqlite_store.add_dead_letter(stage="broker", error_class="rejected", reason="r",
                                         payload=make_event(20 + i).to_json().decode()) for i in range(10)]
    real_replay = sqlite_store.replay_dead_letter

    def spy(*args: Any, **kw: Any) -> Any:
        written.append(t.now)
        return real_replay(*args, **kw)

    sqlite_store.replay_dead_letter = spy  # type: ignore[method-assign]
    skipped = rows[0]
    sqlite_store.replay_dead_letter(skipped, events_in=[make_event(20)])  # already replayed: takes no token
    written.clear()
    report = replayer(sqlite_store, rate=5.0, clock=t.clock, sleep=t.sleep).replay(ids(*rows))
    assert (report.replayed, report.skipped) == (9, 1)
    assert len(written) == 9 and written[-1] - written[0] == pytest.approx(8 / 5.0)
    assert all(b - a >= 0.2 - 1e-9 for a, b in zip(written, written[1:]))
    assert sum(t.sleeps) == pytest.approx(1.6)
    # A dry run does not wait.
    t.sleeps.clear()
    replayer(sqlite_store, rate=0.001, clock=t.clock, sleep=t.sleep).replay(ids(*rows), again=True, dry_run=True)
    assert t.sleeps == []


# ---------------------------------------------------------------------------- broker DLQ drain
class DrainRig:
    def __init__(self, prefix: str, store: EventStore) -> None:
        self.topo = Topology(prefix, delivery_limit=4)
        self.bus = InMemoryBus(self.topo)
        self.bus.declare_topology()
        self.store = store
        self.consumer = self.bus.consumer(self.topo.dead_letter_queue, 100)
        self.drain = DeadLetterDrain(self.consumer, store, self.topo, max_wait=0.0)

    def reject_from_scoring(self, ev: Event) -> None:
        """An event goes to the scoring queue and a consumer rejects it without requeue."""
        pub = self.bus.publisher()
        assert pub.publish(self.topo.events_exchange, [Message(ev.to_json(), ev.type, ev.id)]).result() == [Outcome.ACK]
        c = self.bus.consumer(self.topo.scoring_queue, 10)
        (d,) = c.get_batch(10, 0.0, 0.0)
        c.reject(d, requeue=False)

    def put_dead(self, body: bytes, message_id: str, headers: dict[str, Any]) -> None:
        msg = Message(body, "com.acme.order.changed", message_id, headers)
        assert self.bus.publisher().publish(self.topo.dead_letter_exchange, [msg]).result() == [Outcome.ACK]


@pytest.fixture
def drain_rig(bus_prefix: str, sqlite_store: EventStore) -> DrainRig:
    return DrainRig(bus_prefix, sqlite_store)


def test_a_rejected_message_becomes_one_broker_dead_letter_and_leaves_the_queue(drain_rig: DrainRig) -> None:
    ev = make_event(30)
    drain_rig.reject_from_scoring(ev)
    assert drain_rig.bus.queue_depth(drain_rig.topo.dead_letter_queue) == 1
    assert drain_rig.drain.run_once() == 1
    (d,) = drain_rig.store.list_dead_letters()
    assert (d.stage, d.error_class, d.event_id, d.source_name, d.attempts) == ("broker", "rejected", ev.id, "orders", 1)
    assert d.payload == ev.to_json().decode() and d.dedupe_key is not None
    assert d.headers is not None and d.headers["x-death"][0]["queue"] == drain_rig.topo.scoring_queue
    assert f"rejected on queue '{drain_rig.topo.scoring_queue}'" in d.reason
    assert drain_rig.bus.queue_depth(drain_rig.topo.dead_letter_queue) == 0
    drain_rig.consumer.close()  # nothing unacked comes back
    assert drain_rig.bus.queue_depth(drain_rig.topo.dead_letter_queue) == 0

    # Replaying it puts the event into the outbox.
    report = DeadLetterReplayer(drain_rig.store, rate=None).replay(DeadLetterSelection(stage="broker"))
    assert [(i.outcome, i.event_ids) for i in report.items] == [("accepted", (ev.id,))]


def test_a_redelivered_dlq_message_makes_no_second_row_but_a_later_death_does(drain_rig: DrainRig) -> None:
    death = {"queue": drain_rig.topo.scoring_queue, "reason": "delivery_limit", "count": 1,
             "time": datetime(2024, 1, 1, tzinfo=UTC), "exchange": "x", "routing-keys": ["k"]}
    body = make_event(31).to_json()
    drain_rig.put_dead(body, "m-31", {"x-death": [death]})
    drain_rig.put_dead(body, "m-31", {"x-death": [death], "x-delivery-count": 1})  # the same message again
    assert drain_rig.drain.run_once() == 2
    (d,) = drain_rig.store.list_dead_letters()
    assert (d.error_class, d.attempts) == ("delivery_limit", 5)  # delivery limit 4: 5 deliveries
    assert (drain_rig.drain.stats.stored, drain_rig.drain.stats.duplicates) == (1, 1)
    # The same event dead-lettered again later (another x-death time): a new row.
    drain_rig.put_dead(body, "m-31", {"x-death": [{**death, "time": datetime(2024, 1, 2, tzinfo=UTC)}]})
    drain_rig.drain.run_once()
    assert len(drain_rig.store.list_dead_letters()) == 2


def test_a_message_the_scorer_already_parked_is_not_stored_twice(drain_rig: DrainRig) -> None:
    ev = make_event(32)
    dl = scoring_dead_letter(drain_rig.store, ev)  # the scorer stores its row, then rejects
    drain_rig.reject_from_scoring(ev)
    assert drain_rig.drain.run_once() == 1
    assert [d.id for d in drain_rig.store.list_dead_letters()] == [dl]
    assert drain_rig.bus.queue_depth(drain_rig.topo.dead_letter_queue) == 0
    # Once that row is replayed, a new death of the event is a new broker row.
    DeadLetterReplayer(drain_rig.store, rate=None).replay(DeadLetterSelection(ids=(dl,)))
    drain_rig.reject_from_scoring(ev)
    drain_rig.drain.run_once()
    assert [d.stage for d in drain_rig.store.list_dead_letters()] == ["scoring", "broker"]


class FailingStore:
    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.fail = True

    def add_dead_letter_once(self, **kw: Any) -> tuple[int, bool]:
        if self.fail:
            raise StoreUnavailableError("add_dead_letter_once failed: OperationalError")
        return self.store.add_dead_letter_once(**kw)


def test_nothing_is_acked_that_is_not_stored(drain_rig: DrainRig) -> None:
    drain_rig.reject_from_scoring(make_event(33))
    flaky = FailingStore(drain_rig.store)
    drain = DeadLetterDrain(drain_rig.consumer, flaky, drain_rig.topo, max_wait=0.0)  # type: ignore[arg-type]
    assert drain.run_once() == -1 and drain.stats.store_failures == 1
    assert drain_rig.bus.queue_depth(drain_rig.topo.dead_letter_queue) == 1  # back in the queue
    assert drain_rig.store.list_dead_letters() == []
    flaky.fail = False
    assert drain.run_once() == 1 and len(drain_rig.store.list_dead_letters()) == 1
    assert drain_rig.bus.queue_depth(drain_rig.topo.dead_letter_queue) == 0


def test_broker_row_of_a_foreign_binary_message(drain_rig: DrainRig) -> None:
    from gateway.bus.protocols import Delivery

    d = Delivery(b"\xff\xfe", "", "", {"x-first-death-reason": "expired", "x-first-death-queue": "q"}, False, 1)
    row = broker_dead_letter(d, drain_rig.topo)
    assert (row["error_class"], row["event_id"], row["attempts"]) == ("expired", None, 1)
    assert row["headers"]["payload_encoding"] == "base64" and row["payload"] == "//4="
    (item,) = DeadLetterReplayer(drain_rig.store, rate=None).replay(
        DeadLetterSelection(ids=(drain_rig.store.add_dead_letter_once(**row)[0],))).items
    assert item.outcome == "failed" and "not a CloudEvent" in item.detail


# ---------------------------------------------------------------------------- embedded end to end
def test_embedded_gateway_replays_scored_events_without_a_second_score(tmp_path: Any) -> None:
    """relay + scorer on SQLite and the in-process bus; replay 5 scored events: still 5 scores."""
    from gateway.runtime import Gateway

    settings = Settings(profile="test", store={"url": f"sqlite:///{tmp_path / 'g.db'}"},
                        relay={"idle_wait": 0.02}, scoring={"warmup": 2})
    gw = Gateway(settings, roles=["relay", "scorer"])
    gw.start()
    try:
        evs = [make_event(40 + i) for i in range(5)]
        gw.store.accept(evs, source_name="orders")
        gw.wake_relay()
        assert wait(lambda: gw.store.count_scores() == 5, 20)
        scored_before = sum(w.scored for w in gw.scorers)
        dls = [scoring_dead_letter(gw.store, ev) for ev in evs]
        report = DeadLetterReplayer(gw.store, rate=None, on_replayed=gw.wake_relay).replay(DeadLetterSelection(ids=tuple(dls)))
        assert report.count("requeued") == 5
        assert wait(lambda: sum(w.scored for w in gw.scorers) >= scored_before + 5, 20)  # consumed again
        assert wait(lambda: gw.store.stats()["pending"] == 0, 10)
        time.sleep(0.2)
        assert gw.store.count_scores() == 5 and gw.store.stats()["events"] == 5
        assert all(d.state == "replayed" for d in gw.store.list_dead_letters())
        assert gw.drain is not None  # the scorer role runs the DLQ drain
    finally:
        gw.stop()


def wait(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def test_get_and_delete_by_ids(sqlite_store: EventStore) -> None:
    made = [sqlite_store.add_dead_letter(stage="broker", error_class="rejected", reason=str(i), payload=None)
            for i in range(3)]
    assert [d.id for d in sqlite_store.get_dead_letters([made[2], made[0], 999])] == [made[0], made[2]]
    assert sqlite_store.delete_dead_letters(made) == 3 and dead_count(sqlite_store) == 0
