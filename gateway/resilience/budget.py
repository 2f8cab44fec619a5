"""A per-downstream retry budget: a token bucket that caps retries at a share of calls (REL-12).

Like Finagle's ``RetryBudget``: every *first* attempt of a call deposits ``ratio`` tokens (0.1 by
default), every retry withdraws one whole token. A retry that finds less than one token is not
made: the error propagates at once. So over any stretch of calls, retries stay below
``reserve + ratio * calls`` -- an outage cannot multiply the load on a downstream by the retry
policy's attempt count.

The bucket starts full at ``reserve`` tokens, and ``min_retries_per_second`` refills it over
time (never above ``reserve``), so a quiet downstream -- a SOAP service polled once a minute --
can still retry a blip without first earning ten calls' worth of deposits. Deposits never raise
the balance above ``reserve`` either: a long healthy spell does not bank a retry storm.

One budget per downstream, shared by every caller of it (see
:meth:`~gateway.resilience.BreakerRegistry.budget`), like the breaker of the same name.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from gateway.errors import ConfigurationError

__all__ = ["BudgetEvent", "BudgetListener", "BudgetPolicy", "RetryBudget"]

log = logging.getLogger("gateway.retry.budget")

BudgetEvent = Literal["retry", "exhausted"]
BudgetListener = Callable[[str, BudgetEvent], None]
"""Called as ``listener(budget_name, event)``: ``"retry"`` for every withdrawal (a retry is made),
``"exhausted"`` for every retry refused."""


@dataclass(frozen=True, slots=True)
class BudgetPolicy:
    """How many retries one downstream may take.

    Attributes:
        ratio: tokens deposited by every first attempt; one retry costs one token, so this is the
            long-run share of calls that may be retried (0.1: at most one retry per ten calls).
        reserve: tokens in a new bucket, and the most it ever holds (at least 1).
        min_retries_per_second: tokens added per second of wall time (up to ``reserve``), so a
            rarely called downstream can still retry; 0 switches the refill off.
    """

    ratio: float = 0.1
    reserve: float = 10.0
    min_retries_per_second: float = 0.1

    def __post_init__(self) -> None:
        problems = [
            msg
            for bad, msg in (
                (not 0 <= self.ratio <= 1, "ratio must be in [0, 1]"),
                (not self.reserve >= 0, "reserve must be >= 0"),
                (not self.min_retries_per_second >= 0, "min_retries_per_second must be >= 0"),
            )
            if bad
        ]
        if problems:
            raise ConfigurationError("invalid BudgetPolicy: " + "; ".join(problems))


class RetryBudget:
    """A thread-safe token bucket of retries for one downstream.

    Args:
        name: the downstream (the same key as its circuit breaker), used in logs and metrics.
        policy: ratio, reserve and refill; defaults to :class:`BudgetPolicy()`.
        clock: monotonic clock for the time refill; inject a fake one in tests.
        listeners: callables ``(name, event)``, see :data:`BudgetListener`; run outside the lock,
            a listener that raises is logged and skipped.
    """

    def __init__(
        self,
        name: str,
        policy: BudgetPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        listeners: Iterable[BudgetListener] = (),
    ) -> None:
        self.name = name
        self.policy = policy if policy is not None else BudgetPolicy()
        self._clock = clock
        self._listeners = list(listeners)
        self._lock = threading.Lock()
        self._balance = self.policy.reserve
        self._refilled_at = clock()
        self._exhausted = False  # inside an exhaustion episode: logged once, until a retry is allowed
        self._retries = 0
        self._refused = 0

    def add_listener(self, listener: BudgetListener) -> None:
        """Register a listener ``(name, event)``."""
        with self._lock:
            self._listeners.append(listener)

    def deposit(self) -> None:
        """Credit one first attempt (call it once per call, not per retry)."""
        with self._lock:
            self._refill(self._clock())
            self._balance = min(self._balance + self.policy.ratio, self._cap())
            recovered = self._episode_over()
        if recovered:
            log.info("retry budget of %r refilled: retries allowed again", self.name)

    def try_withdraw(self) -> bool:
        """Take one token for a retry.

        Returns:
            ``True`` when the retry may be made; ``False`` when the budget is exhausted (the caller
            must give up at once). The first refusal of an exhaustion episode is logged as a
            WARNING; the episode ends when the bucket is full again, so a downstream that keeps
            failing is logged once, not once per token it earns.
        """
        with self._lock:
            self._refill(self._clock())
            recovered = self._episode_over()
            allowed = self._balance >= 1.0 - 1e-9  # ten deposits of 0.1 make one token despite float sums
            first_refusal = False
            if allowed:
                self._balance -= 1.0
                self._retries += 1
            else:
                self._refused += 1
                first_refusal, self._exhausted = not self._exhausted, True
        if recovered:
            log.info("retry budget of %r refilled: retries allowed again", self.name)
        if first_refusal:
            log.warning(
                "retry budget of %r exhausted (retries are capped at %.0f %% of calls plus a reserve of %g): "
                "errors propagate without retry until it refills",
                self.name, 100 * self.policy.ratio, self.policy.reserve,
            )
        self._notify("retry" if allowed else "exhausted")
        return allowed

    @property
    def balance(self) -> float:
        """Tokens available now (one retry costs one)."""
        with self._lock:
            self._refill(self._clock())
            return self._balance

    def snapshot(self) -> dict[str, Any]:
        """``name``, ``balance``, ``exhausted`` (inside an exhaustion episode), ``retries`` and
        ``refused`` (totals since creation)."""
        with self._lock:
            self._refill(self._clock())
            return {
                "name": self.name,
                "balance": self._balance,
                "exhausted": self._exhausted,
                "retries": self._retries,
                "refused": self._refused,
            }

    def __repr__(self) -> str:
        return f"RetryBudget({self.name!r}, balance={self._balance:.2f})"

    # ------------------------------------------------------------------ internals
    def _cap(self) -> float:
        """The most tokens the bucket holds: ``reserve``, but at least one retry's worth, so a
        budget with ``reserve: 0`` still earns one retry per ``1/ratio`` calls."""
        return max(self.policy.reserve, 1.0)

    def _refill(self, now: float) -> None:
        """Add the time refill since the last look (lock held)."""
        elapsed = max(0.0, now - self._refilled_at)
        self._refilled_at = now
        rate = self.policy.min_retries_per_second
        if rate > 0 and self._balance < self._cap():
            self._balance = min(self._balance + rate * elapsed, self._cap())

    def _episode_over(self) -> bool:
        """End the exhaustion episode once the bucket is full again; returns whether it ended now."""
        if self._exhausted and self._balance >= self._cap() - 1e-9:
            self._exhausted = False
            return True
        return False

    def _notify(self, event: BudgetEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(self.name, event)
            except Exception:
                log.exception("retry budget %r: listener %r failed", self.name, listener)
