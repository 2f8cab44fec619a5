"""The store's acceptance point, claims and idempotency -- on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import dataclasses

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from gateway.errors import FencingError, StoreUnavailableError
from gateway.events import Event, event_id, utcnow
from gateway.store import EventFilter, EventStore, ScoreRecord


def ev(i: int, version: int = 1, type_: str = "t.a", source: str = "src") -> Event:
    return Event(
        id=event_id(source, "row", i, version),
        source=f"/legacy-gateway/sources/{source}",
        type=type_,
        time=datetime(2024, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=i),
        data={"i": i, "v": version},
        extensions={"sourcename": source},
    )


def test_accept_is_idempotent_and_writes_cursor(any_store: EventStore) -> None:
    epoch = any_store.try_acquire_lease("src", "me", 30)
    assert epoch == 1
    first = any_store.accept([ev(i) for i in range(10)], source_name="src", cursor={"key": 9}, epoch=epoch, write_cursor=True)
    assert len(first.inserted) == 10 and not first.duplicates
    again = any_store.accept([ev(i) for i in range(12)] + [ev(0)], source_name="src", cursor={"key": 11}, epoch=epoch, write_cursor=True)
    assert sorted(again.inserted) == sorted([ev(10).id, ev(11).id])
    assert len(again.duplicates) == 10  # each id once, in batch order
    assert again.duplicates[0] == ev(0).id
    cur = any_store.get_cursor("src")
    assert cur is not None and cur.cursor == {"key": 11} and cur.events_total == 12
    assert any_store.stats()["events"] == 12


def test_a_new_batch_goes_in_whole_and_a_repeat_within_it_falls_back_without_loss(any_store: EventStore) -> None:
    # PostgreSQL COPYs a batch straight into events and falls back to the de-duplicating path on a
    # unique violation: an id repeated inside an otherwise new batch must neither fail nor double.
    fresh = any_store.accept([ev(i) for i in range(100, 105)], source_name="src")
    assert fresh.inserted == [ev(i).id for i in range(100, 105)] and not fresh.duplicates
    mixed = any_store.accept([ev(200), ev(201), ev(200), ev(202)], source_name="src")
    assert mixed.inserted == [ev(200).id, ev(201).id, ev(202).id]  # the repeat collapses before the insert
    assert any_store.stats()["events"] == 8


def test_stale_epoch_writes_nothing(any_store: EventStore) -> None:
    old = any_store.try_acquire_lease("src", "a", 30)
    assert old is not None and any_store.release_lease("src", "a", old)
    new = any_store.try_acquire_lease("src", "b", 30)  # a new owner: a new epoch
    assert new == old + 1
    with pytest.raises(FencingError):
        any_store.accept([ev(1)], source_name="src", cursor={"key": 1}, epoch=old, write_cursor=True)
    assert any_store.stats()["events"] == 0  # the events rolled back with the refused cursor
    any_store.accept([ev(1)], source_name="src", cursor={"key": 1}, epoch=new, write_cursor=True)
    assert any_store.get_cursor("src").cursor == {"key": 1}  # type: ignore[union-attr]


def test_rejects_commit_with_the_batch(any_store: EventStore) -> None:
    any_store.accept(
        [ev(1)], source_name="src", cursor={"key": 2}, write_cursor=True,
        rejects=[{"stage": "source", "error_class": "ContractError", "reason": "bad", "payload": "{}", "source_name": "src"}],
    )
    dead = any_store.list_dead_letters()
    assert len(dead) == 1 and dead[0].reason == "bad" and dead[0].stage == "source"


def test_claims_do_not_overlap_and_expire(any_store: EventStore) -> None:
    any_store.accept([ev(i) for i in range(10)], source_name="src")
    a = any_store.claim_pending("a", 6, claim_seconds=60)
    b = any_store.claim_pending("b", 6, claim_seconds=60)
    assert len(a) == 6 and len(b) == 4
    assert not {r.id for r in a} & {r.id for r in b}
    assert [r.seq for r in a] == sorted(r.seq for r in a)
    any_store.release([r.seq for r in b])
    assert len(any_store.claim_pending("c", 10, claim_seconds=60)) == 4


def test_mark_published_and_failed(any_store: EventStore) -> None:
    any_store.accept([ev(i) for i in range(4)], source_name="src")
    rows = any_store.claim_pending("r", 10, 60)
    any_store.mark_published([rows[0].seq, rows[1].seq])
    any_store.mark_failed({rows[2].seq: "publish nack"}, lambda n: 3600.0)
    any_store.mark_failed({rows[3].seq: "publish lost"}, lambda n: 0.0)
    count, oldest = any_store.pending_stats()
    assert count == 2 and oldest is not None and oldest.tzinfo is not None
    again = any_store.claim_pending("r", 10, 60)
    assert [r.id for r in again] == [rows[3].id]  # the other waits for its next attempt
    assert again[0].attempts == 1
    stored = any_store.get_event(rows[2].id)
    assert stored is not None and stored.status == "pending" and stored.attempts == 1
    assert any_store.get_event(rows[0].id).status == "published"  # type: ignore[union-attr]


def test_scores_are_idempotent(any_store: EventStore) -> None:
    e = ev(1)
    any_store.accept([e], source_name="src")
    rec = ScoreRecord(e.id, "online-anomaly", "1", 0.9, {"amount": 4.2}, e.type, "src", e.time, utcnow())
    assert any_store.save_scores([rec, rec]) == 1
    assert any_store.save_scores([rec]) == 0
    assert any_store.count_scores() == 1
    stored = any_store.get_event(e.id)
    assert stored is not None and stored.scores[0]["score"] == 0.9
    assert any_store.list_events(EventFilter(min_score=0.5), limit=10)[0].event["id"] == e.id
    assert not any_store.list_events(EventFilter(min_score=0.95), limit=10)
    assert any_store.top_scored(1)[0][0] == 0.9


def test_list_filters_by_model_score_range_subject_and_sources(any_store: EventStore) -> None:
    a, b = ev(1, source="s1"), ev(2, source="s2")
    c = dataclasses.replace(ev(3, source="s3"), subject="order/3")
    any_store.accept([a], source_name="s1")
    any_store.accept([b], source_name="s2")
    any_store.accept([c], source_name="s3")
    now = utcnow()
    any_store.save_scores([
        ScoreRecord(a.id, "m1", "1", 0.9, None, a.type, "s1", a.time, now),
        ScoreRecord(a.id, "m2", "1", 0.1, None, a.type, "s1", a.time, now),
        ScoreRecord(b.id, "m1", "1", 0.4, None, b.type, "s2", b.time, now),
    ])

    def ids(**kw: object) -> list[str]:
        return [r.event["id"] for r in any_store.list_events(EventFilter(**kw), limit=10)]  # type: ignore[arg-type]

    assert ids(model="m1") == [a.id, b.id]
    assert ids(model="m2", min_score=0.5) == []  # the range applies to that model's score
    assert ids(model="m1", min_score=0.5) == [a.id]
    assert ids(max_score=0.2) == [a.id]  # m2's 0.1
    assert ids(min_score=0.3, max_score=0.5) == [b.id]
    assert ids(subject="order/3") == [c.id] and ids(subject="nope") == []
    assert ids(sources=("s1", "s3")) == [a.id, c.id] and ids(sources=()) == []


def test_list_filters_and_pagination(any_store: EventStore) -> None:
    any_store.accept([ev(i, type_="t.a" if i % 2 else "t.b") for i in range(25)], source_name="src")
    seen: list[str] = []
    after = None
    while True:
        page = any_store.list_events(EventFilter(type="t.a"), limit=5, after_seq=after)
        if not page:
            break
        seen += [p.event["id"] for p in page]
        after = page[-1].seq
    assert len(seen) == 12 == len(set(seen))
    t0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
    window = any_store.list_events(EventFilter(time_from=t0 + timedelta(seconds=5), time_to=t0 + timedelta(seconds=10)), limit=100)
    assert [p.event["data"]["i"] for p in window] == [5, 6, 7, 8, 9]


def test_broken_store_raises_store_unavailable(any_store: EventStore) -> None:
    with any_store.engine.begin() as conn:
        conn.execute(text("DROP TABLE events"))
    with pytest.raises(StoreUnavailableError):
        any_store.accept([ev(1)], source_name="src")


@pytest.mark.parametrize("cursor", [9, 1.5, "text", [1, "a"], {"k": [1]}, None, True])
def test_any_json_cursor_round_trips(any_store: EventStore, cursor) -> None:
    any_store.accept([ev(1)], source_name="src", cursor=cursor, write_cursor=True)
    assert any_store.get_cursor("src").cursor == cursor  # type: ignore[union-attr]
