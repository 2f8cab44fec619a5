"""Named circuit breakers shared by everything that calls the same downstream.

Sources whose adapters talk to one endpoint (several SOAP operations of one service, several
tables of one database) return the same :meth:`~adapters.base.PollingSource.breaker_key`; the
runtime hands all runners one :class:`BreakerRegistry`, so they share one breaker and an outage
seen by one source pauses every source behind that endpoint.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from gateway.resilience.breaker import BreakerPolicy, CircuitBreaker

__all__ = ["BreakerRegistry"]


class BreakerRegistry:
    """Thread-safe get-or-create of circuit breakers by name.

    Args:
        clock: monotonic clock of the breakers this registry creates (tests inject a fake one).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._breakers: dict[str, CircuitBreaker] = {}

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
            if breaker is None:
                breaker = self._breakers[name] = CircuitBreaker(name, policy, clock=self._clock)
            return breaker

    def names(self) -> list[str]:
        """Names of the breakers created so far, sorted."""
        with self._lock:
            return sorted(self._breakers)

    def snapshot(self) -> dict[str, dict[str, object]]:
        """Every breaker's :meth:`~gateway.resilience.CircuitBreaker.snapshot`, by name."""
        with self._lock:
            breakers = list(self._breakers.values())
        return {b.name: b.snapshot() for b in breakers}  # outside the lock: snapshots may notify

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._breakers

    def __len__(self) -> int:
        with self._lock:
            return len(self._breakers)
