"""The source runner: poll an adapter, map records, accept events and cursor in one transaction.

The acceptance point: a batch's cursor advances only in the transaction that stores its events
(and the dead letters of its unmappable records). A crash anywhere replays at most the batch that
was not committed, and deterministic ids make the replay harmless.
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
from gateway.errors import ContractError, FencingError, GatewayError
from gateway.events import Event, jsonable, utcnow
from gateway.events.jsonsafe import dumps
from gateway.plugins import load_adapter
from gateway.resilience import RetryPolicy, retrying
from gateway.sources.mapping import Mapper
from gateway.store import AcceptResult, EventStore

__all__ = ["SourceRunner", "SourceStatus", "build_adapter"]

log = logging.getLogger("gateway.sources")


def build_adapter(settings: SourceSettings) -> PollingSource:  # type: ignore[type-arg]
    """Instantiate the configured adapter with its validated config."""
    cls = load_adapter(settings.adapter)
    return cls(cls.parse_config(settings.config), source_name=settings.name)


@dataclass
class SourceStatus:
    """What ``gateway sources list`` and the API show about a running source."""

    name: str
    state: str = "idle"  #: idle | polling | backoff | error | fenced | stopped
    last_poll_at: datetime | None = None
    last_error: str | None = None
    polls: int = 0
    events_accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class SourceRunner:
    """Drives one source.

    Args:
        settings: the source's settings.
        store: the gateway store.
        adapter: the adapter instance (built from ``settings`` when ``None``).
        on_accept: called after each committed batch with new events (wakes the relay).
        retry: policy for transient failures of the adapter and the store.
        sleep: injectable sleep (tests).
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
    ) -> None:
        self.settings = settings
        self.store = store
        self.adapter = adapter or build_adapter(settings)
        self.mapper = Mapper(settings.mapping, settings.name, self.adapter.kind)
        self.status = SourceStatus(settings.name)
        self._on_accept = on_accept
        self._retry = retry or RetryPolicy(attempts=6, base_delay=0.2, max_delay=5.0, deadline=30.0)
        self._sleep = sleep
        self._retrying = retrying(self._retry, sleep=sleep, logger=log)  # reusable; runner is one thread
        self._epoch: int | None = None
        self._cursor: Any = None

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
        for attempt in self._retrying:
            with attempt:
                try:
                    batch = self.adapter.fetch(self._cursor, self.batch_size)
                except Exception as exc:  # noqa: BLE001 -- classified below, in one place
                    raise self.adapter.classify_error(exc) from exc
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

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set: at once while the source has more, else every ``interval``."""
        backoff = 1.0
        while not stop.is_set():
            try:
                batch = self.run_once()
                backoff = 1.0
                if not batch.has_more:
                    stop.wait(self.settings.interval)
            except FencingError as exc:
                self.status.state, self.status.last_error = "fenced", str(exc)
                log.error("%s; this runner stops", exc)
                break
            except Exception as exc:  # noqa: BLE001 -- a runner must never die silently
                self.status.state, self.status.last_error = "backoff", f"{type(exc).__name__}: {exc}"
                if isinstance(exc, GatewayError):
                    log.error("source %r: %s: %s (next try in %.0fs)", self.settings.name, type(exc).__name__, exc, backoff)
                else:
                    log.exception("source %r: unexpected error (next try in %.0fs)", self.settings.name, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 60.0)
        self.adapter.close()
        if self.status.state != "fenced":
            self.status.state = "stopped"
