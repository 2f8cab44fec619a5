"""Retry policies as data, executed by tenacity (REL-12).

Only :class:`~gateway.errors.TransientError` is retried -- never permanent errors, configuration
errors, skippable items or an open circuit. Backoff is full-jitter exponential, bounded by
attempts AND a total deadline, with one WARNING log line before each sleep. A
:class:`~gateway.resilience.budget.RetryBudget` caps retries at a share of calls per downstream:
when it is empty the error propagates at once. ``sleep`` and ``clock`` are injectable so tests
check schedules without waiting.

Order of the decisions after a failed attempt: is the error retryable (transient, not an open
circuit)? -> is an attempt left? -> does the deadline leave room for the next wait? -> does the
budget give a token? Only then the WARNING is logged and the wait starts; the budget is asked
last, so a token is never spent on a retry that the other limits would refuse anyway.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from tenacity import (
    RetryCallState,
    Retrying,
    before_sleep_log,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from gateway.errors import CircuitOpenError, ConfigurationError, TransientError
from gateway.resilience.budget import RetryBudget

__all__ = ["RetryPolicy", "retrying"]

log = logging.getLogger("gateway.retry")

_STARTED = "_gateway_started_at"  # attribute stashed on tenacity's per-call RetryCallState


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How one downstream is retried.

    Attributes:
        attempts: most attempts in total (the first call included); 1 means no retry.
        base_delay: scale of the backoff (first wait is uniform in [0, base_delay]).
        max_delay: cap of one wait.
        deadline: cap of the total time of one call, retries and waits included, in seconds: a
            wait that would end past it is not started.
    """

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 10.0
    deadline: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_delay < 0 or self.max_delay < 0 or self.deadline < 0:
            raise ConfigurationError(
                "invalid RetryPolicy: attempts must be >= 1, base_delay, max_delay and deadline >= 0"
            )


class _stop_at_deadline(stop_base):
    """Stop when the upcoming wait would end past ``deadline`` seconds after the first attempt."""

    def __init__(self, deadline: float, clock: Callable[[], float]) -> None:
        self.deadline = deadline
        self.clock = clock

    def __call__(self, retry_state: RetryCallState) -> bool:
        started = getattr(retry_state, _STARTED, None)
        if started is None:
            return False
        return self.clock() - started + retry_state.upcoming_sleep > self.deadline


class _stop_without_budget(stop_base):
    """Stop when the budget refuses a token; takes the token otherwise (evaluated last)."""

    def __init__(self, budget: RetryBudget) -> None:
        self.budget = budget

    def __call__(self, retry_state: RetryCallState) -> bool:
        return not self.budget.try_withdraw()


def retrying(
    policy: RetryPolicy,
    *,
    budget: RetryBudget | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    logger: logging.Logger = log,
) -> Retrying:
    """A tenacity ``Retrying`` for ``policy``; use as ``for attempt in retrying(p): with attempt: ...``.

    The object may be reused for many calls (each ``for`` loop is one call), but by one thread at
    a time.

    Args:
        policy: attempts, backoff and deadline.
        budget: the downstream's retry budget: every call deposits into it, every retry takes a
            token, and a refused token ends the call with its last error. ``None``: unbudgeted
            (start-up checks, tests).
        sleep: how to wait between attempts.
        clock: monotonic clock for the deadline (tests inject a fake one that ``sleep`` moves).
        logger: where the one WARNING per retry goes.

    Returns:
        The tenacity ``Retrying`` (``reraise=True``: the caller sees the last error itself).
    """

    def before(retry_state: RetryCallState) -> None:  # tenacity runs it before every attempt
        if retry_state.attempt_number != 1:
            return
        setattr(retry_state, _STARTED, clock())
        if budget is not None:
            budget.deposit()  # once per call: retries earn nothing

    # any() short-circuits: the budget is asked only when attempts and deadline allow a retry.
    stop = stop_after_attempt(policy.attempts) | _stop_at_deadline(policy.deadline, clock)
    if budget is not None:
        stop = stop | _stop_without_budget(budget)
    return Retrying(
        # CircuitOpenError is a TransientError for callers further out (503 + Retry-After), but
        # retrying it in-process would only hammer the breaker: exclude it explicitly (REL-12).
        retry=retry_if_exception_type(TransientError) & retry_if_not_exception_type(CircuitOpenError),
        wait=wait_random_exponential(multiplier=policy.base_delay, max=policy.max_delay),
        stop=stop,
        before=before,
        before_sleep=before_sleep_log(logger, logging.WARNING),
        sleep=sleep,
        reraise=True,
    )
