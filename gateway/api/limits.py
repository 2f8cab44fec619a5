"""Request limits: body size (a pure ASGI middleware), outbox backpressure and the per-key rate limit."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import BackpressureError, StoreUnavailableError
from gateway.store import EventStore

__all__ = ["MAX_BATCH_EVENTS", "BodyTooLarge", "BodySizeLimitMiddleware", "BacklogGuard", "KeyRateLimiter"]

#: Largest number of events in one ``POST /v1/events`` batch.
MAX_BATCH_EVENTS = 1000


class BodyTooLarge(HTTPException):
    """The request body exceeds the configured cap (answered as a 413 problem)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")
        self.limit = limit


class BodySizeLimitMiddleware:
    """Refuse request bodies larger than ``max_body_bytes`` with 413.

    A declared ``Content-Length`` above the cap is refused before the application runs. A body
    without one (chunked) is counted while the application reads it; the read that crosses the cap
    raises :class:`BodyTooLarge`, so the rest is never buffered. The exception is answered by the
    application's problem handler, or here if it escapes before a response started.

    Args:
        app: the wrapped ASGI application.
        max_body_bytes: the cap in bytes.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            try:
                too_large = int(declared) > limit
            except ValueError:
                too_large = False  # the server rejects malformed framing itself
            if too_large:
                await self._refuse(scope, receive, send, BodyTooLarge(limit))
                return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:
            if started:
                raise
            await self._refuse(scope, receive, send, exc)
        except BaseExceptionGroup as group:
            match, rest = group.split(BodyTooLarge)
            if match is None or rest is not None or started:
                raise
            await self._refuse(scope, receive, send, BodyTooLarge(limit))

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, exc: BodyTooLarge) -> None:
        from gateway.api.problems import problem_response

        response = problem_response(
            Request(scope, receive), 413, detail=str(exc.detail), headers={"Connection": "close"}
        )
        await response(scope, receive, send)


class BacklogGuard:
    """Refuse ingestion while the outbox holds more than ``threshold`` pending rows.

    The pending count is cached for ``ttl`` seconds so a busy API does not count the outbox on
    every request; the threshold is therefore a soft limit.

    Args:
        threshold: pending rows above which :meth:`check` raises.
        ttl: seconds a measured count is reused (0: count on every call).
        retry_after: seconds the client is told to wait.
        clock: monotonic clock; injectable for tests.
    """

    def __init__(
        self,
        threshold: int,
        *,
        ttl: float = 0.5,
        retry_after: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.ttl = ttl
        self.retry_after = retry_after
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, int] | None = None

    def pending(self, store: EventStore) -> int:
        """The (possibly cached) number of pending outbox rows.

        Raises:
            StoreUnavailableError: the store could not be queried.
        """
        now = self._clock()
        with self._lock:
            if self._cached is not None and now - self._cached[0] < self.ttl:
                return self._cached[1]
        try:
            count = store.pending_stats()[0]
        except SQLAlchemyError as exc:
            raise StoreUnavailableError(f"cannot count pending events: {type(exc).__name__}") from exc
        with self._lock:
            self._cached = (now, count)
        return count

    def check(self, store: EventStore) -> None:
        """Raise :class:`BackpressureError` when the backlog is above the threshold."""
        count = self.pending(store)
        if count > self.threshold:
            raise BackpressureError(
                f"the outbox holds {count} undelivered events (threshold {self.threshold}); "
                "nothing was accepted, retry later",
                retry_after=self.retry_after,
            )


class KeyRateLimiter:
    """A token bucket per API key, in this process: ``rate`` requests per second, ``burst`` at once.

    Each key's bucket starts full (``burst`` tokens) and refills at ``rate`` tokens per second; a
    request takes one token. Buckets live in this process only, so N API replicas allow N times
    the rate in total. A hand-written bucket (about 20 lines) rather than a library: the
    ``limits`` package offers fixed and moving windows, not a burst-plus-rate bucket.

    Args:
        rate: tokens per second; 0 disables the limit.
        burst: bucket size.
        clock: monotonic clock; injectable for tests.
    """

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def acquire(self, key: str) -> float | None:
        """Take one token of ``key``'s bucket.

        Returns:
            ``None`` when the request may go on, else the seconds until a token is available.
        """
        if self.rate <= 0:
            return None
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return None
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
