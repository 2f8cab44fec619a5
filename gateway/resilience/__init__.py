"""Retry policies (tenacity) and circuit breakers; wrap outside calls as Retry(Breaker(Timeout(call)))."""

from gateway.resilience.breaker import (
    BreakerListener,
    BreakerPolicy,
    BreakerState,
    CircuitBreaker,
    ExceptionClassifier,
    Outcome,
    Permit,
    guarded,
)
from gateway.resilience.retry import RetryPolicy, retrying

__all__ = [
    "BreakerListener",
    "BreakerPolicy",
    "BreakerState",
    "CircuitBreaker",
    "ExceptionClassifier",
    "Outcome",
    "Permit",
    "RetryPolicy",
    "guarded",
    "retrying",
]
