"""Shared dependencies: what ``create_app`` put on ``app.state``, pagination and metrics.

Every collaborator reaches an endpoint through a function here, so tests can swap it with
``app.dependency_overrides[get_store] = ...``.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterable
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.api.limits import BacklogGuard
from gateway.bus.protocols import Bus
from gateway.config import Settings
from gateway.events import utcnow
from gateway.store import EventStore

__all__ = [
    "ApiMetrics",
    "OnAccept",
    "get_settings",
    "get_store",
    "get_bus",
    "get_metrics",
    "get_backlog_guard",
    "get_on_accept",
    "page_limit",
    "page_cursor",
    "encode_cursor",
    "decode_cursor",
    "SettingsDep",
    "StoreDep",
    "BusDep",
    "MetricsDep",
    "BacklogDep",
    "OnAcceptDep",
]

OnAccept = Callable[[], None]

DEFAULT_PAGE_SIZE = 100


# ---------------------------------------------------------------------------- metrics
class _OutboxCollector(Collector):
    """Reads the outbox backlog from the store at scrape time."""

    def __init__(self, store: EventStore) -> None:
        self._store = store

    def describe(self) -> Iterable[Metric]:
        # Without describe() the registry would call collect() -- and the store -- at registration.
        yield GaugeMetricFamily("gateway_outbox_pending", "Events accepted but not yet published.")
        yield GaugeMetricFamily("gateway_outbox_oldest_pending_age_seconds", "Age of the oldest pending event.")
        yield GaugeMetricFamily("gateway_store_up", "1 if the store answered the last scrape, else 0.")

    def collect(self) -> Iterable[Metric]:
        try:
            count, oldest = self._store.pending_stats()
        except Exception:  # a scrape must not fail because the store is down
            yield GaugeMetricFamily("gateway_store_up", "1 if the store answered the last scrape, else 0.", value=0)
            return
        yield GaugeMetricFamily("gateway_outbox_pending", "Events accepted but not yet published.", value=count)
        age = (utcnow() - oldest).total_seconds() if oldest is not None else 0.0
        yield GaugeMetricFamily(
            "gateway_outbox_oldest_pending_age_seconds", "Age of the oldest pending event.", value=max(0.0, age)
        )
        yield GaugeMetricFamily("gateway_store_up", "1 if the store answered the last scrape, else 0.", value=1)


class ApiMetrics:
    """The API's Prometheus metrics, registered in one (per-app) registry.

    Args:
        registry: where to register; never the global default registry, so many apps can coexist.
        store: read at scrape time for the outbox gauges.
    """

    def __init__(self, registry: CollectorRegistry, store: EventStore) -> None:
        self.registry = registry
        self.events_accepted = Counter(
            "gateway_api_events_accepted", "Events newly stored through POST /v1/events.", registry=registry
        )
        self.events_duplicate = Counter(
            "gateway_api_events_duplicate",
            "Events posted again that were stored already (idempotent retries).",
            registry=registry,
        )
        self.requests_rejected = Counter(
            "gateway_api_ingest_rejected",
            "POST /v1/events requests refused, by reason.",
            ["reason"],
            registry=registry,
        )
        self.ingest_seconds = Histogram(
            "gateway_api_ingest_seconds",
            "Time to validate and commit one accepted POST /v1/events request.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=registry,
        )
        registry.register(_OutboxCollector(store))


# ---------------------------------------------------------------------------- app.state accessors
def get_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    return request.app.state.settings  # type: ignore[no-any-return]


def get_store(request: Request) -> EventStore:
    """The event store."""
    return request.app.state.store  # type: ignore[no-any-return]


def get_bus(request: Request) -> Bus | None:
    """The bus, or ``None`` when the API runs without one."""
    return request.app.state.bus  # type: ignore[no-any-return]


def get_metrics(request: Request) -> ApiMetrics:
    """The app's Prometheus metrics."""
    return request.app.state.metrics  # type: ignore[no-any-return]


def get_backlog_guard(request: Request) -> BacklogGuard:
    """The outbox backpressure guard."""
    return request.app.state.backlog_guard  # type: ignore[no-any-return]


def get_on_accept(request: Request) -> OnAccept | None:
    """The callback run after events were committed (wakes the in-process relay)."""
    return request.app.state.on_accept  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[EventStore, Depends(get_store)]
BusDep = Annotated[Bus | None, Depends(get_bus)]
MetricsDep = Annotated[ApiMetrics, Depends(get_metrics)]
BacklogDep = Annotated[BacklogGuard, Depends(get_backlog_guard)]
OnAcceptDep = Annotated[OnAccept | None, Depends(get_on_accept)]


# ---------------------------------------------------------------------------- pagination
def _invalid(loc: tuple[str, ...], msg: str, value: object, kind: str) -> RequestValidationError:
    return RequestValidationError([{"type": kind, "loc": loc, "msg": msg, "input": value}])


def page_limit(
    settings: SettingsDep,
    limit: Annotated[
        int | None,
        Query(ge=1, description=f"Page size, 1..api.max_page_size (default {DEFAULT_PAGE_SIZE})."),
    ] = None,
) -> int:
    """The requested page size, checked against ``settings.api.max_page_size``."""
    cap = settings.api.max_page_size
    if limit is None:
        return min(DEFAULT_PAGE_SIZE, cap)
    if limit > cap:
        raise _invalid(("query", "limit"), f"Input should be less than or equal to {cap}", limit, "less_than_equal")
    return limit


_CURSOR_TEXT = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


def encode_cursor(seq: int) -> str:
    """Opaque cursor for "after acceptance sequence ``seq``" (unpadded base64url)."""
    return base64.urlsafe_b64encode(str(seq).encode("ascii")).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str) -> int:
    """Inverse of :func:`encode_cursor`.

    Raises:
        ValueError: the cursor was not made by :func:`encode_cursor`.
    """
    if not _CURSOR_TEXT.match(cursor):
        raise ValueError("not a cursor")
    try:
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not a cursor") from None
    text = raw.decode("ascii", errors="replace")
    if not text.isdigit() or len(text) > 19 or encode_cursor(int(text)) != cursor:
        raise ValueError("not a cursor")
    return int(text)


def page_cursor(
    cursor: Annotated[
        str | None, Query(description="Opaque cursor from the previous page's next_cursor.")
    ] = None,
) -> int | None:
    """The acceptance sequence the page starts after, or ``None`` for the first page."""
    if cursor is None:
        return None
    try:
        return decode_cursor(cursor)
    except ValueError:
        raise _invalid(
            ("query", "cursor"), "invalid cursor: pass next_cursor of a previous page unchanged", cursor, "value_error"
        ) from None
