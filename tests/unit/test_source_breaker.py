"""G5 (pause half): the source breaker -- Retry(CircuitBreaker(fetch)), pause while open, resume on close."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import pytest
from pydantic import ValidationError

from adapters.base import Batch, PollingSource, Record, SourceConfig
from gateway.config import BreakerSettings, SourceSettings
from gateway.errors import CircuitOpenError, PermanentError, StoreUnavailableError, TransientError
from gateway.resilience import BreakerPolicy, BreakerState, RetryPolicy
from gateway.sources.runner import SourceRunner
from gateway.store import EventStore

from tests.fakes import FakeClock

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN

# 4 recorded attempts, 50 %: the 4th consecutive failure opens; 2 trial polls after 30 s.
BREAKER = {"window_size": 4, "minimum_calls": 4, "failure_rate_threshold": 50, "wait_in_open": 30, "half_open_permits": 2}
RETRY = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.001, deadline=5.0)


class MemorySource(PollingSource[SourceConfig]):
    """In-memory records; the cursor is ``{"next": index of the next record}``.

    (A dict, not a bare int: the SQLite store's JSON column has NUMERIC affinity and hands a bare
    number back as an int, which the store's JSON deserializer refuses.)
    """

    kind = "memory"

    def __init__(self, rows: Sequence[dict[str, Any]], batch_size: int = 3) -> None:
        super().__init__(SourceConfig(batch_size=batch_size), source_name="mem")
        self.rows = list(rows)
        self.calls = 0
        self.down = False  #: fetch raises ConnectionError (transient)
        self.business_error = False  #: fetch raises PermanentError (the source answered "no")
        self.closed = False

    def fetch(self, cursor: Any, limit: int) -> Batch:
        self.calls += 1
        if self.down:
            raise ConnectionError("connection refused")
        if self.business_error:
            raise PermanentError("order 42 not found")
        start = cursor["next"] if cursor else 0
        chunk = self.rows[start : start + limit]
        end = start + len(chunk)
        records = [Record(data=row, position=start + i) for i, row in enumerate(chunk)]
        return Batch(records=records, cursor={"next": end}, has_more=end < len(self.rows))

    def close(self) -> None:
        self.closed = True


def rows(n: int) -> list[dict[str, Any]]:
    return [{"id": i, "amount": f"{i}.00"} for i in range(1, n + 1)]


def make_runner(
    store: EventStore, n: int = 9, *, clock: FakeClock | None = None, breaker: dict[str, Any] | None = None, **kw: Any
) -> tuple[SourceRunner, MemorySource, FakeClock]:
    settings = SourceSettings.model_validate(
        {
            "name": "mem",
            "adapter": "memory",
            "interval": 0.01,
            "breaker": BREAKER if breaker is None else breaker,
            "mapping": {"type": "com.acme.order.changed", "entity": "order", "key": ["id"]},
        }
    )
    adapter = MemorySource(rows(n))
    clock = clock or FakeClock()
    runner = SourceRunner(settings, store, adapter=adapter, retry=RETRY, sleep=lambda s: None, clock=clock, **kw)
    return runner, adapter, clock


def drain(runner: SourceRunner) -> None:
    while runner.run_once().has_more:
        pass


def stored_ids(store: EventStore) -> list[Any]:
    from gateway.store import EventFilter

    return [item.event["data"]["id"] for item in store.list_events(EventFilter(), limit=1000)]


# ---------------------------------------------------------------------------- settings


def test_breaker_settings_defaults() -> None:
    import dataclasses

    # Sources differ from the generic policy only in a generous slow-call duration.
    assert BreakerSettings().to_policy() == dataclasses.replace(BreakerPolicy(), slow_call_duration=60.0)
    policy = BreakerSettings.model_validate(BREAKER | {"slow_call_duration": math.inf}).to_policy()
    assert (policy.window_size, policy.minimum_calls, policy.half_open_permits) == (4, 4, 2)
    assert policy.wait_in_open == 30 and policy.slow_call_duration == math.inf


@pytest.mark.parametrize(
    "bad",
    [{"window_size": 0}, {"failure_rate_threshold": 0}, {"failure_rate_threshold": 101}, {"half_open_permits": 0},
     {"wait_in_open": -1}, {"slow_call_duration": 0}, {"slow_call_rate": 50}],
)
def test_breaker_settings_reject_bad_values_and_unknown_keys(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        BreakerSettings.model_validate(bad)


def test_runner_builds_a_named_breaker_from_the_settings(sqlite_store: EventStore) -> None:
    runner, _, _ = make_runner(sqlite_store)
    assert runner.breaker.name == "source:mem"
    assert runner.breaker.policy == BreakerSettings.model_validate(BREAKER).to_policy()
    assert runner.status.breaker["state"] == "closed" and runner.status.breaker["name"] == "source:mem"


# ---------------------------------------------------------------------------- run_once


def test_failures_open_the_breaker_then_the_adapter_is_not_called(sqlite_store: EventStore) -> None:
    runner, adapter, clock = make_runner(sqlite_store)
    adapter.down = True
    # 3 attempts (the retry policy's limit), 3 breaker failures: below minimum_calls, still closed.
    with pytest.raises(TransientError) as first:
        runner.run_once()
    assert not isinstance(first.value, CircuitOpenError)
    assert adapter.calls == 3 and runner.status.breaker["state"] == "closed"
    assert runner.status.breaker["failed_calls"] == 3
    # The 4th failure opens the breaker; the retry's next attempt is refused without a call.
    with pytest.raises(CircuitOpenError) as refused:
        runner.run_once()
    assert adapter.calls == 4
    assert refused.value.breaker_name == "source:mem" and refused.value.retry_after == pytest.approx(30)
    assert runner.status.breaker["state"] == "open"
    # While open: refused at once, never retried, the adapter never called -- even when it is back.
    adapter.down = False
    for _ in range(5):
        clock.advance(5)
        with pytest.raises(CircuitOpenError):
            runner.run_once()
    assert adapter.calls == 4
    assert runner.status.breaker["rejected_calls"] == 6
    assert sqlite_store.stats()["events"] == 0 and sqlite_store.get_cursor("mem").cursor is None  # type: ignore[union-attr]


def test_after_the_wait_trial_polls_close_the_breaker_and_nothing_is_lost_or_duplicated(
    sqlite_store: EventStore,
) -> None:
    runner, adapter, clock = make_runner(sqlite_store, n=9)
    transitions: list[tuple[BreakerState, BreakerState]] = []
    runner.breaker.add_listener(lambda name, old, new: transitions.append((old, new)))
    runner.run_once()  # records 1-3 committed
    adapter.down = True
    for _ in range(2):
        with pytest.raises(TransientError):
            runner.run_once()
    # 1 good + 3 failed = 75 % of 4 recorded: open after the first run_once; the second is refused at once.
    assert runner.breaker.state is OPEN and adapter.calls == 4
    clock.advance(30)
    adapter.down = False
    assert runner.status.breaker["state"] == "open"  # as of the last poll
    runner.run_once()  # trial 1: records 4-6
    assert runner.status.breaker["state"] == "half_open"
    runner.run_once()  # trial 2: records 7-9; both succeeded -> closed
    assert runner.status.breaker["state"] == "closed"
    assert transitions == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    drain(runner)
    assert sorted(stored_ids(sqlite_store)) == list(range(1, 10))
    assert sqlite_store.stats()["events"] == 9 and runner.status.duplicates == 0
    assert runner.status.events_accepted == 9 and sqlite_store.get_cursor("mem").cursor == {"next": 9}  # type: ignore[union-attr]


def test_a_failed_trial_reopens_without_a_retry_storm(sqlite_store: EventStore) -> None:
    runner, adapter, clock = make_runner(sqlite_store)
    adapter.down = True
    for _ in range(2):
        with pytest.raises(TransientError):
            runner.run_once()
    assert adapter.calls == 4
    clock.advance(30)
    # Half-open: the retry spends the 2 trial permits, the breaker reopens, the 3rd attempt is refused.
    with pytest.raises(CircuitOpenError):
        runner.run_once()
    assert adapter.calls == 6 and runner.status.breaker["state"] == "open"


def test_business_errors_do_not_open_the_breaker(sqlite_store: EventStore) -> None:
    runner, adapter, _ = make_runner(sqlite_store)
    adapter.business_error = True
    for _ in range(10):
        with pytest.raises(PermanentError):
            runner.run_once()
    assert adapter.calls == 10  # a permanent error is not retried
    snap = runner.status.breaker
    assert snap["state"] == "closed" and snap["failed_calls"] == 0 and snap["buffered_calls"] == 4
    adapter.business_error = False
    drain(runner)
    assert sqlite_store.stats()["events"] == 9


def test_store_failures_are_not_counted_by_the_source_breaker(
    sqlite_store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner, adapter, _ = make_runner(sqlite_store)
    real_accept = sqlite_store.accept
    failures = iter(range(2))

    def flaky_accept(*args: Any, **kwargs: Any) -> Any:
        if next(failures, None) is not None:
            raise StoreUnavailableError("store down")
        return real_accept(*args, **kwargs)

    monkeypatch.setattr(sqlite_store, "accept", flaky_accept)
    runner.run_once()  # the store's own retry absorbs the two failures
    assert adapter.calls == 1
    snap = runner.status.breaker
    assert snap["state"] == "closed" and snap["buffered_calls"] == 1 and snap["failed_calls"] == 0
    assert sqlite_store.stats()["events"] == 3


# ---------------------------------------------------------------------------- run()


def test_run_pauses_while_open_and_resumes_at_full_speed(sqlite_store: EventStore) -> None:
    stop = threading.Event()
    waits: list[tuple[float, str, str, int]] = []  # (seconds, status.state, breaker state, adapter calls)
    clock = FakeClock()

    def wait(stop_: threading.Event, seconds: float) -> bool:
        """Runs in the runner thread at every wait of run(): observe, then move the fake clock."""
        snap = runner.breaker.snapshot()
        waits.append((seconds, runner.status.state, snap["state"], adapter.calls))
        paused = runner.status.state == "paused"
        if paused and sum(1 for w in waits if w[1] == "paused") == 1:
            pass  # first pause: wake up early (clock not moved) -> the breaker must still refuse
        elif paused:
            clock.advance(seconds)
            adapter.down = False  # the source is back when the breaker lets trials through
        if stored_count() == 9 or len(waits) > 50:
            stop_.set()
        return stop_.wait(0.001)

    # Waits are cut into lease_ttl/3 slices to renew the source's lease; a long TTL keeps the
    # breaker's 30 s pause in one wait, which is what this test observes.
    runner, adapter, _ = make_runner(sqlite_store, n=9, clock=clock, wait=wait, lease_ttl=300.0)
    stored_count = lambda: sqlite_store.stats()["events"]  # noqa: E731
    transitions: list[tuple[BreakerState, BreakerState]] = []
    runner.breaker.add_listener(lambda name, old, new: transitions.append((old, new)))
    adapter.down = True

    thread = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    thread.start()
    thread.join(timeout=5)
    assert not thread.is_alive()
    stop.set()

    # run_once #1: 3 failed attempts, breaker still closed -> generic backoff (1 s), not a pause.
    assert waits[0][:3] == (1.0, "backoff", "closed")
    # run_once #2: the 4th failure opens the breaker; the next attempt is refused -> paused for wait_in_open.
    assert waits[1][1:] == ("paused", "open", 4) and waits[1][0] == pytest.approx(30)
    assert runner.status.breaker["state"] == "closed"
    # Woken early: refused again without calling the adapter, paused again.
    assert waits[2][1:] == ("paused", "open", 4) and waits[2][0] == pytest.approx(30)
    # After the wait: trial polls go through, the breaker closes and the source drains at full speed
    # (has_more -> no wait), then waits its interval with nothing more.
    assert [w[1] for w in waits[3:]] == ["idle"]
    assert waits[3][0] == pytest.approx(0.01) and waits[3][2] == "closed"
    assert adapter.calls == 4 + 3  # 4 failures, 3 batches: 2 trials, then 1 at full speed (the last, has_more=False)
    assert transitions == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    assert sorted(stored_ids(sqlite_store)) == list(range(1, 10))
    assert runner.status.duplicates == 0 and runner.status.events_accepted == 9
    assert runner.status.state == "stopped" and adapter.closed


def test_run_pause_ends_early_on_stop(sqlite_store: EventStore) -> None:
    """With the default wait, a paused runner stops promptly although the breaker waits 30 s."""
    runner, adapter, _ = make_runner(sqlite_store, breaker=BREAKER | {"minimum_calls": 1, "window_size": 1})
    adapter.down = True
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    thread.start()
    for _ in range(500):
        if runner.status.state == "paused":
            break
        threading.Event().wait(0.002)
    assert runner.status.state == "paused" and runner.status.breaker["state"] == "open"
    assert adapter.calls == 1
    stop.set()
    thread.join(timeout=2)
    assert not thread.is_alive() and runner.status.state == "stopped"
