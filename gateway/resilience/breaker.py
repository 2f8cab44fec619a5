"""A circuit breaker with Resilience4j semantics (REL-11).

States and transitions:

* ``CLOSED`` -- calls go through; each outcome is recorded in a count-based sliding window of the
  last ``window_size`` calls. Once at least ``minimum_calls`` are buffered (or ``window_size``, if
  smaller), the breaker opens when the failure rate **or** the slow-call rate reaches its
  threshold (``>=``, in percent of the buffered calls).
* ``OPEN`` -- every call is rejected with :class:`~gateway.errors.CircuitOpenError` without being
  made, until ``wait_in_open`` seconds have passed. The move to ``HALF_OPEN`` is lazy: it happens
  on the next :attr:`CircuitBreaker.state` access, call or snapshot after the wait.
* ``HALF_OPEN`` -- at most ``half_open_permits`` trial calls are admitted (in flight plus
  completed); any further call is rejected. When all permitted calls have been recorded, their
  rates are compared with the same thresholds: below both -> ``CLOSED`` with an empty window,
  otherwise -> ``OPEN`` again. With the defaults (3 permits, 50 %), one failure out of three trial
  calls (33 %) closes the breaker; two reopen it.

What counts (see :meth:`BreakerPolicy.classify`):

* **failure** -- exceptions matching ``policy.record`` (by default ``TransientError``,
  ``TimeoutError``, ``ConnectionError``, ``OSError``);
* **ignored** (counts neither way, and gives a half-open permit back) -- exceptions matching
  ``policy.ignore``, always :class:`~gateway.errors.CircuitOpenError` (an inner breaker's refusal
  says nothing about this downstream), and every ``BaseException`` that is not an ``Exception``
  (``asyncio.CancelledError``, ``KeyboardInterrupt``, ``GeneratorExit``, ``SystemExit``);
* **success** -- returning normally, and every other exception. ``PermanentError`` and business
  errors (``ContractError``, ``SkippableError``, a SOAP "not found" Fault) mean the downstream
  answered, so -- as in Resilience4j, where exceptions outside ``recordExceptions`` are successes
  -- they count as successful calls.
* **slow** -- independently of the above, a recorded call that took longer than
  ``slow_call_duration`` (measured with the breaker's clock). Set ``slow_call_duration`` to
  ``math.inf`` to switch slow-call accounting off. As in Resilience4j, the default
  ``slow_call_rate_threshold`` of 100 % still opens the breaker when *every* buffered call was slow.

Outcomes of calls admitted before the last state transition are discarded (each permit carries
the generation it was admitted in), so a call that started while ``CLOSED`` and ends after the
breaker half-opened can neither fill nor consume the trial. This differs from Resilience4j, which
records such late outcomes in whatever state is current.

Why not pybreaker: it holds its lock while the protected call runs (one slow call serialises every
caller of the breaker), it counts an ``async def`` decorated with it as a success when the
coroutine is *created*, so the breaker never trips in async code, and it has no failure-rate
window, slow-call rate or half-open permit limit. Here the lock only guards bookkeeping: a permit is
taken under the lock, the lock is released, the call runs, and the result is recorded under the
lock again. ``with breaker.calling():`` records whatever the block raises, including across
``await``.

Wrapping order for outside calls: ``Retry(CircuitBreaker(Timeout(call)))`` -- see :func:`guarded`.
The retry policy never retries ``CircuitOpenError``.
"""

from __future__ import annotations

import enum
import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from gateway.errors import CircuitOpenError, ConfigurationError, TransientError
from gateway.resilience.budget import RetryBudget
from gateway.resilience.retry import RetryPolicy, retrying

__all__ = [
    "BreakerListener",
    "BreakerPolicy",
    "BreakerState",
    "CallListener",
    "CircuitBreaker",
    "ExceptionClassifier",
    "Outcome",
    "Permit",
    "guarded",
]

log = logging.getLogger("gateway.breaker")

P = ParamSpec("P")
T = TypeVar("T")

ExceptionClassifier = tuple[type[BaseException], ...] | Callable[[BaseException], bool]
"""Exception types to match with ``isinstance``, or a predicate taking the exception."""

BreakerListener = Callable[[str, "BreakerState", "BreakerState"], None]
"""Called as ``listener(breaker_name, old_state, new_state)`` after every transition."""

CallListener = Callable[[str, str], None]
"""Called as ``listener(breaker_name, outcome)`` for every call (metrics): ``outcome`` is
``"success"``, ``"failure"`` or ``"ignored"`` once per completed call, ``"rejected"`` per refused
call, and ``"slow"`` *in addition* for a recorded call slower than ``slow_call_duration``."""


class BreakerState(enum.StrEnum):
    """State of a :class:`CircuitBreaker`."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Outcome(enum.Enum):
    """How one finished call is counted."""

    SUCCESS = "success"
    FAILURE = "failure"
    IGNORED = "ignored"


def _matches(classifier: ExceptionClassifier, exc: BaseException) -> bool:
    """Whether ``exc`` matches a tuple of types or a predicate."""
    if isinstance(classifier, tuple):
        return isinstance(exc, classifier)
    return bool(classifier(exc))


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """How one downstream's breaker decides; Resilience4j names in brackets.

    Attributes:
        window_size: number of most recent calls the failure and slow-call rates are computed
            over [slidingWindowSize, COUNT_BASED].
        minimum_calls: calls that must be buffered before the rates are evaluated
            [minimumNumberOfCalls]; capped at ``window_size``.
        failure_rate_threshold: percent of failed calls at or above which the breaker opens.
        slow_call_duration: seconds above which a call is slow [slowCallDurationThreshold].
        slow_call_rate_threshold: percent of slow calls at or above which the breaker opens.
        wait_in_open: seconds the breaker rejects calls before it half-opens
            [waitDurationInOpenState].
        half_open_permits: trial calls admitted in ``HALF_OPEN``
            [permittedNumberOfCallsInHalfOpenState].
        record: exceptions counted as failures [recordExceptions].
        ignore: exceptions counted neither way [ignoreExceptions]; checked before ``record``.
            ``CircuitOpenError`` and non-``Exception`` base exceptions are always ignored.
    """

    window_size: int = 20
    minimum_calls: int = 10
    failure_rate_threshold: float = 50.0
    slow_call_duration: float = 5.0
    slow_call_rate_threshold: float = 100.0
    wait_in_open: float = 30.0
    half_open_permits: int = 3
    record: ExceptionClassifier = (TransientError, TimeoutError, ConnectionError, OSError)
    ignore: ExceptionClassifier = ()

    def __post_init__(self) -> None:
        problems = [
            msg
            for bad, msg in (
                (self.window_size < 1, "window_size must be >= 1"),
                (self.minimum_calls < 1, "minimum_calls must be >= 1"),
                (not 0 < self.failure_rate_threshold <= 100, "failure_rate_threshold must be in (0, 100]"),
                (not 0 < self.slow_call_rate_threshold <= 100, "slow_call_rate_threshold must be in (0, 100]"),
                (not self.slow_call_duration > 0, "slow_call_duration must be > 0"),
                (not self.wait_in_open >= 0, "wait_in_open must be >= 0"),
                (self.half_open_permits < 1, "half_open_permits must be >= 1"),
            )
            if bad
        ]
        if problems:
            raise ConfigurationError("invalid BreakerPolicy: " + "; ".join(problems))

    def classify(self, exc: BaseException) -> Outcome:
        """How a call that raised ``exc`` is counted.

        Args:
            exc: the exception the protected call raised.

        Returns:
            ``IGNORED`` for non-``Exception`` base exceptions (cancellation, interrupts),
            ``CircuitOpenError`` and ``ignore`` matches; ``FAILURE`` for ``record`` matches;
            ``SUCCESS`` for anything else (the downstream answered, e.g. a business error).
        """
        if not isinstance(exc, Exception) or isinstance(exc, CircuitOpenError) or _matches(self.ignore, exc):
            return Outcome.IGNORED
        if _matches(self.record, exc):
            return Outcome.FAILURE
        return Outcome.SUCCESS


class _Window:
    """Count-based sliding window of the last ``size`` recorded (failed, slow) outcomes."""

    def __init__(self, size: int) -> None:
        self._calls: deque[tuple[bool, bool]] = deque(maxlen=size)
        self.failed = 0
        self.slow = 0

    def __len__(self) -> int:
        return len(self._calls)

    def record(self, failed: bool, slow: bool) -> None:
        """Append one outcome, dropping the oldest when full."""
        if len(self._calls) == self._calls.maxlen:
            old_failed, old_slow = self._calls[0]
            self.failed -= old_failed
            self.slow -= old_slow
        self._calls.append((failed, slow))
        self.failed += failed
        self.slow += slow

    @property
    def failure_rate(self) -> float:
        """Percent of buffered calls that failed (0 when empty)."""
        return 100.0 * self.failed / len(self._calls) if self._calls else 0.0

    @property
    def slow_call_rate(self) -> float:
        """Percent of buffered calls that were slow (0 when empty)."""
        return 100.0 * self.slow / len(self._calls) if self._calls else 0.0


class Permit:
    """Admission of one call through a breaker; complete it exactly once.

    Obtained from :meth:`CircuitBreaker.acquire` (or as the target of ``with
    breaker.calling() as permit``). The call's duration runs from admission to completion.
    """

    __slots__ = ("_breaker", "_done", "generation", "started_at")

    def __init__(self, breaker: CircuitBreaker, generation: int, started_at: float) -> None:
        self._breaker = breaker
        self.generation = generation
        self.started_at = started_at
        self._done = False

    @property
    def done(self) -> bool:
        """Whether an outcome was already recorded or the permit released."""
        return self._done

    def success(self) -> None:
        """Record a successful call.

        Raises:
            RuntimeError: the permit was already completed.
        """
        self._breaker._complete(self, Outcome.SUCCESS)

    def failure(self) -> None:
        """Record a failed call (e.g. a 503 *returned* rather than raised).

        Raises:
            RuntimeError: the permit was already completed.
        """
        self._breaker._complete(self, Outcome.FAILURE)

    def release(self) -> None:
        """Give the permit back without recording anything (the call is ignored).

        Raises:
            RuntimeError: the permit was already completed.
        """
        self._breaker._complete(self, Outcome.IGNORED)

    def record_exception(self, exc: BaseException) -> None:
        """Record the call as the breaker's policy classifies ``exc``.

        Args:
            exc: the exception the call raised.

        Raises:
            RuntimeError: the permit was already completed.
        """
        self._breaker._complete(self, self._breaker.policy.classify(exc))


class _Calling:
    """Context manager taking a permit on entry and recording the block's outcome on exit."""

    __slots__ = ("_breaker", "_permit")

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker
        self._permit: Permit | None = None

    def __enter__(self) -> Permit:
        self._permit = self._breaker.acquire()
        return self._permit

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        permit, self._permit = self._permit, None
        if permit is None or permit.done:  # the block completed the permit itself
            return
        if exc is None:
            permit.success()
        else:
            permit.record_exception(exc)

    async def __aenter__(self) -> Permit:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)


class CircuitBreaker:
    """A thread-safe circuit breaker for one downstream; see the module docstring for semantics.

    Args:
        name: name used in errors, logs, listeners and snapshots (e.g. ``"soap:orders"``).
        policy: thresholds and classifiers; defaults to :class:`BreakerPolicy()`.
        clock: monotonic clock in seconds; inject a fake one in tests.
        listeners: callables ``(name, old_state, new_state)`` called after every transition,
            outside the lock. A listener that raises is logged and skipped.
    """

    def __init__(
        self,
        name: str,
        policy: BreakerPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        listeners: Iterable[BreakerListener] = (),
    ) -> None:
        self.name = name
        self.policy = policy if policy is not None else BreakerPolicy()
        self._clock = clock
        self._listeners = list(listeners)
        self._call_listeners: list[CallListener] = []
        # Guards every field below; never held while a protected call runs or a listener runs.
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._generation = 0
        self._window = _Window(self.policy.window_size)
        self._in_flight = 0  # half-open trial calls admitted and not yet completed
        self._opened_at: float | None = None
        self._open_until = 0.0
        self._rejected = 0

    # ------------------------------------------------------------------ public API

    @property
    def state(self) -> BreakerState:
        """Current state; moves ``OPEN`` to ``HALF_OPEN`` first if the wait has elapsed."""
        with self._lock:
            changes = self._refresh(self._clock())
            state = self._state
        self._notify(changes)
        return state

    def add_listener(self, listener: BreakerListener) -> None:
        """Register a transition listener ``(name, old_state, new_state)``.

        Args:
            listener: the callable; it runs outside the lock after each transition.
        """
        with self._lock:
            self._listeners.append(listener)

    def add_call_listener(self, listener: CallListener) -> None:
        """Register a per-call listener ``(name, outcome)`` (see :data:`CallListener`).

        Args:
            listener: the callable; it runs outside the lock, in the calling thread.
        """
        with self._lock:
            self._call_listeners.append(listener)

    def acquire(self) -> Permit:
        """Take a permit for one call; complete it with ``success()``/``failure()``/``release()``.

        Prefer :meth:`call` or :meth:`calling`; use this when the outcome is decided elsewhere.

        Returns:
            The permit for the call.

        Raises:
            CircuitOpenError: the breaker is open, or half-open with every trial permit taken.
        """
        now = self._clock()
        error: CircuitOpenError | None = None
        with self._lock:
            changes = self._refresh(now)
            if self._state is BreakerState.OPEN:
                error = CircuitOpenError(self.name, max(0.0, self._open_until - now))
            elif self._state is BreakerState.HALF_OPEN and (
                self._in_flight + len(self._window) >= self.policy.half_open_permits
            ):
                # The trial's verdict is pending; a healthy downstream answers within the slow-call
                # duration, so that is the best estimate of when to come back.
                error = CircuitOpenError(self.name, self.policy.slow_call_duration)
            else:
                if self._state is BreakerState.HALF_OPEN:
                    self._in_flight += 1
                permit = Permit(self, self._generation, now)
            if error is not None:
                self._rejected += 1
        self._notify(changes)
        if error is not None:
            self._notify_call("rejected")
            raise error
        return permit

    def calling(self) -> _Calling:
        """Context manager guarding a block: ``with breaker.calling(): ...``.

        The block's outcome is recorded on exit: normal exit is a success, an exception is
        classified by the policy (and re-raised). It works around ``await`` in ``async def``
        code, and also as ``async with``. The target is the :class:`Permit`; completing it inside
        the block (e.g. ``permit.failure()`` for a returned 503) takes precedence.

        Returns:
            A context manager whose ``__enter__`` raises ``CircuitOpenError`` when rejected.
        """
        return _Calling(self)

    def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Call ``fn(*args, **kwargs)`` through the breaker.

        Args:
            fn: a synchronous callable; for coroutine functions use :meth:`call_async`.
            *args: positional arguments for ``fn``.
            **kwargs: keyword arguments for ``fn``.

        Returns:
            Whatever ``fn`` returns.

        Raises:
            CircuitOpenError: the call was rejected and ``fn`` not called.
            TypeError: ``fn`` is a coroutine function or returned an awaitable (counting it would
                be the pybreaker trap: a success recorded before the work happened).
        """
        if inspect.iscoroutinefunction(fn):
            raise TypeError(f"{fn!r} is a coroutine function: use `await breaker.call_async(...)`")
        with self.calling() as permit:
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                permit.release()
                if inspect.iscoroutine(result):
                    result.close()
                raise TypeError(f"{fn!r} returned an awaitable: use `await breaker.call_async(...)`")
            return result

    async def call_async(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """Await ``fn(*args, **kwargs)`` through the breaker.

        Args:
            fn: a callable returning an awaitable (e.g. an ``async def`` function).
            *args: positional arguments for ``fn``.
            **kwargs: keyword arguments for ``fn``.

        Returns:
            The awaited result.

        Raises:
            CircuitOpenError: the call was rejected and ``fn`` not called.
        """
        async with self.calling():
            return await fn(*args, **kwargs)

    def snapshot(self) -> dict[str, Any]:
        """Point-in-time view for APIs and metrics.

        Returns:
            A dict with ``name``, ``state`` (its string value), ``failure_rate`` and
            ``slow_call_rate`` (percent of the buffered calls of the current state's window;
            0.0 when empty; while ``OPEN``, the frozen window that opened the breaker), ``buffered_calls``, ``failed_calls``, ``slow_calls``,
            ``half_open_in_flight``, ``rejected_calls`` (total since creation), ``opened_at``
            (breaker-clock time of the last opening, ``None`` when closed) and ``retry_after``
            (seconds until half-open; 0.0 unless open).
        """
        with self._lock:
            now = self._clock()
            changes = self._refresh(now)
            snap: dict[str, Any] = {
                "name": self.name,
                "state": self._state.value,
                "failure_rate": self._window.failure_rate,
                "slow_call_rate": self._window.slow_call_rate,
                "buffered_calls": len(self._window),
                "failed_calls": self._window.failed,
                "slow_calls": self._window.slow,
                "half_open_in_flight": self._in_flight,
                "rejected_calls": self._rejected,
                "opened_at": self._opened_at,
                "retry_after": max(0.0, self._open_until - now) if self._state is BreakerState.OPEN else 0.0,
            }
        self._notify(changes)
        return snap

    def reset(self) -> None:
        """Close the breaker with an empty window; outcomes of calls in flight are discarded."""
        with self._lock:
            changes = self._transition(BreakerState.CLOSED, self._clock())
        self._notify(changes)

    def force_open(self, wait: float | None = None) -> None:
        """Open the breaker now, e.g. from an operator endpoint or a health check.

        Args:
            wait: seconds to stay open before half-opening; defaults to ``policy.wait_in_open``.
                ``math.inf`` keeps it open until :meth:`reset`.
        """
        with self._lock:
            changes = self._transition(BreakerState.OPEN, self._clock(), wait)
        self._notify(changes)

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self._state.value})"

    # ------------------------------------------------------------------ internals (lock held)

    def _complete(self, permit: Permit, outcome: Outcome) -> None:
        """Record one permit's outcome and apply any transition it causes."""
        now = self._clock()
        with self._lock:
            if permit._done:
                raise RuntimeError(f"permit of breaker {self.name!r} already completed")
            permit._done = True
            changes = self._record(permit, outcome, now)
        self._notify(changes)
        self._notify_call(outcome.value)
        if outcome is not Outcome.IGNORED and now - permit.started_at > self.policy.slow_call_duration:
            self._notify_call("slow")

    def _record(self, permit: Permit, outcome: Outcome, now: float) -> list[tuple[BreakerState, BreakerState]]:
        """Count ``outcome`` in the current window unless the permit is from an older state."""
        if permit.generation != self._generation:
            return []  # admitted before the last transition: says nothing about this state
        half_open = self._state is BreakerState.HALF_OPEN
        if half_open:
            self._in_flight -= 1
        if outcome is Outcome.IGNORED:
            return []
        slow = now - permit.started_at > self.policy.slow_call_duration
        self._window.record(outcome is Outcome.FAILURE, slow)
        needed = self.policy.half_open_permits if half_open else min(self.policy.minimum_calls, self.policy.window_size)
        if len(self._window) < needed:
            return []
        exceeded = (
            self._window.failure_rate >= self.policy.failure_rate_threshold
            or self._window.slow_call_rate >= self.policy.slow_call_rate_threshold
        )
        if exceeded:
            return self._transition(BreakerState.OPEN, now)
        if half_open:
            return self._transition(BreakerState.CLOSED, now)
        return []

    def _refresh(self, now: float) -> list[tuple[BreakerState, BreakerState]]:
        """Half-open lazily once the wait in ``OPEN`` has elapsed."""
        if self._state is BreakerState.OPEN and now >= self._open_until:
            return self._transition(BreakerState.HALF_OPEN, now)
        return []

    def _transition(
        self, new: BreakerState, now: float, wait: float | None = None
    ) -> list[tuple[BreakerState, BreakerState]]:
        """Enter ``new`` with fresh bookkeeping; returns the change to notify (none if same state)."""
        old = self._state
        self._state = new
        self._generation += 1
        self._in_flight = 0
        if new is BreakerState.OPEN:
            self._opened_at = now
            self._open_until = now + (self.policy.wait_in_open if wait is None else wait)
        elif new is BreakerState.HALF_OPEN:
            self._window = _Window(self.policy.half_open_permits)
        else:
            self._window = _Window(self.policy.window_size)
            self._opened_at = None
        return [] if old is new else [(old, new)]

    def _notify_call(self, outcome: str) -> None:
        """Tell call listeners about one call's outcome; runs without the lock."""
        for listener in list(self._call_listeners):
            try:
                listener(self.name, outcome)
            except Exception:
                log.exception("circuit breaker %r: call listener %r failed", self.name, listener)

    def _notify(self, changes: list[tuple[BreakerState, BreakerState]]) -> None:
        """Log and tell listeners about transitions; runs without the lock."""
        for old, new in changes:
            log.warning("circuit breaker %r: %s -> %s", self.name, old.value, new.value)
            for listener in list(self._listeners):
                try:
                    listener(self.name, old, new)
                except Exception:
                    log.exception("circuit breaker %r: listener %r failed", self.name, listener)


def guarded(
    retry_policy: RetryPolicy,
    breaker: CircuitBreaker,
    fn: Callable[..., T],
    /,
    *args: Any,
    sleep: Callable[[float], None] = time.sleep,
    budget: RetryBudget | None = None,
    **kwargs: Any,
) -> T:
    """Call ``fn`` as ``Retry(CircuitBreaker(call))``: each attempt goes through the breaker.

    An open breaker ends the retries at once (``CircuitOpenError`` is never retried), and
    permanent errors are not retried either. The innermost ``Timeout`` layer is the client's own
    timeout (zeep ``operation_timeout``, socket and HTTP timeouts): a synchronous call cannot be
    abandoned safely from outside, so ``fn`` must bound itself.

    Args:
        retry_policy: attempts, backoff and deadline.
        breaker: the downstream's breaker.
        fn: the synchronous call.
        *args: positional arguments for ``fn``.
        sleep: how to wait between attempts (inject a fake in tests); not passed to ``fn``.
        budget: the downstream's retry budget (see :func:`~gateway.resilience.retrying`); not
            passed to ``fn``.
        **kwargs: keyword arguments for ``fn``.

    Returns:
        What ``fn`` returns on the first successful attempt.

    Raises:
        CircuitOpenError: the breaker rejected an attempt.
        Exception: the first non-retryable error, or the last one when retries ran out.
    """
    result: T = retrying(retry_policy, budget=budget, sleep=sleep)(breaker.call, fn, *args, **kwargs)
    return result
