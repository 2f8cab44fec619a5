"""The source runner: poll an adapter, map records, accept events and cursor in one transaction.

The acceptance point: a batch's cursor advances only in the transaction that stores its events
(and the dead letters of its unmappable records). A crash anywhere replays at most the batch that
was not committed, and deterministic ids make the replay harmless.

Every ``fetch`` goes through the source's circuit breaker (``source:<name>``), wrapped as
``Retry(CircuitBreaker(fetch))``: each attempt is one breaker call, a transient failure counts as a
breaker failure, a permanent one (the source answered) as a success. While the breaker is open the
adapter is not called: :meth:`SourceRunner.run_once` raises ``CircuitOpenError`` at once (the retry
policy never retries it) and :meth:`SourceRunner.run` pauses the source until the breaker lets
trial polls through. The store write is not behind the source breaker: the store is the gateway's
own and has its own retry.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from adapters.base import Batch, PollingSource
from gateway.config import SourceSettings
from gateway.errors import CircuitOpenError, ContractError, FencingError, GatewayError
from gateway.events import Event, jsonable, utcnow
from gateway.events.jsonsafe import dumps
from gateway.plugins import load_adapter
from gateway.resilience import BreakerState, CircuitBreaker, RetryPolicy, retrying
from gateway.sources.mapping import Mapper
from gateway.store import AcceptResult, EventStore

__all__ = ["SourceRunner", "SourceStatus", "build_adapter"]

log = logging.getLogger("gateway.sources")

#: Longest single pause of a source whose breaker is open; the runner re-checks the breaker after
#: it (without calling the adapter), so a breaker forced open indefinitely is re-checked regularly.
MAX_PAUSE = 60.0


def _wait_on(stop: threading.Event, seconds: float) -> bool:
    """Default wait of :meth:`SourceRunner.run`: sleep ``seconds`` unless ``stop`` is set first."""
    return stop.wait(seconds)


def build_adapter(settings: SourceSettings) -> PollingSource:  # type: ignore[type-arg]
    """Instantiate the configured adapter with its validated config."""
    cls = load_adapter(settings.adapter)
    return cls(cls.parse_config(settings.config), source_name=settings.name)


@dataclass
class SourceStatus:
    """What ``gateway sources list`` and the API show about a running source."""

    name: str
    state: str = "idle"  #: idle | polling | backoff | paused | error | fenced | stopped
    last_poll_at: datetime | None = None
    last_error: str | None = None
    polls: int = 0
    events_accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    #: The source breaker's :meth:`~gateway.resilience.CircuitBreaker.snapshot`, replaced (never
    #: mutated) after every poll and on every breaker transition.
    breaker: dict[str, Any] = field(default_factory=dict)


class SourceRunner:
    """Drives one source.

    Args:
        settings: the source's settings.
        store: the gateway store.
        adapter: the adapter instance (built from ``settings`` when ``None``).
        on_accept: called after each committed batch with new events (wakes the relay).
        retry: policy for transient failures of the adapter and the store.
        sleep: injectable sleep between retry attempts (tests).
        clock: monotonic clock of the source's circuit breaker (tests inject a fake one).
        wait: how :meth:`run` waits between polls, in backoff and while paused:
            ``wait(stop, seconds)`` must return early when ``stop`` is set (tests inject one that
            moves a fake clock).
    """

    def __init__(
        self,
        settings: SourceSettings,
        store: EventStore,
        *,
        adapter: PollingSource | None = None,  # type: ignore[type-arg]
        on_accept: Callable[[], None] | None = None,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[threading.Event, float], object] = _wait_on,
    ) -> None:
        self.settings = settings
        self.store = store
        self.adapter = adapter or build_adapter(settings)
        self.mapper = Mapper(settings.mapping, settings.name, self.adapter.kind)
        self.status = SourceStatus(settings.name)
        self._on_accept = on_accept
        self._sleep = sleep
        policy = retry or RetryPolicy(attempts=6, base_delay=0.2, max_delay=5.0, deadline=30.0)
        self._retrying = retrying(policy, sleep=sleep, logger=log)  # reusable; runner is one thread
        self._wait = wait
        self._epoch: int | None = None
        self._cursor: Any = None
        self.breaker = CircuitBreaker(
            f"source:{settings.name}",
            settings.breaker.to_policy(),
            clock=clock,
            listeners=[self._on_breaker_transition],
        )
        self.status.breaker = self.breaker.snapshot()

    def _on_breaker_transition(self, name: str, old: BreakerState, new: BreakerState) -> None:
        """Keep ``status.breaker`` current and say what the transition means for the source."""
        self.status.breaker = self.breaker.snapshot()
        if new is BreakerState.OPEN:
            log.warning("source %r: circuit %r %s -> open: source paused", self.settings.name, name, old.value)
        elif new is BreakerState.CLOSED:
            log.warning("source %r: circuit %r closed: source resumed", self.settings.name, name)

    @property
    def batch_size(self) -> int:
        return int(getattr(self.adapter.config, "batch_size", 1000))

    def start(self) -> None:
        """Open the adapter, take the fencing epoch and load the committed cursor."""
        self.adapter.open()
        self._epoch = self.store.acquire_epoch(self.settings.name)
        state = self.store.get_cursor(self.settings.name)
        self._cursor = state.cursor if state and state.cursor is not None else self.adapter.initial_cursor()

    def map_batch(self, batch: Batch) -> tuple[list[Event], list[dict[str, Any]]]:
        """Map records; unmappable ones become dead-letter rows (never silently dropped)."""
        events: list[Event] = []
        rejects: list[dict[str, Any]] = []
        for rec in batch.records:
            try:
                events.append(self.mapper.to_event(rec))
            except ContractError as exc:
                rejects.append(
                    {
                        "stage": "source",
                        "source_name": self.settings.name,
                        "error_class": type(exc).__name__,
                        "reason": str(exc),
                        "payload": dumps(jsonable({"data": dict(rec.data), "position": rec.position})).decode(),
                    }
                )
        return events, rejects

    def run_once(self) -> Batch:
        """Poll once and commit the batch; returns the batch read.

        Raises:
            FencingError: another runner took over this source; stop.
            GatewayError: a permanent error, or a transient one that outlived the retry policy.
        """
        if self._epoch is None:
            self.start()
        self.status.state = "polling"
        try:
            batch = self._fetch_guarded()
        finally:
            self.status.breaker = self.breaker.snapshot()
        events, rejects = self.map_batch(batch)
        result = AcceptResult(inserted=[], duplicates=[])
        if batch.records:  # an empty poll writes nothing: no transaction at all
            for attempt in self._retrying:
                with attempt:
                    result = self.store.accept(
                        events,
                        source_name=self.settings.name,
                        cursor=batch.cursor,
                        epoch=self._epoch,
                        write_cursor=True,
                        rejects=rejects,
                    )
        self._cursor = batch.cursor
        st = self.status
        st.polls += 1
        st.last_poll_at = utcnow()
        st.events_accepted += len(result.inserted)
        st.duplicates += len(result.duplicates)
        st.rejected += len(rejects)
        st.state, st.last_error = "idle", None
        if result.inserted and self._on_accept:
            self._on_accept()
        return batch

    def _fetch_guarded(self) -> Batch:
        """``Retry(CircuitBreaker(fetch))``: every attempt is one call through the source breaker.

        The adapter's error is classified *inside* the breaker, so the breaker counts the gateway
        taxonomy: ``TransientError`` is a failure, ``PermanentError`` a success (the source
        answered), ``CircuitOpenError`` from an adapter's own inner breaker is ignored.

        Raises:
            CircuitOpenError: the source breaker is open (the adapter was not called); never retried.
            GatewayError: a permanent error, or a transient one that outlived the retry policy.
        """

        def fetch() -> Batch:
            try:
                return self.adapter.fetch(self._cursor, self.batch_size)
            except Exception as exc:  # noqa: BLE001 -- classified here, in one place
                raise self.adapter.classify_error(exc) from exc

        batch: Batch | None = None
        for attempt in self._retrying:
            with attempt:
                batch = self.breaker.call(fetch)
        assert batch is not None  # tenacity re-raises when every attempt failed
        return batch

    def _pause_for(self, exc: BaseException) -> float | None:
        """Seconds to pause after ``exc`` because a breaker is open, or ``None`` (plain backoff)."""
        if isinstance(exc, CircuitOpenError):
            retry_after = exc.retry_after
        else:
            # The retry ran out on the very failure that opened the breaker: pause right away
            # instead of backing off into a rejection.
            snap = self.breaker.snapshot()
            if snap["state"] != BreakerState.OPEN.value:
                return None
            retry_after = snap["retry_after"]
        return min(max(retry_after, 0.0), MAX_PAUSE)

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set: at once while the source has more, else every ``interval``.

        While the source breaker is open, the source is *paused* (``status.state == "paused"``):
        the runner waits the breaker's ``retry_after`` instead of the generic backoff and does not
        call the adapter; then the breaker's half-open trial polls go through, and once it closes
        the source polls at full speed again.
        """
        backoff = 1.0
        while not stop.is_set():
            try:
                batch = self.run_once()
                backoff = 1.0
                if not batch.has_more:
                    self._wait(stop, self.settings.interval)
            except FencingError as exc:
                self.status.state, self.status.last_error = "fenced", str(exc)
                log.error("%s; this runner stops", exc)
                break
            except Exception as exc:  # noqa: BLE001 -- a runner must never die silently
                pause = self._pause_for(exc)
                if pause is not None:
                    self.status.state, self.status.last_error = "paused", f"{type(exc).__name__}: {exc}"
                    self.status.breaker = self.breaker.snapshot()
                    log.warning(
                        "source %r: paused, circuit open (%s: %s); next trial poll in %.1fs",
                        self.settings.name, type(exc).__name__, exc, pause,
                    )
                    self._wait(stop, pause)
                    backoff = 1.0
                    continue
                self.status.state, self.status.last_error = "backoff", f"{type(exc).__name__}: {exc}"
                if isinstance(exc, GatewayError):
                    log.error("source %r: %s: %s (next try in %.0fs)", self.settings.name, type(exc).__name__, exc, backoff)
                else:
                    log.exception("source %r: unexpected error (next try in %.0fs)", self.settings.name, backoff)
                self._wait(stop, backoff)
                backoff = min(backoff * 2, 60.0)
        self.adapter.close()
        if self.status.state != "fenced":
            self.status.state = "stopped"
