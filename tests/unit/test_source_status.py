"""Source runner: persisted status, shared endpoint breakers, permanent failures, operator pause, drift."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from adapters.base import Batch, Fingerprint, PollingSource, Record, SourceConfig
from gateway.config import SourceSettings
from gateway.errors import (
    CircuitOpenError,
    ConfigurationError,
    PermanentError,
    TransientError,
)
from gateway.resilience import BreakerPolicy, BreakerRegistry, RetryPolicy
from gateway.sources.drift import DriftTracker, changed_parts
from gateway.sources.runner import SourceRunner
from gateway.store import EventStore
from tests.fakes import FakeClock

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
RETRY = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.001, deadline=5.0)
BREAKER = {"window_size": 2, "minimum_calls": 2, "failure_rate_threshold": 50, "wait_in_open": 30, "half_open_permits": 1}


class FaultError(PermanentError):
    """A business fault, like the SOAP adapter's: the source answered "no"."""

    def __init__(self, message: str, details: dict[str, Any]) -> None:
        super().__init__(message)
        self.details = details


class FakeSource(PollingSource[SourceConfig]):
    """In-memory records (cursor ``{"next": i}``) with switchable failures and fingerprint."""

    kind = "fake"

    def __init__(self, n: int, *, name: str = "mem", batch_size: int = 3, key: str | None = None) -> None:
        super().__init__(SourceConfig(batch_size=batch_size), source_name=name)
        self.rows = [{"id": i, "amount": f"{i}.00"} for i in range(1, n + 1)]
        self.calls = 0
        self.opens = 0
        self.down = False  #: ConnectionError (transient)
        self.fault_at: int | None = None  #: FaultError when reading from this index
        self.fault_message = "order 4 not found"
        self.open_error: Exception | None = None
        self.key = key
        self.fp: Fingerprint | Exception | None = None
        self.check_interval: float | None = None
        self.stop_drift = False

    def open(self) -> None:
        self.opens += 1
        if self.open_error is not None:
            raise self.open_error

    def fetch(self, cursor: Any, limit: int) -> Batch:
        self.calls += 1
        start = cursor["next"] if cursor else 0
        if self.down:
            raise ConnectionError("connection refused")
        if self.fault_at is not None and start == self.fault_at:
            raise FaultError(self.fault_message, {"fault_code": "soap:Client", "fault_string": "no", "detail_code": "E404"})
        chunk = self.rows[start : start + limit]
        end = start + len(chunk)
        return Batch([Record(data=r, position=start + i) for i, r in enumerate(chunk)], {"next": end}, end < len(self.rows))

    def fingerprint(self) -> Fingerprint | None:
        if isinstance(self.fp, Exception):
            raise self.fp
        return self.fp

    @property
    def drift_check_interval(self) -> float | None:
        return self.check_interval

    @property
    def stop_on_drift(self) -> bool:
        return self.stop_drift


class KeyedSource(FakeSource):
    """Overrides ``breaker_key()``: the key is only known after ``open()``."""

    def open(self) -> None:
        super().open()
        self.endpoint = "soap:https://erp.example/orders"

    def breaker_key(self) -> str:
        return self.endpoint


def settings(name: str = "mem", **over: Any) -> SourceSettings:
    return SourceSettings.model_validate(
        {
            "name": name,
            "adapter": "fake",
            "interval": 10.0,
            "status_interval": 1.0,
            "breaker": BREAKER,
            "mapping": {"type": "com.acme.order.changed", "entity": "order", "key": ["id"]},
            **over,
        }
    )


def runner_for(
    store: EventStore,
    adapter: FakeSource,
    clock: FakeClock,
    *,
    wait: Callable[..., object] | None = None,
    over: dict[str, Any] | None = None,
    **kw: Any,
) -> SourceRunner:
    extra = {"wait": wait} if wait is not None else {}
    return SourceRunner(
        settings(adapter.source_name, **(over or {})), store, adapter=adapter, retry=RETRY, sleep=lambda s: None,
        clock=clock, **extra, **kw,
    )


class Script:
    """A ``wait`` for ``run()`` that moves the fake clock, records what the runner does and acts.

    ``on_wait(n, state)`` runs at every wait (``n`` counts from 1); the run stops after ``limit``
    waits or when ``on_wait`` returns True.
    """

    def __init__(self, clock: FakeClock, on_wait: Callable[[int, str], bool | None], limit: int = 200) -> None:
        self.clock = clock
        self.on_wait = on_wait
        self.limit = limit
        self.runner: SourceRunner | None = None
        self.seen: list[tuple[str, float]] = []

    def __call__(self, stop: threading.Event, seconds: float) -> bool:
        assert self.runner is not None
        self.clock.advance(seconds)
        state = self.runner.status.state
        self.seen.append((state, seconds))
        if self.on_wait(len(self.seen), state) or len(self.seen) >= self.limit:
            stop.set()
        return stop.is_set()


def run_script(store: EventStore, adapter: FakeSource, clock: FakeClock, on_wait: Callable[[int, str], bool | None], **kw: Any) -> tuple[SourceRunner, Script]:
    script = Script(clock, on_wait)
    runner = runner_for(store, adapter, clock, wait=script, **kw)
    script.runner = runner
    runner.run(threading.Event())  # in this thread: every wait is scripted
    return runner, script


def events_count(store: EventStore) -> int:
    return store.stats()["events"]


# ---------------------------------------------------------------------------- registry


def test_registry_gets_or_creates_and_the_first_policy_wins() -> None:
    reg = BreakerRegistry(clock=FakeClock())
    first = reg.get("soap:erp", BreakerPolicy(window_size=3, minimum_calls=3))
    again = reg.get("soap:erp", BreakerPolicy(window_size=50))
    assert again is first and first.policy.window_size == 3
    other = reg.get("source:b")
    assert other is not first and "soap:erp" in reg and len(reg) == 2 and reg.names() == ["soap:erp", "source:b"]
    assert set(reg.snapshot()) == {"soap:erp", "source:b"} and reg.snapshot()["soap:erp"]["state"] == "closed"


def test_registry_is_thread_safe() -> None:
    reg = BreakerRegistry()
    got: list[object] = []
    barrier = threading.Barrier(8)

    def grab() -> None:
        barrier.wait()
        got.append(reg.get("shared"))

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and all(b is got[0] for b in got) and len(reg) == 1


# ---------------------------------------------------------------------------- persisted status


def test_status_is_persisted_on_state_changes_and_otherwise_throttled(sqlite_store: EventStore) -> None:
    clock = FakeClock()
    adapter = FakeSource(9)
    runner = runner_for(sqlite_store, adapter, clock)
    runner.run_once()
    st = sqlite_store.get_source_status("mem")
    assert st is not None and st.state == "idle" and st.owner == runner.owner and st.epoch == runner._epoch
    assert st.polls == 1 and st.events_accepted == 3 and st.last_poll_at is not None
    assert st.breaker is not None and st.breaker["name"] == "source:mem" and st.breaker["state"] == "closed"
    assert [s.source_name for s in sqlite_store.list_source_status()] == ["mem"]
    runner.run_once()  # within status_interval: not written
    assert sqlite_store.get_source_status("mem").polls == 1  # type: ignore[union-attr]
    clock.advance(1.0)
    runner.run_once()
    assert sqlite_store.get_source_status("mem").polls == 3  # type: ignore[union-attr]
    # A state change outside the poll cycle is written at once, throttle or not.
    adapter.down = True
    with pytest.raises(TransientError):
        runner.run_once()
    runner._set_state("backoff")
    runner.status.last_error = "ConnectionError: connection refused"
    runner._set_state("paused")
    st = sqlite_store.get_source_status("mem")
    assert st is not None and st.state == "paused" and st.last_error == "ConnectionError: connection refused"


def test_a_store_failure_while_saving_status_never_stops_the_runner(
    sqlite_store: EventStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> bool:
        raise RuntimeError("status table on fire")

    monkeypatch.setattr(sqlite_store, "save_source_status", broken)
    clock = FakeClock()
    adapter = FakeSource(9)

    def on_wait(n: int, state: str) -> bool:
        return events_count(sqlite_store) == 9

    with caplog.at_level(logging.WARNING, logger="gateway.sources"):
        runner, _ = run_script(sqlite_store, adapter, clock, on_wait)
    assert events_count(sqlite_store) == 9 and runner.status.events_accepted == 9
    assert "could not save its status (RuntimeError: status table on fire)" in caplog.text


def test_a_runner_whose_lease_was_taken_over_goes_to_standby(sqlite_store: EventStore) -> None:
    """An idle runner never writes a cursor (so never meets FencingError); its lease renewal tells it.

    This used to be "a runner superseded by a newer one stops": a newer runner took the source
    over at once and the older one learnt it from a refused status write. With leases, a newer
    runner takes over only once the holder stopped renewing for the lease TTL (here the holder's
    clock stands still past it, as if stuck); the old holder's next renewal fails, and it goes to
    standby (not polling, not clobbering the new holder's status) instead of stopping for good.
    """
    clock = FakeClock()
    store = EventStore(sqlite_store.engine, clock=lambda: T0 + timedelta(seconds=clock.now))
    old_adapter = FakeSource(0)  # nothing to read: no cursor write, no fencing error
    script = Script(clock, lambda n, state: state == "standby", limit=20)
    old = runner_for(store, old_adapter, clock, wait=script)
    script.runner = old
    old.start()  # holds the lease (TTL 30 s)
    clock.advance(31)  # ... and renews nothing for longer than the TTL
    new = runner_for(store, FakeSource(0), clock)
    new.run_once()  # takes the expired lease over (a new epoch) and reports
    assert new._epoch == old._epoch + 1  # type: ignore[operator]
    old.run(threading.Event())
    assert [state for state, _ in script.seen] == ["standby"] and script.seen[0][1] == pytest.approx(10)
    assert old_adapter.calls == 0 and old.status.lease_holder == new.owner
    assert old.status.last_error is not None and "lost" in old.status.last_error
    st = store.get_source_status("mem")
    assert st is not None and st.owner == new.owner and st.state == "idle"
    cur = store.get_cursor("mem")
    assert cur is not None and cur.lease_owner == new.owner  # the old runner released nothing of new's


# ---------------------------------------------------------------------------- shared breaker


def test_sources_behind_one_endpoint_share_one_breaker_and_pause_together(sqlite_store: EventStore) -> None:
    clock = FakeClock()
    registry = BreakerRegistry(clock)
    a, b = KeyedSource(9, name="a"), KeyedSource(9, name="b")
    ra = runner_for(sqlite_store, a, clock, breakers=registry)
    # A long lease TTL keeps the breaker's 30 s pause in one wait (waits are cut into lease_ttl/3).
    rb = runner_for(sqlite_store, b, clock, breakers=registry, lease_ttl=300.0)
    # The key is known only after open(): until start() a private stand-in, whose listeners move.
    assert ra.breaker.name == "source:a" and ra.breaker is not rb.breaker and len(registry) == 0
    seen_by_a: list[str] = []
    ra.breaker.add_listener(lambda name, old, new: seen_by_a.append(f"{name}: {new.value}"))
    ra.start()
    rb.start()
    assert ra.breaker is rb.breaker and ra.breaker.name == "soap:https://erp.example/orders"
    assert registry.names() == ["soap:https://erp.example/orders"]
    a.down = True
    with pytest.raises(CircuitOpenError):
        ra.run_once()  # two failures open the shared breaker; the third attempt is refused
    assert a.calls == 2
    # b never failed, but its endpoint is down: b is not called either.
    with pytest.raises(CircuitOpenError):
        rb.run_once()
    assert b.calls == 0
    assert seen_by_a == ["soap:https://erp.example/orders: open"]
    # The transition reached b's status (in memory and in the store) through b's own listener.
    assert rb.status.breaker["state"] == "open"
    assert sqlite_store.get_source_status("b").breaker["state"] == "open"  # type: ignore[index, union-attr]

    def stop_at_first_wait(n: int, state: str) -> bool:
        return True

    script = Script(clock, stop_at_first_wait)
    rb._wait = script
    script.runner = rb
    rb.run(threading.Event())
    assert script.seen[0][0] == "paused" and script.seen[0][1] == pytest.approx(30)
    assert b.calls == 0


def test_default_keys_give_each_source_its_own_breaker(sqlite_store: EventStore) -> None:
    clock = FakeClock()
    registry = BreakerRegistry(clock)
    ra = runner_for(sqlite_store, FakeSource(3, name="a"), clock, breakers=registry)
    rb = runner_for(sqlite_store, FakeSource(3, name="b"), clock, breakers=registry)
    assert ra.breaker is not rb.breaker and registry.names() == ["source:a", "source:b"]


# ---------------------------------------------------------------------------- permanent errors


def test_a_business_fault_dead_letters_once_stops_polling_and_resumes_on_command(sqlite_store: EventStore) -> None:
    clock = FakeClock()
    adapter = FakeSource(9)
    adapter.fault_at = 3  # records 1-3 commit; reading from {"next": 3} fails
    calls_while_failed: list[int] = []
    failed_waits = 0

    def on_wait(n: int, state: str) -> bool:
        nonlocal failed_waits
        if state != "failed":
            return events_count(sqlite_store) == 9
        failed_waits += 1
        calls_while_failed.append(adapter.calls)
        if failed_waits == 4:
            sqlite_store.set_source_desired_state("mem", "running")  # resume; the fault is still there
        if failed_waits == 8:
            adapter.fault_at = None  # fixed at the source
            sqlite_store.set_source_desired_state("mem", "running")
        return False

    runner, script = run_script(sqlite_store, adapter, clock, on_wait)
    # Failed: not a single adapter call while waiting, 3 waits before the first resume.
    assert calls_while_failed[:4] == [2, 2, 2, 2]
    # Resumed with the fault still there: one more call, failed again, no retry storm.
    assert calls_while_failed[4:8] == [3, 3, 3, 3]
    assert all(s == 1.0 for state, s in script.seen if state == "failed")  # checked every status_interval
    # Exactly one dead letter, although the fault happened twice.
    dead = sqlite_store.list_dead_letters()
    assert len(dead) == 1
    dl = dead[0]
    assert (dl.stage, dl.source_name, dl.error_class, dl.reason) == ("source", "mem", "FaultError", "order 4 not found")
    payload = json.loads(dl.payload or "")
    assert payload["cursor"] == {"next": 3}
    assert payload["error"] == {
        "class": "FaultError",
        "message": "order 4 not found",
        "details": {"fault_code": "soap:Client", "fault_string": "no", "detail_code": "E404"},
    }
    # Fixed and resumed: everything arrives, nothing twice, the error is cleared.
    assert events_count(sqlite_store) == 9 and runner.status.duplicates == 0
    assert sqlite_store.get_cursor("mem").cursor == {"next": 9}  # type: ignore[union-attr]
    st = sqlite_store.get_source_status("mem")
    assert st is not None and st.state == "stopped" and st.last_error is None


def test_the_failed_state_is_persisted_with_the_error_and_the_cursor_stays(sqlite_store: EventStore) -> None:
    clock = FakeClock()
    adapter = FakeSource(9)
    adapter.fault_at = 3
    persisted: list[Any] = []

    def on_wait(n: int, state: str) -> bool:
        if state == "failed":
            persisted.append(sqlite_store.get_source_status("mem"))
            return True
        return False

    run_script(sqlite_store, adapter, clock, on_wait)
    st = persisted[0]
    assert st.state == "failed" and st.last_error == "FaultError: order 4 not found"
    assert sqlite_store.get_cursor("mem").cursor == {"next": 3}  # type: ignore[union-attr]


def test_a_configuration_error_at_open_fails_the_source_instead_of_retrying_forever(sqlite_store: EventStore) -> None:
    clock = FakeClock()
    adapter = FakeSource(3)
    adapter.open_error = ConfigurationError("operation 'GetOrders' not in the WSDL")

    def on_wait(n: int, state: str) -> bool:
        if n == 5:
            adapter.open_error = None
            sqlite_store.set_source_desired_state("mem", "running")
        return events_count(sqlite_store) == 3

    _, script = run_script(sqlite_store, adapter, clock, on_wait)
    assert [s for s, _ in script.seen[:5]] == ["failed"] * 5
    assert adapter.opens == 2 and events_count(sqlite_store) == 3  # opened again after the resume
    dead = sqlite_store.list_dead_letters()
    assert len(dead) == 1 and dead[0].error_class == "ConfigurationError"
    assert json.loads(dead[0].payload or "")["cursor"] is None  # it never read


def test_transient_errors_still_back_off_and_retry(sqlite_store: EventStore) -> None:
    clock = FakeClock()
    adapter = FakeSource(3)
    adapter.down = True

    def on_wait(n: int, state: str) -> bool:
        if n == 2:
            adapter.down = False
        return events_count(sqlite_store) == 3

    lenient = {"breaker": {"window_size": 10, "minimum_calls": 10}}
    _, script = run_script(sqlite_store, adapter, clock, on_wait, over=lenient)
    assert script.seen[0] == ("backoff", 1.0) and adapter.calls >= 4  # 3 attempts, backoff, then success
    assert sqlite_store.list_dead_letters() == [] and events_count(sqlite_store) == 3


# ---------------------------------------------------------------------------- operator pause


def test_pause_by_operator_stops_polling_until_resumed(sqlite_store: EventStore) -> None:
    clock = FakeClock()
    adapter = FakeSource(3)
    paused_calls: list[int] = []
    persisted: list[str] = []

    def on_wait(n: int, state: str) -> bool:
        if n == 1:  # idle after the first poll: pause, and the source gets new records
            sqlite_store.set_source_desired_state("mem", "paused")
            adapter.rows += [{"id": i, "amount": "1.00"} for i in range(4, 7)]
        if state == "paused-by-operator":
            paused_calls.append(adapter.calls)
            persisted.append(sqlite_store.get_source_status("mem").state)  # type: ignore[union-attr]
            if len(paused_calls) == 5:
                sqlite_store.set_source_desired_state("mem", "running")
        return events_count(sqlite_store) == 6

    _, script = run_script(sqlite_store, adapter, clock, on_wait)
    # The pause was seen within one status_interval slice of the 10 s poll interval.
    assert script.seen[:2] == [("idle", 1.0), ("paused-by-operator", 1.0)]
    assert paused_calls == [1] * 5 and set(persisted) == {"paused-by-operator"}
    assert events_count(sqlite_store) == 6 and adapter.calls == 2


def test_a_pause_survives_a_restart(sqlite_store: EventStore) -> None:
    sqlite_store.set_source_desired_state("mem", "paused")
    clock = FakeClock()
    adapter = FakeSource(3)
    _, script = run_script(sqlite_store, adapter, clock, lambda n, state: n == 3)
    assert [s for s, _ in script.seen] == ["paused-by-operator"] * 3 and adapter.calls == 0


# ---------------------------------------------------------------------------- drift


def fp(**parts: str) -> Fingerprint:
    return Fingerprint.from_parts(parts)


def test_fingerprint_from_parts_and_changed_parts() -> None:
    assert fp(a="1", b="2").digest == fp(b="2", a="1").digest != fp(a="1", b="3").digest
    assert changed_parts({"a": "1", "b": "2", "c": "3"}, {"a": "1", "b": "9", "d": "4"}) == ["b", "c", "d"]
    tracker = DriftTracker()
    assert not tracker.observe(fp(a="1"))  # no baseline yet
    tracker.set_baseline(fp(a="1").digest, {"a": "1"})
    assert tracker.drift is None
    assert tracker.observe(fp(a="2")) and not tracker.observe(fp(a="2"))  # reported once
    assert tracker.drift is not None and tracker.drift["changed"] == ["a"]


def test_drift_baseline_detection_logged_once_and_accept(sqlite_store: EventStore, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    adapter = FakeSource(3)
    adapter.fp = fp(**{"orders.wsdl": "w1", "types.xsd": "x1"})
    adapter.check_interval = 10.0
    changed = fp(**{"orders.wsdl": "w1", "types.xsd": "x2", "extra.xsd": "e1"})
    seen: list[Any] = []

    def on_wait(n: int, state: str) -> bool:
        st = sqlite_store.get_source_status("mem")
        seen.append(st)
        if n == 10:  # 1 s slices: the first drift check after start happens at the 10 s poll
            adapter.fp = changed
        if n == 40:  # the operator accepts (what `gateway sources accept-drift` does)
            drift = st.drift  # type: ignore[union-attr]
            sqlite_store.set_fingerprint_baseline("mem", drift["current"], drift["current_parts"])
            sqlite_store.set_source_desired_state("mem", "running")
        return n == 50

    with caplog.at_level(logging.WARNING, logger="gateway.sources"):
        runner, _ = run_script(sqlite_store, adapter, clock, on_wait)
    # The first fingerprint became the baseline; no drift while it matched.
    assert seen[0].fingerprint == fp(**{"orders.wsdl": "w1", "types.xsd": "x1"}).digest
    assert seen[0].fingerprint_parts == {"orders.wsdl": "w1", "types.xsd": "x1"} and seen[0].drift is None
    drifted = seen[25]
    assert drifted.drift is not None and drifted.drift["current"] == changed.digest
    assert drifted.drift["baseline"] == seen[0].fingerprint and drifted.drift["changed"] == ["extra.xsd", "types.xsd"]
    assert drifted.state == "idle"  # stop_on_drift is off: polling goes on
    warnings = [r.getMessage() for r in caplog.records if "schema drift" in r.getMessage()]
    assert len(warnings) == 1 and "changed: extra.xsd, types.xsd" in warnings[0]  # checked 3 times, logged once
    # Accepted: the new baseline, no drift.
    final = sqlite_store.get_source_status("mem")
    assert final is not None and final.fingerprint == changed.digest and final.drift is None and runner.status.drift is None


def test_stop_on_drift_halts_polling_until_accepted(sqlite_store: EventStore) -> None:
    # A baseline from an earlier run; the source changed while the gateway was down.
    sqlite_store.set_fingerprint_baseline("mem", fp(wsdl="old").digest, {"wsdl": "old"})
    clock = FakeClock()
    adapter = FakeSource(3)
    adapter.fp = fp(wsdl="new")
    adapter.stop_drift = True
    stopped_calls: list[int] = []

    def on_wait(n: int, state: str) -> bool:
        if state == "drift-stopped":
            stopped_calls.append(adapter.calls)
            if len(stopped_calls) == 4:
                st = sqlite_store.get_source_status("mem")
                assert st is not None and st.state == "drift-stopped" and st.drift_detected
                drift = st.drift or {}
                sqlite_store.set_fingerprint_baseline("mem", drift["current"], drift["current_parts"])
                sqlite_store.set_source_desired_state("mem", "running")
        return events_count(sqlite_store) == 3

    runner, _ = run_script(sqlite_store, adapter, clock, on_wait)
    assert stopped_calls == [0, 0, 0, 0]  # never polled with the drifted schema
    assert events_count(sqlite_store) == 3 and runner.status.drift is None
    st = sqlite_store.get_source_status("mem")
    assert st is not None and st.fingerprint == fp(wsdl="new").digest and st.drift is None


def test_resume_without_accepting_polls_on_and_keeps_reporting_the_drift(sqlite_store: EventStore) -> None:
    sqlite_store.set_fingerprint_baseline("mem", fp(wsdl="old").digest, {"wsdl": "old"})
    clock = FakeClock()
    adapter = FakeSource(3)
    adapter.fp = fp(wsdl="new")
    adapter.stop_drift = True

    def on_wait(n: int, state: str) -> bool:
        if state == "drift-stopped" and n == 2:
            sqlite_store.set_source_desired_state("mem", "running")
        return events_count(sqlite_store) == 3

    run_script(sqlite_store, adapter, clock, on_wait)
    assert events_count(sqlite_store) == 3
    st = sqlite_store.get_source_status("mem")
    assert st is not None and st.drift_detected and st.fingerprint == fp(wsdl="old").digest


def test_fingerprint_errors_are_warnings_and_polling_continues(sqlite_store: EventStore, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    adapter = FakeSource(3)
    adapter.fp = OSError("WSDL unreachable")
    with caplog.at_level(logging.WARNING, logger="gateway.sources"):
        run_script(sqlite_store, adapter, clock, lambda n, state: events_count(sqlite_store) == 3)
    assert events_count(sqlite_store) == 3
    assert "fingerprint check failed (OSError: WSDL unreachable); polling continues" in caplog.text
    assert sqlite_store.get_source_status("mem").fingerprint is None  # type: ignore[union-attr]


def test_adapters_without_a_fingerprint_store_no_baseline(sqlite_store: EventStore) -> None:
    runner = runner_for(sqlite_store, FakeSource(3), FakeClock())
    runner.run_once()
    st = sqlite_store.get_source_status("mem")
    assert st is not None and st.fingerprint is None and st.drift is None
