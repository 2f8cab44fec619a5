"""REL-09 (poller half): source runners pause while the outbox backlog is above its threshold.

The gate counts the real store's pending rows; the backlog is made by accepting events of another
source and drained by marking them published, as the relay does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest

from gateway.errors import ConfigurationError
from gateway.events import Event, event_id, utcnow
from gateway.resilience import OutboxBackpressure
from gateway.store import EventFilter, EventStore
from tests.fakes import FakeClock
from tests.unit.test_source_breaker import make_runner


def backlog(store: EventStore, n: int, start: int = 0) -> None:
    """``n`` pending outbox rows of another source."""
    events = [
        Event(id=event_id("other", "e", i, 1), source="/other", type="t", time=utcnow(), data={"i": i})
        for i in range(start, start + n)
    ]
    store.accept(events, source_name="other")


def own_ids(store: EventStore) -> list[int]:
    """Ids of the events the runner's source ``mem`` accepted (not the backlog's)."""
    return [e.event["data"]["id"] for e in store.list_events(EventFilter(), limit=1000) if "id" in e.event["data"]]


def publish(store: EventStore, n: int) -> None:
    """Mark ``n`` pending rows published (what the relay does on the broker's ack)."""
    rows = store.claim_pending("test-relay", n, 60.0)
    store.mark_published([r.seq for r in rows])


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


# ---------------------------------------------------------------------------- the gate

def test_gate_has_hysteresis_and_counts_at_most_once_per_interval(sqlite_store: EventStore) -> None:
    clock = FakeClock()
    counts: list[int] = []

    def count() -> int:
        counts.append(1)
        return sqlite_store.pending_stats()[0]

    gate = OutboxBackpressure(count, threshold=10, resume_ratio=0.9, interval=1.0, clock=clock)
    backlog(sqlite_store, 10)
    assert gate.engaged() is False  # at the threshold: not above it
    backlog(sqlite_store, 1, start=10)
    assert gate.engaged() is False and len(counts) == 1  # cached: no second count within the interval
    clock.advance(1.0)
    assert gate.engaged() is True and gate.pending == 11
    publish(sqlite_store, 2)  # 9 pending: below the threshold, not below 90 % of it
    clock.advance(1.0)
    assert gate.engaged() is True
    publish(sqlite_store, 1)  # 8 pending < 9
    clock.advance(1.0)
    assert gate.engaged() is False
    assert len(counts) == 4


def test_gate_keeps_its_verdict_when_the_store_cannot_count() -> None:
    clock = FakeClock()
    answers: list[int | Exception] = [50, RuntimeError("store down"), 0]

    def count() -> int:
        item = answers.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    gate = OutboxBackpressure(count, threshold=10, interval=1.0, clock=clock)
    assert gate.engaged() is True
    clock.advance(1.0)
    assert gate.engaged() is True  # unknown: stay paused
    clock.advance(1.0)
    assert gate.engaged() is False


def test_gate_refuses_nonsense() -> None:
    with pytest.raises(ConfigurationError):
        OutboxBackpressure(lambda: 0, threshold=0)
    with pytest.raises(ConfigurationError):
        OutboxBackpressure(lambda: 0, threshold=5, resume_ratio=1.5)


# ---------------------------------------------------------------------------- the runner

def test_runner_pauses_in_state_backpressure_and_resumes_below_the_low_mark(
    sqlite_store: EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    gate = OutboxBackpressure(lambda: sqlite_store.pending_stats()[0], threshold=20, resume_ratio=0.5, interval=0.02)
    backlog(sqlite_store, 25)
    runner, adapter, _clock = make_runner(sqlite_store, n=6, backpressure=gate, status_interval=0.02)
    runner._clock = time.monotonic  # real time for the waits; the breaker keeps the fake clock
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: runner.status.state == "backpressure")
        assert wait_until(lambda: (sqlite_store.get_source_status("mem") or _Unknown).state == "backpressure")
        time.sleep(0.2)  # many gate checks while paused
        assert adapter.calls == 0  # the source was not read: its records stay where they are
        assert sqlite_store.get_cursor("mem") is None or sqlite_store.get_cursor("mem").cursor is None  # type: ignore[union-attr]
        publish(sqlite_store, 10)  # 15 pending: below the threshold, not below the low mark (10)
        time.sleep(0.2)
        assert runner.status.state == "backpressure" and adapter.calls == 0
        publish(sqlite_store, 10)  # 5 pending
        assert wait_until(lambda: sorted(own_ids(sqlite_store)) == [1, 2, 3, 4, 5, 6])
        assert wait_until(lambda: runner.status.state != "backpressure")
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    messages = [r.getMessage() for r in caplog.records if r.name == "gateway.sources"]
    assert sum("backpressure: the outbox holds" in m for m in messages) == 1  # once per episode
    assert sum("backpressure released" in m for m in messages) == 1


class _Unknown:
    state = "unknown"
