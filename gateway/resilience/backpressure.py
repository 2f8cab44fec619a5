"""Backpressure on intake from the outbox backlog (REL-09): pause, never drop.

When the relay cannot publish (the broker refuses with ``reject-publish``, blocks the connection,
or is down), accepted events pile up as pending outbox rows. Above a threshold the gateway stops
taking more: the REST API answers 503 with ``Retry-After`` (:class:`~gateway.api.limits.BacklogGuard`)
and the source runners stop polling (state ``backpressure``) -- the legacy systems keep their
records, the cursors do not move, nothing is lost.

:class:`OutboxBackpressure` is the pollers' gate. It is cheap to ask: the pending count is read
from the store at most every ``interval`` seconds, shared by every runner of the process. It has
hysteresis: it engages above ``threshold`` and releases only below ``resume_ratio * threshold``,
so pollers do not flap at the boundary.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from gateway.errors import ConfigurationError

__all__ = ["OutboxBackpressure"]

log = logging.getLogger("gateway.backpressure")


class OutboxBackpressure:
    """A thread-safe, cached, hysteretic "is the outbox backlog too large?" gate.

    Args:
        count: returns the number of pending outbox rows (``lambda: store.pending_stats()[0]``).
        threshold: pending rows above which the gate engages.
        resume_ratio: the gate releases when the backlog drops below ``resume_ratio * threshold``.
        interval: seconds a measured count is reused.
        clock: monotonic clock (tests inject a fake one).
    """

    def __init__(
        self,
        count: Callable[[], int],
        threshold: int,
        *,
        resume_ratio: float = 0.9,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold < 1 or not 0 < resume_ratio <= 1 or interval < 0:
            raise ConfigurationError(
                "invalid OutboxBackpressure: threshold >= 1, 0 < resume_ratio <= 1, interval >= 0"
            )
        self._count = count
        self.threshold = threshold
        self.resume_below = resume_ratio * threshold
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._refresh = threading.Lock()  # one counting thread at a time; others use the cache
        self._measured_at = float("-inf")
        self._pending: int | None = None
        self._engaged = False

    @property
    def pending(self) -> int | None:
        """The last measured backlog (``None`` before the first successful count)."""
        with self._lock:
            return self._pending

    def engaged(self) -> bool:
        """Whether intake should pause now (the count is refreshed when older than ``interval``).

        A count that fails (store down) keeps the last verdict: the store's own errors stop the
        pollers anyway.
        """
        now = self._clock()
        with self._lock:
            stale = now - self._measured_at >= self.interval
        if stale and self._refresh.acquire(blocking=False):
            try:
                try:
                    pending = int(self._count())
                except Exception as exc:  # noqa: BLE001 -- keep the last verdict
                    log.warning("backpressure: cannot count the outbox backlog (%s)", type(exc).__name__)
                    with self._lock:
                        self._measured_at = now
                else:
                    self._update(pending, now)
            finally:
                self._refresh.release()
        with self._lock:
            return self._engaged

    def _update(self, pending: int, now: float) -> None:
        with self._lock:
            self._pending, self._measured_at = pending, now
            if not self._engaged and pending > self.threshold:
                self._engaged = True
            elif self._engaged and pending < self.resume_below:
                self._engaged = False
