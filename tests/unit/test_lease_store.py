"""Source leases in the store: acquire, renew, release, expiry and fencing -- on SQLite, PostgreSQL
and MariaDB (the lease decisions are single conditional UPDATEs; a fake UTC clock drives expiry)."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest

from gateway.errors import FencingError
from gateway.events import Event, event_id
from gateway.store import EventStore
from gateway.store.status import RUNNER_ROW_MAX_AGE

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)


class UtcClock:
    """The store's UTC clock, moved by hand."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> UtcClock:
    return UtcClock()


@pytest.fixture
def store(any_store: EventStore, clock: UtcClock) -> EventStore:
    """The parametrized store (SQLite, and PostgreSQL/MariaDB under the integration marker), on a fake clock."""
    return EventStore(any_store.engine, clock=clock)


def ev(i: int) -> Event:
    return Event(
        id=event_id("src", "row", i, 1), source="/legacy-gateway/sources/src", type="t.a",
        time=T0, data={"i": i}, extensions={"sourcename": "src"},
    )


def test_acquire_renew_expire_and_take_over(store: EventStore, clock: UtcClock) -> None:
    assert store.get_cursor("src") is None
    assert store.try_acquire_lease("src", "a", 30) == 1  # creates the row: epoch 0 -> 1
    cur = store.get_cursor("src")
    assert cur is not None and cur.cursor is None and cur.lease_owner == "a" and cur.lease_until == T0 + timedelta(seconds=30)
    assert cur.lease_live(T0) and not cur.lease_live(T0 + timedelta(seconds=31))
    assert store.try_acquire_lease("src", "b", 30) is None  # a live lease of another owner
    clock.advance(10)
    assert store.try_acquire_lease("src", "a", 30) == 1  # already ours: extended, no new epoch
    assert store.get_cursor("src").lease_until == T0 + timedelta(seconds=40)  # type: ignore[union-attr]
    clock.advance(10)
    assert store.renew_lease("src", "a", 1, 30)
    assert store.get_cursor("src").lease_until == T0 + timedelta(seconds=50)  # type: ignore[union-attr]
    assert not store.renew_lease("src", "a", 7, 30)  # wrong epoch
    assert not store.renew_lease("src", "b", 1, 30)  # not the owner
    clock.advance(29.9)
    assert store.try_acquire_lease("src", "b", 30) is None  # 0.1 s left
    clock.advance(0.2)
    assert store.try_acquire_lease("src", "b", 30) == 2  # expired: taken over, a new epoch
    assert not store.renew_lease("src", "a", 1, 30)  # a lost it
    assert store.try_acquire_lease("src", "a", 30) is None
    cur = store.get_cursor("src")
    assert cur is not None and (cur.lease_owner, cur.epoch) == ("b", 2)


def test_a_stale_epoch_writes_no_cursor_and_no_events(store: EventStore, clock: UtcClock) -> None:
    a = store.try_acquire_lease("src", "a", 30)
    store.accept([ev(1)], source_name="src", cursor={"k": 1}, epoch=a, write_cursor=True)
    clock.advance(31)  # a is stuck past its TTL
    b = store.try_acquire_lease("src", "b", 30)
    assert (a, b) == (1, 2)
    with pytest.raises(FencingError, match="epoch 1 refused"):
        store.accept([ev(2)], source_name="src", cursor={"k": 2}, epoch=a, write_cursor=True)
    assert store.stats()["events"] == 1 and store.get_cursor("src").cursor == {"k": 1}  # type: ignore[union-attr]
    store.accept([ev(2)], source_name="src", cursor={"k": 2}, epoch=b, write_cursor=True)
    assert store.get_cursor("src").cursor == {"k": 2}  # type: ignore[union-attr]


def test_release_frees_the_lease_at_once_and_the_next_holder_gets_a_new_epoch(store: EventStore, clock: UtcClock) -> None:
    assert store.try_acquire_lease("src", "a", 30) == 1
    assert not store.release_lease("src", "a", 2)  # not the epoch held: nothing changes
    assert not store.release_lease("src", "b", 1)
    assert store.get_cursor("src").lease_owner == "a"  # type: ignore[union-attr]
    assert store.release_lease("src", "a", 1)
    cur = store.get_cursor("src")
    assert cur is not None and cur.lease_owner is None and cur.lease_until is None and not cur.lease_live(T0)
    assert not store.renew_lease("src", "a", 1, 30)  # released is lost
    assert store.try_acquire_lease("src", "b", 30) == 2  # no waiting for the TTL
    assert store.release_lease("src", "b", 2)
    assert store.try_acquire_lease("src", "a", 30) == 3  # even the old owner: a new holding, a new epoch


def test_renewal_after_expiry_succeeds_while_nobody_took_over(store: EventStore, clock: UtcClock) -> None:
    assert store.try_acquire_lease("src", "a", 30) == 1
    clock.advance(100)
    assert store.renew_lease("src", "a", 1, 30)  # no other owner took it: still a's, same epoch
    assert store.try_acquire_lease("src", "b", 30) is None


def test_an_operator_cursor_move_fences_the_holder_which_re_acquires_without_a_second_bump(store: EventStore) -> None:
    a = store.try_acquire_lease("src", "a", 30)
    store.accept([ev(1)], source_name="src", cursor={"k": 5}, epoch=a, write_cursor=True)
    assert store.set_cursor("src", {"k": 0}) == 2
    cur = store.get_cursor("src")
    assert cur is not None and cur.cursor == {"k": 0} and cur.epoch == 2 and cur.lease_owner == "a"
    assert not store.renew_lease("src", "a", 1, 30)  # the holder learns it at its next renewal ...
    with pytest.raises(FencingError):  # ... or its next cursor write, which changes nothing
        store.accept([ev(2)], source_name="src", cursor={"k": 6}, epoch=a, write_cursor=True)
    assert store.get_cursor("src").cursor == {"k": 0}  # type: ignore[union-attr]
    assert store.try_acquire_lease("src", "b", 30) is None  # the lease itself is still a's
    assert store.try_acquire_lease("src", "a", 30) == 2  # a re-acquires: the operator's epoch, no bump
    assert store.set_cursor("never-ran", None) == 1
    other = store.get_cursor("never-ran")
    assert other is not None and other.cursor is None and other.lease_owner is None


def test_only_one_of_many_concurrent_acquirers_wins(store: EventStore, clock: UtcClock) -> None:
    for round_ in range(3):
        owners = [f"r{round_}-{i}" for i in range(6)]
        barrier = threading.Barrier(len(owners))
        got: dict[str, int | None] = {}
        errors: list[BaseException] = []

        def take(owner: str) -> None:
            barrier.wait()
            try:
                got[owner] = store.try_acquire_lease("src", owner, 30)
            except BaseException as exc:  # noqa: BLE001 -- reported below
                errors.append(exc)

        threads = [threading.Thread(target=take, args=(o,)) for o in owners]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors
        winners = {o: e for o, e in got.items() if e is not None}
        assert len(winners) == 1 and list(winners.values()) == [round_ + 1]
        assert store.get_cursor("src").lease_owner in winners  # type: ignore[union-attr]
        clock.advance(31)  # the winner dies; the next round races for the expired lease


def test_runner_heartbeats_are_upserted_listed_removed_and_pruned(store: EventStore, clock: UtcClock) -> None:
    store.save_runner("src", "a", state="idle", epoch=3)
    store.save_runner("src", "b", state="standby", epoch=None)
    store.save_runner("other", "c", state="standby", epoch=None)
    clock.advance(5)
    store.save_runner("src", "a", state="polling", epoch=3)
    rows = store.list_runners("src")
    assert [(r.owner, r.state, r.epoch) for r in rows] == [("a", "polling", 3), ("b", "standby", None)]
    assert rows[0].updated_at == T0 + timedelta(seconds=5) and rows[1].updated_at == T0
    assert [r.source_name for r in store.list_runners()] == ["other", "src", "src"]
    store.remove_runner("src", "a")
    assert [r.owner for r in store.list_runners("src")] == ["b"]
    clock.advance(RUNNER_ROW_MAX_AGE.total_seconds() + 1)  # b crashed long ago
    store.save_runner("src", "d", state="standby", epoch=None)
    assert [r.owner for r in store.list_runners("src")] == ["d"]  # pruned by d's heartbeat
    assert [r.owner for r in store.list_runners("other")] == ["c"]  # only the same source's rows
