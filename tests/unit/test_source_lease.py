"""One active runner per source: standby, lease renewal in every wait, lost leases, fenced writes and
operator cursor moves -- the runner on SQLite with a fake clock (the store's UTC clock follows it)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from adapters.base import Batch
from gateway.store import EventStore
from tests.fakes import FakeClock
from tests.unit.test_source_status import FakeSource, Script, runner_for

T0 = datetime(2024, 5, 1, tzinfo=timezone.utc)
TTL = 30.0  # the default sources[].lease_ttl


class LeaseSource(FakeSource):
    """Counts ``close()``; ``on_fetch(cursor)`` runs inside ``fetch`` (a slow or racing fetch)."""

    def __init__(self, n: int, **kw: Any) -> None:
        super().__init__(n, **kw)
        self.closes = 0
        self.on_fetch: Callable[[Any], None] | None = None

    def close(self) -> None:
        self.closes += 1

    def fetch(self, cursor: Any, limit: int) -> Batch:
        if self.on_fetch is not None:
            self.on_fetch(cursor)
        return super().fetch(cursor, limit)


def fake_store(sqlite_store: EventStore, clock: FakeClock) -> EventStore:
    """The store on a UTC clock that moves with the runners' fake monotonic clock."""
    return EventStore(sqlite_store.engine, clock=lambda: T0 + timedelta(seconds=clock.now))


def stored_keys(store: EventStore) -> list[int]:
    from gateway.store import EventFilter

    return sorted(e.event["data"]["id"] for e in store.list_events(EventFilter(), limit=1000))


def run_scripted(store: EventStore, adapter: FakeSource, clock: FakeClock, on_wait: Callable[[int, str], bool | None], **kw: Any) -> tuple[Any, Script]:
    script = Script(clock, on_wait)
    runner = runner_for(store, adapter, clock, wait=script, **kw)
    script.runner = runner
    runner.run(threading.Event())
    return runner, script


def test_a_standby_runner_never_opens_the_adapter_and_tries_every_third_of_the_ttl(sqlite_store: EventStore) -> None:
    clock = FakeClock()
    store = fake_store(sqlite_store, clock)
    holder = runner_for(store, LeaseSource(9), clock)
    holder.run_once()  # holds the lease (epoch 1), 3 of 9 rows committed
    standby_adapter = LeaseSource(9)
    persisted: list[Any] = []

    def on_wait(n: int, state: str) -> bool:
        if state == "standby":
            holder._keep_lease()  # the holder is alive: it renews when due
            now = T0 + timedelta(seconds=clock.now)
            persisted.append((store.list_runners("mem"), store.get_source_status("mem"), store.get_cursor("mem"), now))
            assert (standby_adapter.opens, standby_adapter.calls) == (0, 0)
            if n == 4:
                holder.close()  # graceful stop: releases the lease
        return stored_keys(store) == list(range(1, 10))

    runner, script = run_scripted(store, standby_adapter, clock, on_wait)
    standby_waits = [s for state, s in script.seen if state == "standby"]
    assert standby_waits == [TTL / 3] * 4  # retried every ttl/3 until the holder released
    runners, status, cursor, then = persisted[0]
    # Persisted: this runner as standby (its own heartbeat row), the holder's report and its lease.
    assert {(r.owner, r.state, r.epoch) for r in runners} == {(holder.owner, "idle", 1), (runner.owner, "standby", None)}
    assert status.owner == holder.owner and status.state == "idle"
    assert cursor.lease_owner == holder.owner and cursor.lease_live(then)
    # The standby's heartbeat stays fresh while it waits (written before every try).
    for rows, _, _, at in persisted:
        mine = next(r for r in rows if r.owner == runner.owner)
        assert mine.state == "standby" and at - mine.updated_at <= timedelta(seconds=TTL / 3)
    # Took over at its next try after the release: opened once, continued from the committed cursor.
    assert standby_adapter.opens == 1 and runner._epoch is None  # released again on return
    assert stored_keys(store) == list(range(1, 10)) and runner.status.duplicates == 0
    final = store.get_source_status("mem")
    assert final is not None and final.owner == runner.owner and final.epoch == 2 and final.state == "stopped"
    assert store.get_cursor("mem").lease_owner is None and store.list_runners("mem") == []  # type: ignore[union-attr]


@pytest.mark.parametrize("scenario", ["interval", "failed", "paused-by-operator", "breaker-open", "backoff"])
def test_the_holder_renews_within_every_wait(sqlite_store: EventStore, scenario: str) -> None:
    """Waits longer than ttl/3 (a 100 s interval, 60 s breaker pauses, 60 s backoff) are cut so the
    lease is renewed at least every ttl/3: it never has less than 2/3 of the TTL left."""
    clock = FakeClock()
    store = fake_store(sqlite_store, clock)
    adapter = LeaseSource(3)
    left: list[float] = []
    renewals: list[float] = []
    real_renew = store.renew_lease

    def renew(*a: Any, **kw: Any) -> bool:
        renewals.append(clock.now)
        return real_renew(*a, **kw)

    store.renew_lease = renew  # type: ignore[method-assign]
    over: dict[str, Any] = {"interval": 100.0}
    if scenario == "failed":
        adapter.fault_at = 0
    elif scenario == "paused-by-operator":
        store.set_source_desired_state("mem", "paused")
    elif scenario == "breaker-open":
        adapter.down = True
        over["breaker"] = {"window_size": 2, "minimum_calls": 2, "failure_rate_threshold": 50, "wait_in_open": 60}
    elif scenario == "backoff":
        adapter.down = True
        over["status_interval"] = 100.0  # backoff waits in status_interval slices: cut at ttl/3 anyway
        over["breaker"] = {"window_size": 100, "minimum_calls": 100}

    def on_wait(n: int, state: str) -> bool:
        cur = store.get_cursor("mem")
        assert cur is not None and cur.lease_until is not None
        left.append((cur.lease_until - (T0 + timedelta(seconds=clock.now))).total_seconds())
        return clock.now - 1000.0 >= 150  # two and a half minutes of fake time

    runner, script = run_scripted(store, adapter, clock, on_wait, over=over)
    assert max(s for _, s in script.seen) <= TTL / 3
    assert min(left) >= TTL * 2 / 3 - 1e-6, (scenario, min(left))
    assert len(renewals) >= 150 / (TTL / 3) - 1
    expected = {"interval": "idle", "failed": "failed", "paused-by-operator": "paused-by-operator",
                "breaker-open": "paused", "backoff": "backoff"}[scenario]
    assert expected in {state for state, _ in script.seen}


def test_a_lost_lease_stops_polling_closes_the_adapter_and_reloads_the_cursor_on_return(sqlite_store: EventStore) -> None:
    clock = FakeClock()
    store = fake_store(sqlite_store, clock)
    adapter = LeaseSource(9)
    adapter.rows = adapter.rows[:3]  # 3 rows now, 6 more later
    seen: list[tuple[str, int, int]] = []
    other: dict[str, int] = {}
    errors: list[str | None] = []

    def on_wait(n: int, state: str) -> bool:
        seen.append((state, adapter.calls, adapter.closes))
        errors.append(script_holder[0].status.last_error)
        if n == 2:  # idle at {"next": 3}: another replica takes the source over ...
            runner = script_holder[0]
            assert store.release_lease("mem", runner.owner, runner._epoch)
            other["epoch"] = store.try_acquire_lease("mem", "replica-b", TTL) or 0
            # ... and commits up to {"next": 6} (rows 4-6 are its business)
            store.accept([], source_name="mem", cursor={"next": 6}, epoch=other["epoch"], write_cursor=True)
            adapter.rows += [{"id": i, "amount": "1.00"} for i in range(4, 10)]
        if state == "standby" and len([s for s in seen if s[0] == "standby"]) == 3:
            store.release_lease("mem", "replica-b", other["epoch"])  # replica b stops
        return stored_keys(store) == [1, 2, 3, 7, 8, 9]

    script = Script(clock, on_wait)
    runner = runner_for(store, adapter, clock, wait=script)
    script.runner = runner
    script_holder = [runner]
    runner.run(threading.Event())
    states = [s for s, _, _ in seen]
    first_standby = states.index("standby")
    calls, closes = seen[first_standby][1], seen[first_standby][2]
    assert closes == 1  # the adapter was closed when the renewal failed
    assert all(c == calls for s, c, _ in seen if s == "standby")  # no poll while standby
    assert "lease with epoch 1 lost" in (errors[first_standby] or "")
    # Back as holder with a new epoch, it reloaded b's cursor: rows 4-6 were not read again.
    assert stored_keys(store) == [1, 2, 3, 7, 8, 9] and runner.status.duplicates == 0
    assert store.get_source_status("mem").epoch == 3  # type: ignore[union-attr]


def test_a_fetch_stuck_past_the_ttl_is_fenced_and_the_runner_goes_standby(sqlite_store: EventStore) -> None:
    clock = FakeClock()
    store = fake_store(sqlite_store, clock)
    adapter = LeaseSource(9)
    taken: dict[str, int | None] = {}

    def stuck(cursor: Any) -> None:
        if cursor == {"next": 3} and not taken:
            clock.advance(TTL + 1)  # the fetch blocks longer than the lease lasts ...
            taken["epoch"] = store.try_acquire_lease("mem", "replica-b", TTL)  # ... and b takes over

    adapter.on_fetch = stuck
    seen: list[tuple[str, int]] = []

    def on_wait(n: int, state: str) -> bool:
        seen.append((state, adapter.calls))
        return len(seen) == 4

    runner, _ = run_scripted(store, adapter, clock, on_wait)
    assert taken["epoch"] == 2
    assert [s for s, _ in seen] == ["standby"] * 4 and all(c == 2 for _, c in seen)  # no poll after the fence
    assert stored_keys(store) == [1, 2, 3]  # the stuck batch (rows 4-6) was not written
    cur = store.get_cursor("mem")
    assert cur is not None and cur.cursor == {"next": 3} and cur.lease_owner == "replica-b"
    assert runner.status.last_error is not None and "cursor write with epoch 1 refused" in runner.status.last_error
    assert adapter.closes >= 1 and runner.status.lease_holder == "replica-b"


def test_an_operator_cursor_move_fences_the_runner_which_continues_from_the_new_cursor(sqlite_store: EventStore) -> None:
    clock = FakeClock()
    store = fake_store(sqlite_store, clock)
    adapter = LeaseSource(12)
    moved: list[int] = []

    def operator(cursor: Any) -> None:
        if cursor == {"next": 3} and not moved:
            moved.append(store.set_cursor("mem", {"next": 9}))  # skip rows 4-9, mid-fetch

    adapter.on_fetch = operator
    runner, _ = run_scripted(store, adapter, clock, lambda n, state: stored_keys(store) == [1, 2, 3, 10, 11, 12])
    assert moved == [2]
    # The batch read from the old cursor was fenced (not written); the runner kept its lease (the
    # same owner re-acquires at once, the operator's epoch) and went on from the operator's cursor.
    assert stored_keys(store) == [1, 2, 3, 10, 11, 12] and runner.status.duplicates == 0
    assert store.get_cursor("mem").cursor == {"next": 12}  # type: ignore[union-attr]
    assert store.get_source_status("mem").epoch == 2  # type: ignore[union-attr]


def test_a_cursor_move_while_idle_is_picked_up_at_the_next_renewal(sqlite_store: EventStore) -> None:
    """An idle runner writes no cursor, so nothing fences it; its next lease renewal (at most ttl/3
    later, although the poll interval is 100 s) fails on the operator's epoch, and it reloads."""
    clock = FakeClock()
    store = fake_store(sqlite_store, clock)
    adapter = LeaseSource(6)
    moved_at: list[float] = []
    reopened_at: list[float] = []
    real_open = adapter.open

    def open_() -> None:
        real_open()
        if moved_at:
            reopened_at.append(clock.now)

    adapter.open = open_  # type: ignore[method-assign]

    def on_wait(n: int, state: str) -> bool:
        if n == 1:  # idle after draining the 6 rows: the operator replays from the start
            store.set_cursor("mem", None)
            moved_at.append(clock.now)
        return runner_ref[0].status.duplicates == 6

    script = Script(clock, on_wait)
    runner = runner_for(store, adapter, clock, wait=script, over={"interval": 100.0})
    runner_ref = [runner]
    script.runner = runner
    runner.run(threading.Event())
    assert runner.status.duplicates == 6 and store.stats()["events"] == 6  # re-read, nothing doubled
    assert reopened_at and reopened_at[0] - moved_at[0] <= TTL / 3
    assert store.get_cursor("mem").cursor == {"next": 6}  # type: ignore[union-attr]


def test_run_releases_the_lease_on_stop(sqlite_store: EventStore) -> None:
    clock = FakeClock()
    store = fake_store(sqlite_store, clock)
    runner, _ = run_scripted(store, LeaseSource(3), clock, lambda n, state: n == 2)
    cur = store.get_cursor("mem")
    assert cur is not None and cur.lease_owner is None and cur.lease_until is None
    assert store.list_runners("mem") == []
    st = store.get_source_status("mem")
    assert st is not None and st.state == "stopped" and st.owner == runner.owner
    assert store.try_acquire_lease("mem", "next", TTL) == 2  # a standby takes over at once
