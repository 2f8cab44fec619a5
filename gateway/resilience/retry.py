"""Retry policies as data, executed by tenacity.

Only :class:`~gateway.errors.TransientError` is retried -- never permanent errors, configuration
errors or an open circuit. Backoff is full-jitter exponential, bounded by attempts AND total delay,
with one WARNING log line before each sleep. ``sleep`` is injectable so tests need not wait.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from gateway.errors import CircuitOpenError, TransientError

__all__ = ["RetryPolicy", "retrying"]

log = logging.getLogger("gateway.retry")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How one downstream is retried.

    Attributes:
        attempts: most attempts in total (the first call included).
        base_delay: scale of the backoff (first wait is uniform in [0, base_delay]).
        max_delay: cap of one wait.
        deadline: cap of the total time spent retrying, in seconds.
    """

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 10.0
    deadline: float = 60.0


def retrying(policy: RetryPolicy, *, sleep: Callable[[float], None] = time.sleep, logger: logging.Logger = log) -> Retrying:
    """A tenacity ``Retrying`` for ``policy``; use as ``for attempt in retrying(p): with attempt: ...``."""
    return Retrying(
        # CircuitOpenError is a TransientError for callers further out (503 + Retry-After), but
        # retrying it in-process would only hammer the breaker: exclude it explicitly (REL-12).
        retry=retry_if_exception_type(TransientError) & retry_if_not_exception_type(CircuitOpenError),
        wait=wait_random_exponential(multiplier=policy.base_delay, max=policy.max_delay),
        stop=stop_after_attempt(policy.attempts) | stop_after_delay(policy.deadline),
        before_sleep=before_sleep_log(logger, logging.WARNING),
        sleep=sleep,
        reraise=True,
    )
