"""Helpers of the standard suite: build adapters and runners, read everything, parse events.

They are public so that adapter authors can write their own checks in the same terms.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adapters.base import Batch, PollingSource
from gateway.config import SourceSettings
from gateway.events import Event
from gateway.resilience import RetryPolicy
from gateway.sources.mapping import Mapper
from gateway.sources.runner import SourceRunner
from gateway.store import EventFilter, EventStore, make_engine
from gateway.store.migrate import upgrade

__all__ = ["ContractHarness", "read_all", "parse_cloudevent", "json_round_trip", "threads_settled"]

#: Most polls one drain may take before the suite calls the adapter stuck (it never says "done").
MAX_POLLS = 1000


def read_all(adapter: PollingSource, cursor: Any, limit: int, *, max_polls: int = MAX_POLLS) -> list[Batch]:  # type: ignore[type-arg]
    """Fetch from ``cursor`` until a batch without records, committing nothing.

    Args:
        adapter: an opened adapter.
        cursor: where to start (``adapter.initial_cursor()`` for the beginning).
        limit: the ``limit`` of every fetch.
        max_polls: most fetches before giving up (an adapter that never runs dry fails here).

    Returns:
        Every batch read, the last one (without records) included.
    """
    batches: list[Batch] = []
    for _ in range(max_polls):
        batch = adapter.fetch(cursor, limit)
        batches.append(batch)
        if not batch.records and not batch.rejects:
            return batches
        cursor = batch.cursor
    raise AssertionError(f"{type(adapter).__name__}: still returning records after {max_polls} fetches of {limit}")


def parse_cloudevent(event: Event) -> Any:
    """Parse the event's structured JSON with the official CloudEvents SDK (raises if invalid)."""
    from cloudevents.core.formats.json import JSONFormat  # the 2.x API; cloudevents.http is gone there

    return JSONFormat().read(None, event.to_json())


def json_round_trip(value: Any) -> Any:
    """``value`` through plain JSON: raises ``TypeError`` for anything not JSON-safe."""
    return json.loads(json.dumps(value))


def threads_settled(before: set[threading.Thread], timeout: float = 5.0) -> list[threading.Thread]:
    """Threads started since ``before`` that are still alive after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


class ContractHarness:
    """Builds what one check needs: adapters, a SQLite gateway store and source runners.

    Args:
        adapter_class: the adapter under test.
        mapping: the source's ``mapping:`` block.
        workdir: a private folder (the store file lives there).
        source_name: the source name used in settings and event ids.
    """

    def __init__(self, adapter_class: type[PollingSource], mapping: Mapping[str, Any], workdir: Path,  # type: ignore[type-arg]
                 source_name: str = "contract") -> None:
        self.adapter_class = adapter_class
        self.mapping = dict(mapping)
        self.workdir = workdir
        self.source_name = source_name
        self._store: EventStore | None = None
        self._adapters: list[PollingSource] = []  # type: ignore[type-arg]

    def settings(self, config: Mapping[str, Any]) -> SourceSettings:
        """Source settings for ``config`` with the harness's mapping."""
        return SourceSettings.model_validate({
            "name": self.source_name, "adapter": self.adapter_class.kind, "interval": 0.01,
            "config": dict(config), "mapping": self.mapping,
        })

    def adapter(self, config: Mapping[str, Any]) -> PollingSource:  # type: ignore[type-arg]
        """A new, unopened adapter from a raw ``config:`` block (closed by :meth:`close`)."""
        parsed = self.adapter_class.parse_config(config)
        adapter = self.adapter_class(parsed, source_name=self.source_name)
        self._adapters.append(adapter)
        return adapter

    def mapper(self) -> Mapper:
        """The mapping the runner applies, for events without a store."""
        return Mapper(self.settings({}).mapping, self.source_name, self.adapter_class.kind)

    @property
    def store(self) -> EventStore:
        """A migrated SQLite gateway store in the work folder (created on first use)."""
        if self._store is None:
            engine = make_engine(f"sqlite:///{self.workdir / 'contract-store.db'}")
            upgrade(engine)
            self._store = EventStore(engine)
        return self._store

    def runner(self, config: Mapping[str, Any], adapter: PollingSource | None = None, *,  # type: ignore[type-arg]
               owner: str = "contract-runner") -> SourceRunner:
        """A real :class:`SourceRunner` on the store; fetch errors are not retried (checks say why)."""
        return SourceRunner(
            self.settings(config), self.store, adapter=adapter or self.adapter(config), owner=owner,
            sleep=lambda _s: None, retry=RetryPolicy(attempts=1, base_delay=0.01, max_delay=0.01, deadline=30),
        )

    @staticmethod
    def drain(runner: SourceRunner, *, max_polls: int = MAX_POLLS) -> list[Batch]:
        """``run_once`` until a poll returns no records (each one commits its batch)."""
        batches = []
        for _ in range(max_polls):
            batch = runner.run_once()
            batches.append(batch)
            if not batch.records and not batch.rejects:
                return batches
        raise AssertionError(f"source still returning records after {max_polls} polls")

    def stored_ids(self) -> list[str]:
        """Ids of the events in the store, in acceptance order (duplicates would show twice)."""
        return [row.event["id"] for row in self.store.list_events(EventFilter(source_name=self.source_name), limit=1_000_000)]

    def close(self) -> None:
        """Close every adapter built here and dispose of the store."""
        for adapter in self._adapters:
            try:
                adapter.close()
            except Exception:  # noqa: BLE001 -- teardown: the check has its result already
                pass
        if self._store is not None:
            self._store.engine.dispose()
