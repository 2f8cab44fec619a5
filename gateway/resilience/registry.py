"""Named circuit breakers and retry budgets shared by everything that calls the same downstream.

Sources whose adapters talk to one endpoint (several SOAP operations of one service, several
tables of one database) return the same :meth:`~adapters.base.PollingSource.breaker_key`; the
runtime hands all runners one :class:`BreakerRegistry`, so they share one breaker and one retry
budget: an outage seen by one source pauses every source behind that endpoint, and their retries
together stay within one budget.

With ``metrics``, every breaker and budget the registry creates is observed
(:class:`~gateway.metrics.ResilienceMetrics`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.resilience.breaker import BreakerPolicy, CircuitBreaker
from gateway.resilience.budget import BudgetPolicy, RetryBudget

if TYPE_CHECKING:
    from gateway.metrics import ResilienceMetrics

__all__ = ["BreakerRegistry"]


class BreakerRegistry:
    """Thread-safe get-or-create of circuit breakers and retry budgets by downstream name.

    Args:
        clock: monotonic clock of the breakers and budgets this registry creates (tests inject a
            fake one).
        metrics: when given, every breaker and budget created here is observed by it.
        budget_policy: the policy of a new budget whose caller passes none, by name (the runtime
            passes ``settings.resilience.budget_policy``); default :class:`BudgetPolicy()`.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        metrics: ResilienceMetrics | None = None,
        budget_policy: Callable[[str], BudgetPolicy] | None = None,
    ) -> None:
        self._clock = clock
        self._metrics = metrics
        self._budget_policy = budget_policy
        self._lock = threading.Lock()
        self._breakers: dict[str, CircuitBreaker] = {}
        self._budgets: dict[str, RetryBudget] = {}

    def get(self, name: str, policy: BreakerPolicy | None = None) -> CircuitBreaker:
        """The breaker called ``name``, created with ``policy`` if it does not exist yet.

        The first caller's policy wins: later callers get the existing breaker whatever policy
        they pass (sources sharing an endpoint should configure the same breaker settings).

        Args:
            name: the breaker's name, e.g. ``"source:orders"`` or ``"soap:https://erp/orders"``.
            policy: the policy for a new breaker (default :class:`BreakerPolicy()`).

        Returns:
            The shared breaker.
        """
        with self._lock:
            breaker = self._breakers.get(name)
            created = breaker is None
            if breaker is None:
                breaker = self._breakers[name] = CircuitBreaker(name, policy, clock=self._clock)
        if created and self._metrics is not None:
            self._metrics.observe_breaker(breaker)
        return breaker

    def budget(self, name: str, policy: BudgetPolicy | None = None) -> RetryBudget:
        """The retry budget of downstream ``name`` (the breaker's name), created if new.

        As with :meth:`get`, the first caller's policy wins.

        Args:
            name: the downstream, e.g. ``"source:orders"`` or ``"store"``.
            policy: the policy for a new budget; default from ``budget_policy(name)``.

        Returns:
            The shared budget.
        """
        with self._lock:
            budget = self._budgets.get(name)
            created = budget is None
            if budget is None:
                if policy is None and self._budget_policy is not None:
                    policy = self._budget_policy(name)
                budget = self._budgets[name] = RetryBudget(name, policy, clock=self._clock)
        if created and self._metrics is not None:
            self._metrics.observe_budget(budget)
        return budget

    def names(self) -> list[str]:
        """Names of the breakers created so far, sorted."""
        with self._lock:
            return sorted(self._breakers)

    def snapshot(self) -> dict[str, dict[str, object]]:
        """Every breaker's :meth:`~gateway.resilience.CircuitBreaker.snapshot`, by name."""
        with self._lock:
            breakers = list(self._breakers.values())
        return {b.name: b.snapshot() for b in breakers}  # outside the lock: snapshots may notify

    def budget_snapshot(self) -> dict[str, dict[str, object]]:
        """Every budget's :meth:`~gateway.resilience.RetryBudget.snapshot`, by name."""
        with self._lock:
            budgets = list(self._budgets.values())
        return {b.name: b.snapshot() for b in budgets}

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._breakers

    def __len__(self) -> int:
        with self._lock:
            return len(self._breakers)
