"""REL-11/REL-12: the circuit breaker's Resilience4j semantics, its retry glue, and its lock discipline."""

from __future__ import annotations

import asyncio
import logging
import pickle
import threading
import time
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gateway import errors
from gateway.errors import (
    CircuitOpenError,
    ConfigurationError,
    ContractError,
    PermanentError,
    SkippableError,
    StoreUnavailableError,
    TransientError,
)
from gateway.resilience import (
    BreakerPolicy,
    BreakerState,
    CircuitBreaker,
    Outcome,
    RetryPolicy,
    guarded,
    retrying,
)

from tests.fakes import FakeClock

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def make(clock: FakeClock | None = None, **policy: object) -> tuple[CircuitBreaker, FakeClock]:
    clock = clock or FakeClock()
    return CircuitBreaker("test", BreakerPolicy(**policy), clock=clock), clock  # type: ignore[arg-type]


def ok() -> str:
    return "ok"


def boom(exc: BaseException | type[BaseException] = TransientError) -> None:
    raise exc if isinstance(exc, BaseException) else exc("down")


def fail(breaker: CircuitBreaker, exc: BaseException | type[BaseException] = TransientError, n: int = 1) -> None:
    for _ in range(n):
        with pytest.raises(BaseException):
            breaker.call(boom, exc)


def succeed(breaker: CircuitBreaker, n: int = 1) -> None:
    for _ in range(n):
        assert breaker.call(ok) == "ok"


def open_breaker(breaker: CircuitBreaker) -> None:
    fail(breaker, n=breaker.policy.window_size)
    assert breaker.state is OPEN


# ============================================================================ CLOSED -> OPEN


def test_opens_at_failure_rate_only_after_minimum_calls() -> None:
    breaker, _ = make(window_size=10, minimum_calls=5, failure_rate_threshold=50)
    fail(breaker, n=4)
    assert breaker.state is CLOSED, "100 % failures, but fewer than minimum_calls buffered"
    fail(breaker)
    assert breaker.state is OPEN


def test_opens_exactly_when_rate_reaches_threshold() -> None:
    breaker, _ = make(window_size=10, minimum_calls=5, failure_rate_threshold=50)
    succeed(breaker, n=3)
    fail(breaker, n=2)
    assert breaker.state is CLOSED and breaker.snapshot()["failure_rate"] == 40.0
    succeed(breaker)  # 2/6 = 33 %
    fail(breaker)  # 3/7 = 43 %
    assert breaker.state is CLOSED
    fail(breaker)  # 4/8 = 50 % >= 50
    assert breaker.state is OPEN


def test_window_slides_over_the_last_n_calls() -> None:
    breaker, _ = make(window_size=3, minimum_calls=3, failure_rate_threshold=100)
    fail(breaker, n=2)
    succeed(breaker)  # F F S
    fail(breaker)  # F S F
    fail(breaker)  # S F F
    assert breaker.state is CLOSED
    fail(breaker)  # F F F
    assert breaker.state is OPEN


def test_minimum_calls_is_capped_at_window_size() -> None:
    breaker, _ = make(window_size=2, minimum_calls=10)
    fail(breaker, n=2)
    assert breaker.state is OPEN


def test_slow_calls_open_the_breaker() -> None:
    breaker, clock = make(window_size=4, minimum_calls=2, slow_call_duration=1.0, slow_call_rate_threshold=50)

    def slow() -> str:
        clock.advance(1.5)
        return "late but fine"

    def at_limit() -> None:
        clock.advance(1.0)  # not *longer* than slow_call_duration

    breaker.call(at_limit)
    breaker.call(at_limit)
    assert breaker.state is CLOSED and breaker.snapshot()["slow_calls"] == 0
    assert breaker.call(slow) == "late but fine"  # 1/3 slow
    assert breaker.state is CLOSED
    breaker.call(slow)  # 2/4 = 50 %
    assert breaker.state is OPEN
    assert breaker.snapshot()["failed_calls"] == 0


def test_default_slow_call_threshold_trips_only_when_every_call_is_slow() -> None:
    breaker, clock = make(window_size=2, minimum_calls=2)  # slow_call_rate_threshold=100 (default)

    def slow() -> None:
        clock.advance(6.0)

    breaker.call(slow)
    breaker.call(ok)
    breaker.call(slow)  # window: ok, slow -> 50 %
    assert breaker.state is CLOSED
    breaker.call(slow)  # slow, slow -> 100 %
    assert breaker.state is OPEN


# ============================================================================ OPEN


def test_open_rejects_without_calling_until_wait_elapses() -> None:
    breaker, clock = make(window_size=2, minimum_calls=2, wait_in_open=30)
    open_breaker(breaker)
    called = []
    clock.advance(29.5)
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(called.append, 1)
    assert called == []
    assert info.value.breaker_name == "test"
    assert info.value.retry_after == pytest.approx(0.5)
    assert "test" in str(info.value) and "retry after" in str(info.value)
    assert breaker.snapshot()["rejected_calls"] == 1
    clock.advance(0.5)
    assert breaker.state is HALF_OPEN
    breaker.call(called.append, 1)
    assert called == [1]


# ============================================================================ HALF_OPEN


def test_half_open_admits_exactly_n_permits_and_closes_after_n_successes() -> None:
    breaker, clock = make(window_size=2, minimum_calls=2, wait_in_open=10, half_open_permits=3)
    open_breaker(breaker)
    clock.advance(10)
    permits = [breaker.acquire() for _ in range(3)]
    assert breaker.state is HALF_OPEN
    with pytest.raises(CircuitOpenError):
        breaker.acquire()
    permits[0].success()
    with pytest.raises(CircuitOpenError):  # permits are for the whole trial, not just concurrency
        breaker.acquire()
    permits[1].success()
    assert breaker.state is HALF_OPEN
    permits[2].success()
    assert breaker.state is CLOSED
    assert breaker.snapshot()["buffered_calls"] == 0, "the window is reset on closing"


def test_failures_reaching_the_threshold_in_the_trial_reopen() -> None:
    breaker, clock = make(window_size=2, minimum_calls=2, wait_in_open=10, half_open_permits=2)
    open_breaker(breaker)
    clock.advance(10)
    succeed(breaker)
    assert breaker.state is HALF_OPEN
    fail(breaker)  # 1/2 = 50 % >= 50
    assert breaker.state is OPEN
    assert breaker.snapshot()["retry_after"] == 10.0
    with pytest.raises(CircuitOpenError):
        breaker.call(ok)


def test_trial_rate_below_threshold_closes_even_with_a_failure() -> None:
    """Resilience4j evaluates the trial's *rate*: 1 failure of 3 (33 %) is below 50 %."""
    breaker, clock = make(window_size=2, minimum_calls=2, wait_in_open=10, half_open_permits=3)
    open_breaker(breaker)
    clock.advance(10)
    fail(breaker)
    succeed(breaker, n=2)
    assert breaker.state is CLOSED


def test_half_open_ignored_call_gives_its_permit_back() -> None:
    breaker, clock = make(window_size=1, minimum_calls=1, wait_in_open=1, half_open_permits=1)
    open_breaker(breaker)
    clock.advance(1)
    with pytest.raises(asyncio.CancelledError):
        breaker.call(boom, asyncio.CancelledError())
    permit = breaker.acquire()  # the cancelled call did not use the only permit up
    permit.success()
    assert breaker.state is CLOSED


def test_stale_outcomes_from_an_earlier_state_are_discarded() -> None:
    breaker, clock = make(window_size=2, minimum_calls=2, wait_in_open=5, half_open_permits=1)
    long_call = breaker.acquire()  # admitted while CLOSED
    open_breaker(breaker)
    clock.advance(5)
    assert breaker.state is HALF_OPEN
    long_call.failure()  # ends during the trial: must neither consume nor decide it
    assert breaker.state is HALF_OPEN and breaker.snapshot()["buffered_calls"] == 0
    succeed(breaker)
    assert breaker.state is CLOSED


# ============================================================================ classification


@pytest.mark.parametrize("exc", [ContractError, PermanentError, SkippableError, ValueError, KeyError])
def test_permanent_and_business_errors_count_as_successes(exc: type[Exception]) -> None:
    breaker, _ = make(window_size=4, minimum_calls=4)
    fail(breaker, exc, n=10)
    snap = breaker.snapshot()
    assert snap["state"] == "closed" and snap["buffered_calls"] == 4 and snap["failed_calls"] == 0


@pytest.mark.parametrize(
    "exc",
    [CircuitOpenError("inner", 1.0), asyncio.CancelledError(), KeyboardInterrupt(), GeneratorExit(), SystemExit(1)],
    ids=lambda e: type(e).__name__,
)
def test_cancellation_and_inner_open_circuits_are_ignored(exc: BaseException) -> None:
    breaker, _ = make(window_size=4, minimum_calls=1)
    fail(breaker, exc, n=5)
    assert breaker.snapshot()["buffered_calls"] == 0 and breaker.state is CLOSED


@pytest.mark.parametrize(
    "exc", [TransientError, StoreUnavailableError, TimeoutError, ConnectionResetError, OSError]
)
def test_default_failures(exc: type[BaseException]) -> None:
    assert BreakerPolicy().classify(exc()) is Outcome.FAILURE


def test_custom_classifiers_tuples_and_predicates() -> None:
    policy = BreakerPolicy(
        record=lambda e: isinstance(e, RuntimeError) and "503" in str(e),
        ignore=(LookupError,),
    )
    assert policy.classify(RuntimeError("HTTP 503")) is Outcome.FAILURE
    assert policy.classify(RuntimeError("HTTP 404")) is Outcome.SUCCESS
    assert policy.classify(KeyError("x")) is Outcome.IGNORED
    assert policy.classify(TransientError()) is Outcome.SUCCESS  # not in this custom record
    assert policy.classify(CircuitOpenError("x", 1)) is Outcome.IGNORED  # always


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window_size": 0},
        {"minimum_calls": 0},
        {"failure_rate_threshold": 0},
        {"failure_rate_threshold": 101},
        {"slow_call_rate_threshold": 0},
        {"slow_call_duration": 0},
        {"wait_in_open": -1},
        {"half_open_permits": 0},
    ],
)
def test_invalid_policy_fails_fast(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError, match=next(iter(kwargs))):
        BreakerPolicy(**kwargs)  # type: ignore[arg-type]


def test_circuit_open_error_is_public_transient_and_picklable() -> None:
    assert "CircuitOpenError" in errors.__all__
    assert issubclass(CircuitOpenError, TransientError)
    err = pickle.loads(pickle.dumps(CircuitOpenError("soap:orders", 12.5)))
    assert (err.breaker_name, err.retry_after) == ("soap:orders", 12.5)


# ============================================================================ API surface


def test_listeners_and_warning_log_on_every_transition(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[tuple[str, BreakerState, BreakerState]] = []

    def broken(*_: object) -> None:
        raise RuntimeError("metrics backend down")

    clock = FakeClock()
    breaker = CircuitBreaker(
        "soap:orders",
        BreakerPolicy(window_size=1, minimum_calls=1, wait_in_open=5, half_open_permits=1),
        clock=clock,
        listeners=[broken],
    )
    breaker.add_listener(lambda *event: seen.append(event))  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="gateway.breaker"):
        fail(breaker)
        clock.advance(5)
        fail(breaker)  # HALF_OPEN -> OPEN (the lazy move to HALF_OPEN happens on acquire)
        clock.advance(5)
        succeed(breaker)
        breaker.force_open()
        breaker.reset()
        breaker.reset()  # no transition: no event
    assert seen == [
        ("soap:orders", CLOSED, OPEN),
        ("soap:orders", OPEN, HALF_OPEN),
        ("soap:orders", HALF_OPEN, OPEN),
        ("soap:orders", OPEN, HALF_OPEN),
        ("soap:orders", HALF_OPEN, CLOSED),
        ("soap:orders", CLOSED, OPEN),
        ("soap:orders", OPEN, CLOSED),
    ]
    transitions = [r for r in caplog.records if r.levelno == logging.WARNING and "->" in r.getMessage()]
    assert len(transitions) == 7
    assert "closed -> open" in transitions[0].getMessage() and "soap:orders" in transitions[0].getMessage()
    assert any("listener" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


def test_snapshot_fields() -> None:
    breaker, clock = make(window_size=4, minimum_calls=4, slow_call_duration=1.0, wait_in_open=30)
    fail(breaker)

    def slow() -> None:
        clock.advance(2)

    breaker.call(slow)
    snap = breaker.snapshot()
    assert snap == {
        "name": "test",
        "state": "closed",
        "failure_rate": 50.0,
        "slow_call_rate": 50.0,
        "buffered_calls": 2,
        "failed_calls": 1,
        "slow_calls": 1,
        "half_open_in_flight": 0,
        "rejected_calls": 0,
        "opened_at": None,
        "retry_after": 0.0,
    }
    fail(breaker, n=2)
    opened = clock.now
    clock.advance(10)
    with pytest.raises(CircuitOpenError):
        breaker.call(ok)
    snap = breaker.snapshot()
    assert snap["state"] == "open" and snap["opened_at"] == opened
    assert snap["retry_after"] == 20.0 and snap["rejected_calls"] == 1


def test_force_open_and_reset() -> None:
    breaker, clock = make(wait_in_open=30)
    breaker.force_open(wait=float("inf"))
    clock.advance(1e9)
    assert breaker.state is OPEN
    breaker.reset()
    assert breaker.state is CLOSED
    breaker.force_open()
    clock.advance(30)
    assert breaker.state is HALF_OPEN


def test_context_manager_records_exceptions_and_reraises() -> None:
    breaker, _ = make(window_size=2, minimum_calls=2)
    for _ in range(2):
        with pytest.raises(ConnectionError):
            with breaker.calling():
                raise ConnectionError("reset by peer")
    assert breaker.state is OPEN
    with pytest.raises(CircuitOpenError):
        with breaker.calling():
            pytest.fail("the block must not run when rejected")


def test_context_manager_permit_can_record_a_returned_failure() -> None:
    breaker, _ = make(window_size=1, minimum_calls=1)
    with breaker.calling() as permit:
        status = 503  # a failure returned, not raised
        if status >= 500:
            permit.failure()
    assert breaker.state is OPEN


def test_permit_completes_once() -> None:
    breaker, _ = make()
    permit = breaker.acquire()
    permit.success()
    with pytest.raises(RuntimeError, match="already completed"):
        permit.failure()


def test_async_failure_inside_calling_block_counts(caplog: pytest.LogCaptureFixture) -> None:
    """The pybreaker trap: a breaker around an await must see the awaited failure."""
    breaker, _ = make(window_size=3, minimum_calls=3)

    async def downstream() -> None:
        await asyncio.sleep(0)
        raise TransientError("502 from legacy")

    async def guarded_call() -> None:
        with breaker.calling():
            await downstream()

    async def main() -> None:
        for _ in range(3):
            with pytest.raises(TransientError):
                await guarded_call()

    asyncio.run(main())
    assert breaker.state is OPEN


def test_async_helpers_and_cancellation() -> None:
    breaker, _ = make(window_size=2, minimum_calls=2)

    async def hang() -> None:
        await asyncio.sleep(3600)

    async def fails() -> None:
        raise TimeoutError

    async def main() -> None:
        task = asyncio.create_task(breaker.call_async(hang))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert breaker.snapshot()["buffered_calls"] == 0, "cancellation is not a failure"
        for _ in range(2):
            with pytest.raises(TimeoutError):
                async with breaker.calling():
                    await fails()

    asyncio.run(main())
    assert breaker.state is OPEN


def test_call_refuses_coroutine_functions() -> None:
    breaker, _ = make()

    async def coro() -> None:
        raise TransientError

    with pytest.raises(TypeError, match="call_async"):
        breaker.call(coro)
    with pytest.raises(TypeError, match="awaitable"):
        breaker.call(lambda: coro())
    assert breaker.snapshot()["buffered_calls"] == 0


# ============================================================================ REL-11: stateful model


@dataclass
class _ModelToken:
    generation: int
    started: float


@dataclass
class ReferenceBreaker:
    """The breaker's semantics, written as plainly as possible (integer rates, lists)."""

    policy: BreakerPolicy
    state: BreakerState = CLOSED
    calls: list[tuple[bool, bool]] = field(default_factory=list)  # (failed, slow) in this state
    open_until: float = 0.0
    in_flight: int = 0
    generation: int = 0

    def enter(self, state: BreakerState, now: float, wait: float | None = None) -> None:
        self.state, self.in_flight = state, 0
        self.generation += 1
        if state is OPEN:  # the window that tripped stays visible (frozen) while OPEN
            self.open_until = now + (self.policy.wait_in_open if wait is None else wait)
        else:
            self.calls = []

    def refresh(self, now: float) -> None:
        if self.state is OPEN and now >= self.open_until:
            self.enter(HALF_OPEN, now)

    def admit(self, now: float) -> _ModelToken | None:
        self.refresh(now)
        if self.state is OPEN:
            return None
        if self.state is HALF_OPEN:
            if self.in_flight + len(self.calls) >= self.policy.half_open_permits:
                return None
            self.in_flight += 1
        return _ModelToken(self.generation, now)

    def tripped(self) -> bool:
        n = len(self.calls)
        failed = sum(f for f, _ in self.calls)
        slow = sum(s for _, s in self.calls)
        p = self.policy
        return 100 * failed >= p.failure_rate_threshold * n or 100 * slow >= p.slow_call_rate_threshold * n

    def complete(self, token: _ModelToken, outcome: str, now: float) -> None:
        if token.generation != self.generation:
            return
        if self.state is HALF_OPEN:
            self.in_flight -= 1
        if outcome == "ignored":
            return
        self.calls.append((outcome == "failure", now - token.started > self.policy.slow_call_duration))
        if self.state is CLOSED:
            self.calls = self.calls[-self.policy.window_size :]
            if len(self.calls) >= min(self.policy.minimum_calls, self.policy.window_size) and self.tripped():
                self.enter(OPEN, now)
        elif len(self.calls) == self.policy.half_open_permits:
            self.enter(OPEN if self.tripped() else CLOSED, now)


_RAISES = {
    "failure": TransientError("down"),
    "permanent": ContractError("bad record"),  # the downstream answered: a success
    "ignored": asyncio.CancelledError(),
}


class BreakerMachine(RuleBasedStateMachine):
    """Drives a real breaker and the reference model with the same steps and compares them."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.held: list[tuple[object, _ModelToken]] = []

    @initialize(
        window=st.integers(1, 6),
        minimum=st.integers(1, 6),
        failure_threshold=st.integers(1, 100),
        slow_threshold=st.integers(1, 100),
        wait=st.sampled_from([0.0, 5.0, 10.0]),
        permits=st.integers(1, 3),
    )
    def setup(
        self, window: int, minimum: int, failure_threshold: int, slow_threshold: int, wait: float, permits: int
    ) -> None:
        policy = BreakerPolicy(
            window_size=window,
            minimum_calls=minimum,
            failure_rate_threshold=failure_threshold,
            slow_call_duration=2.0,
            slow_call_rate_threshold=slow_threshold,
            wait_in_open=wait,
            half_open_permits=permits,
        )
        self.breaker = CircuitBreaker("model", policy, clock=self.clock)
        self.model = ReferenceBreaker(policy)

    def _expect_rejection(self, call: object) -> None:
        """The model says no: the breaker must raise without calling, with the right retry_after."""
        retry_after = self.model.open_until - self.clock.now if self.model.state is OPEN else None
        with pytest.raises(CircuitOpenError) as info:
            call()  # type: ignore[operator]
        if retry_after is not None:
            assert retry_after > 0, "OPEN must not reject once the wait has elapsed"
            assert info.value.retry_after == pytest.approx(retry_after)

    @rule(outcome=st.sampled_from(["success", "failure", "permanent", "ignored"]), duration=st.sampled_from([0, 1, 2, 3]))
    def complete_call(self, outcome: str, duration: int) -> None:
        token = self.model.admit(self.clock.now)
        ran = []

        def fn() -> str:
            ran.append(True)
            self.clock.advance(duration)
            if outcome in _RAISES:
                raise _RAISES[outcome]
            return "ok"

        if token is None:
            self._expect_rejection(lambda: self.breaker.call(fn))
            assert ran == [], "a rejected call must not run"
            return
        try:
            self.breaker.call(fn)
        except (TransientError, ContractError, asyncio.CancelledError):
            pass
        assert ran == [True]
        self.model.complete(token, {"permanent": "success"}.get(outcome, outcome), self.clock.now)

    @rule()
    def begin_call(self) -> None:
        token = self.model.admit(self.clock.now)
        if token is None:
            self._expect_rejection(self.breaker.acquire)
        else:
            self.held.append((self.breaker.acquire(), token))

    @precondition(lambda self: self.held)
    @rule(data=st.data(), outcome=st.sampled_from(["success", "failure", "ignored"]))
    def finish_call(self, data: st.DataObject, outcome: str) -> None:
        permit, token = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        {"success": permit.success, "failure": permit.failure, "ignored": permit.release}[outcome]()  # type: ignore[attr-defined]
        self.model.complete(token, outcome, self.clock.now)

    @rule(seconds=st.sampled_from([0.5, 1, 2, 5, 10]))
    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def reset(self) -> None:
        self.breaker.reset()
        self.model.enter(CLOSED, self.clock.now)

    @rule(wait=st.sampled_from([None, 1.0]))
    def force_open(self, wait: float | None) -> None:
        self.breaker.force_open(wait)
        self.model.enter(OPEN, self.clock.now, wait)

    @invariant()
    def same_state_as_model(self) -> None:
        self.model.refresh(self.clock.now)
        assert self.breaker.state is self.model.state

    @invariant()
    def half_open_admits_at_most_n(self) -> None:
        snap = self.breaker.snapshot()  # like `state`, this half-opens lazily: so does the model
        self.model.refresh(self.clock.now)
        assert snap["state"] == self.model.state.value
        if snap["state"] == "half_open":
            admitted = snap["half_open_in_flight"] + snap["buffered_calls"]
            assert admitted <= self.breaker.policy.half_open_permits
            assert snap["half_open_in_flight"] == self.model.in_flight
        assert snap["buffered_calls"] == len(self.model.calls)


BreakerMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestBreakerAgainstModel = BreakerMachine.TestCase


# ============================================================================ REL-11: lock discipline


def test_slow_call_in_one_thread_does_not_delay_another() -> None:
    """A 2 s call in thread A; thread B's call through the same breaker finishes in < 100 ms."""
    breaker = CircuitBreaker("shared", BreakerPolicy(slow_call_duration=10.0))
    a_started = threading.Event()

    def slow_downstream() -> str:
        a_started.set()
        time.sleep(2.0)
        return "a"

    thread_a = threading.Thread(target=breaker.call, args=(slow_downstream,))
    thread_a.start()
    try:
        assert a_started.wait(5)
        elapsed: list[float] = []

        def b() -> None:
            t0 = time.perf_counter()
            assert breaker.call(ok) == "ok"
            assert breaker.snapshot()["state"] == "closed"
            elapsed.append(time.perf_counter() - t0)

        thread_b = threading.Thread(target=b)
        thread_b.start()
        thread_b.join(1.0)
        assert elapsed and elapsed[0] < 0.1, elapsed
        assert thread_a.is_alive(), "A must still be inside its call"
    finally:
        thread_a.join(5)
    assert breaker.snapshot()["buffered_calls"] == 2


# ============================================================================ REL-12: retry glue


@pytest.mark.parametrize(
    ("exc", "attempts"),
    [
        (CircuitOpenError("soap:orders", 30.0), 1),
        (TransientError("503"), 4),
        (StoreUnavailableError("db down"), 4),
        (PermanentError("fault"), 1),
        (ContractError("bad"), 1),
        (ValueError("bug"), 1),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_retrying_never_retries_an_open_circuit(exc: BaseException, attempts: int) -> None:
    calls = []
    sleeps: list[float] = []

    def fn() -> None:
        calls.append(1)
        raise exc

    with pytest.raises(type(exc)):
        retrying(RetryPolicy(attempts=4), sleep=sleeps.append)(fn)
    assert len(calls) == attempts
    assert len(sleeps) == attempts - 1


def test_guarded_stops_retrying_when_the_breaker_opens() -> None:
    breaker, _ = make(window_size=2, minimum_calls=2)
    calls = []
    sleeps: list[float] = []

    def flaky() -> None:
        calls.append(1)
        raise TransientError("timeout")

    with pytest.raises(CircuitOpenError):
        guarded(RetryPolicy(attempts=10), breaker, flaky, sleep=sleeps.append)
    assert len(calls) == 2, "the third attempt was refused by the breaker and not retried"
    assert len(sleeps) == 2


def test_guarded_retries_transient_errors_through_the_breaker() -> None:
    breaker, _ = make(window_size=10, minimum_calls=10)
    outcomes = iter([TransientError("1"), TransientError("2"), None])

    def flaky(x: int, *, y: int) -> int:
        err = next(outcomes)
        if err:
            raise err
        return x + y

    assert guarded(RetryPolicy(attempts=5), breaker, flaky, 1, y=2, sleep=lambda _: None) == 3
    snap = breaker.snapshot()
    assert snap["buffered_calls"] == 3 and snap["failed_calls"] == 2
