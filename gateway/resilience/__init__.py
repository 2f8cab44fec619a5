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
from gateway.resilience.registry import BreakerRegistry
from gateway.resilience.retry import RetryPolicy, retrying

__all__ = [
    "BreakerListener",
    "BreakerPolicy",
    "BreakerRegistry",
    "BreakerState",
    "CircuitBreaker",
    "ExceptionClassifier",
    "Outcome",
    "Permit",
    "RetryPolicy",
    "guarded",
    "retrying",
]
