"""Retry policies (tenacity), retry budgets and circuit breakers; wrap outside calls as
Retry(Breaker(Timeout(call))), with retries capped by the downstream's budget."""

from gateway.resilience.backpressure import OutboxBackpressure
from gateway.resilience.breaker import (
    BreakerListener,
    BreakerPolicy,
    BreakerState,
    CallListener,
    CircuitBreaker,
    ExceptionClassifier,
    Outcome,
    Permit,
    guarded,
)
from gateway.resilience.budget import BudgetListener, BudgetPolicy, RetryBudget
from gateway.resilience.registry import BreakerRegistry
from gateway.resilience.retry import RetryPolicy, retrying

__all__ = [
    "BreakerListener",
    "BreakerPolicy",
    "BreakerRegistry",
    "BreakerState",
    "BudgetListener",
    "BudgetPolicy",
    "CallListener",
    "CircuitBreaker",
    "ExceptionClassifier",
    "OutboxBackpressure",
    "Outcome",
    "Permit",
    "RetryBudget",
    "RetryPolicy",
    "guarded",
    "retrying",
]
