"""Delayed retries without the delayed-message plugin: the schedule and its TTL levels (REL-08).

A message that failed transiently is published to a *retry level*: a quorum queue
``<prefix>.scoring.retry.<ttl>ms`` that nobody consumes. Its ``x-message-ttl`` is the level's cap
and its dead-letter exchange routes expired messages back to the scoring queue, so the message
returns after its delay. Each message also carries a per-message ``expiration`` (full jitter
within the cap): RabbitMQ 3.10 quorum queues honour it (checked on 3.10.8), but, like classic
queues, expire only at the head of the queue. A message can therefore wait behind an earlier one
of the same level, never longer than the level's cap: every message ahead of it expires within the
cap of its own, earlier, enqueue time.

The schedule (full-jitter exponential backoff, bounded by attempts and total delay): failed
attempt ``n`` (1-based) waits a delay drawn uniformly from ``[min_delay, hi]`` with
``hi = max(min_delay, min(max_delay, base_delay * 2 ** (n - 1)))``, clipped to what is left of
``window`` after the earlier delays. When less than ``min_delay`` is left, there is no further
retry. The attempt bound itself (``bus.max_attempts``) is the caller's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config import ScoringSettings

__all__ = ["RetrySchedule"]


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    """Full-jitter exponential delays between attempts, with a total-delay window.

    Attributes:
        min_delay: shortest delay in seconds (also the lower end of every jitter range).
        base_delay: cap of the first delay; it doubles per attempt.
        max_delay: largest cap of one delay.
        window: largest sum of all delays of one message.
    """

    min_delay: float = 1.0
    base_delay: float = 1.0
    max_delay: float = 60.0
    window: float = 300.0

    def __post_init__(self) -> None:
        if not (self.min_delay >= 0 and self.base_delay > 0 and self.max_delay > 0 and self.window > 0):
            raise ValueError("retry delays must be positive (min_delay may be 0)")
        if self.max_delay < self.base_delay or self.max_delay < self.min_delay:
            raise ValueError("retry max_delay must be >= base_delay and >= min_delay")
        if self.window < self.min_delay:
            raise ValueError("retry window must be >= min_delay")

    @classmethod
    def from_settings(cls, settings: ScoringSettings) -> RetrySchedule:
        """The schedule of ``settings`` (``scoring.retry_*``)."""
        return cls(settings.retry_min_delay, settings.retry_base_delay, settings.retry_max_delay, settings.retry_window)

    def cap(self, attempt: int) -> float:
        """Upper end of the delay after failed attempt ``attempt`` (1-based)."""
        exp = self.base_delay * 2.0 ** min(max(attempt, 1) - 1, 64)
        return max(self.min_delay, min(self.max_delay, exp))

    def delay(self, attempt: int, spent: float, rng: Callable[[], float]) -> float | None:
        """The delay after failed attempt ``attempt``, or ``None`` when the window is used up.

        Args:
            attempt: the attempt that just failed (1-based).
            spent: seconds of delay already scheduled for this message.
            rng: returns a float in [0, 1) (the jitter).

        Returns:
            Seconds in ``[min_delay, cap(attempt)]``, at most ``window - spent``.
        """
        left = self.window - max(0.0, spent)
        if left < self.min_delay or left <= 0:
            return None
        lo, hi = self.min_delay, self.cap(attempt)
        return min(lo + rng() * (hi - lo), left)

    def level_ttls_ms(self, max_attempts: int) -> tuple[int, ...]:
        """The retry levels (queue TTLs, ms, ascending) that attempts ``1 .. max_attempts - 1`` use."""
        return tuple(sorted({_ms(self.cap(n)) for n in range(1, max_attempts)}))


def _ms(seconds: float) -> int:
    """Seconds as whole milliseconds, rounded up (a TTL is never shorter than its delay), >= 1."""
    return max(1, math.ceil(round(seconds * 1000.0, 6)))
