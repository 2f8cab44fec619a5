"""Scrape-time collectors: outbox, dead letters, source lag, queues, and the runners' counters.

Nothing here runs on the hot path. The store and broker are read when Prometheus scrapes, and
the answer is cached for ``ttl`` seconds (``observability.metrics_cache_seconds``), so several
scrapers (or a fast scrape interval) cost one query round per ``ttl``. A failed read is reported
by ``gateway_collector_up{collector}`` = 0 and the series are left out; a scrape never fails.

Every label value is bounded by configuration: source names, dead-letter stages, queue names,
runner states. Event ids never become labels.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from gateway.events import utcnow

__all__ = ["Cached", "QueueCollector", "RunnersCollector", "StoreCollector", "collector_up"]

log = logging.getLogger("gateway.observability")


class Cached:
    """The result of ``read()``, reused for ``ttl`` seconds; one reader at a time (thread-safe).

    Args:
        read: the expensive read.
        ttl: seconds a result is reused (0: never).
        clock: monotonic clock (injectable).
    """

    def __init__(self, read: Callable[[], Any], ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._read, self.ttl, self._clock = read, ttl, clock
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._value: Any = None
        self.ok = False
        self.reads = 0

    def get(self) -> Any:
        """The cached value, refreshed when older than ``ttl``; ``None`` when the last read failed."""
        with self._lock:
            if self._clock() - self._at >= self.ttl:
                self.reads += 1
                try:
                    self._value, self.ok = self._read(), True
                except Exception as exc:  # noqa: BLE001 -- a scrape must not fail because a backend is down
                    log.warning("metrics read failed: %s: %s", type(exc).__name__, exc)
                    self._value, self.ok = None, False
                self._at = self._clock()
            return self._value


def collector_up(name: str, ok: bool) -> GaugeMetricFamily:
    """``gateway_collector_up{collector=name}``: 1 when the collector's last read succeeded."""
    g = GaugeMetricFamily("gateway_collector_up", "1 if the collector's last backend read succeeded, else 0.",
                          labels=["collector"])
    g.add_metric([name], 1.0 if ok else 0.0)
    return g


def _age(now: datetime, then: datetime | None) -> float | None:
    return None if then is None else max(0.0, (now - then).total_seconds())


class StoreCollector(Collector):
    """Outbox backlog, dead letters and source lag, read from the store at scrape time.

    Args:
        store: the event store.
        outbox: export ``gateway_outbox_*`` (off where the API's own outbox collector runs in the
            same registry; both would register the same names).
        ttl: cache seconds.
        clock: monotonic clock for the cache.
        now: wall clock (UTC) for ages.
    """

    def __init__(self, store: Any, *, outbox: bool = True, ttl: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, now: Callable[[], datetime] = utcnow) -> None:
        self._store, self._outbox, self._now = store, outbox, now
        self.cache = Cached(self._read, ttl, clock)

    def _read(self) -> dict[str, Any]:
        from gateway.store.schema import dead_letters as dl

        out: dict[str, Any] = {"now": self._now()}
        if self._outbox:
            out["pending"] = self._store.pending_stats()
        with self._store.engine.connect() as conn:
            total = dict(conn.execute(select(dl.c.stage, func.count()).group_by(dl.c.stage)).all())
            opened = dict(conn.execute(
                select(dl.c.stage, func.count()).where(dl.c.replayed_at.is_(None)).group_by(dl.c.stage)
            ).all())
        out["dead"] = {s: (int(opened.get(s, 0)), int(n) - int(opened.get(s, 0))) for s, n in total.items()}
        out["cursors"] = [(c.source_name, c.updated_at) for c in self._store.list_cursors()]
        out["status"] = [(s.source_name, s.state, s.last_poll_at) for s in self._store.list_source_status()]
        return out

    def describe(self) -> Iterable[Metric]:
        # Without describe() the registry would call collect() -- and the store -- at registration.
        return [m for m in self._families(None)]

    def collect(self) -> Iterable[Metric]:
        snap = self.cache.get()
        yield from self._families(snap)
        yield collector_up("store", self.cache.ok)

    def _families(self, snap: dict[str, Any] | None) -> list[Metric]:
        fams: list[Metric] = []
        if self._outbox:
            pending = GaugeMetricFamily("gateway_outbox_pending", "Events accepted but not yet published.")
            oldest = GaugeMetricFamily("gateway_outbox_oldest_pending_age_seconds", "Age of the oldest pending event.")
            if snap is not None:
                count, first = snap["pending"]
                pending.add_metric([], count)
                oldest.add_metric([], _age(snap["now"], first) or 0.0)
            fams += [pending, oldest]
        dead = GaugeMetricFamily("gateway_dead_letters", "Dead letters in the store by stage and state (open, replayed).",
                                 labels=["stage", "state"])
        lag = GaugeMetricFamily("gateway_source_lag_seconds",
                                "Seconds since the source's cursor last advanced (now minus cursor time).", labels=["source"])
        poll = GaugeMetricFamily("gateway_source_last_poll_age_seconds",
                                 "Seconds since the source's last successful poll (any runner).", labels=["source"])
        state = GaugeMetricFamily("gateway_source_state", "1 for the state the source's runner last reported.",
                                  labels=["source", "state"])
        if snap is not None:
            for stage, (n_open, n_replayed) in sorted(snap["dead"].items()):
                dead.add_metric([stage, "open"], n_open)
                dead.add_metric([stage, "replayed"], n_replayed)
            for name, at in snap["cursors"]:
                lag.add_metric([name], _age(snap["now"], at) or 0.0)
            for name, st, last in snap["status"]:
                state.add_metric([name, st], 1.0)
                if last is not None:
                    poll.add_metric([name], _age(snap["now"], last) or 0.0)
        return fams + [dead, lag, poll, state]


class QueueCollector(Collector):
    """Ready messages and consumers of every gateway queue, asked of the broker at scrape time.

    On RabbitMQ one short-lived ``BlockingConnection`` of its own (never shared with a worker)
    passively declares each queue, which returns ``message_count`` and ``consumer_count``. On
    another bus, ``bus.queue_stats(name)`` (``(messages, consumers)``) is used when it exists,
    else ``bus.queue_depth(name)`` (no consumer count: the in-process bus does not track them).

    Args:
        bus: the gateway bus.
        queues: queue names to report (usually ``[q.name for q in topology.queues()]``).
        ttl: cache seconds.
        clock: monotonic clock for the cache.
    """

    def __init__(self, bus: Any, queues: Sequence[str], *, ttl: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._bus, self._queues = bus, list(dict.fromkeys(queues))
        self.cache = Cached(self._read, ttl, clock)

    def _read(self) -> dict[str, tuple[int, int | None]]:
        if getattr(self._bus, "kind", "") == "rabbitmq" and not hasattr(self._bus, "queue_stats"):
            return _rabbit_queue_stats(self._bus, self._queues)
        stats = getattr(self._bus, "queue_stats", None)
        out: dict[str, tuple[int, int | None]] = {}
        for q in self._queues:
            try:
                out[q] = stats(q) if stats is not None else (int(self._bus.queue_depth(q)), None)
            except (KeyError, LookupError):
                continue  # not declared (yet)
        return out

    def describe(self) -> Iterable[Metric]:
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        snap = self.cache.get()
        yield from self._families(snap)
        yield collector_up("queues", self.cache.ok)

    @staticmethod
    def _families(snap: dict[str, tuple[int, int | None]] | None) -> list[Metric]:
        depth = GaugeMetricFamily("gateway_queue_messages", "Ready messages in a gateway queue (unacked not counted).",
                                  labels=["queue"])
        consumers = GaugeMetricFamily("gateway_queue_consumers", "Consumers subscribed to a gateway queue.",
                                      labels=["queue"])
        for name, (messages, n) in sorted((snap or {}).items()):
            depth.add_metric([name], messages)
            if n is not None:
                consumers.add_metric([name], n)
        return [depth, consumers]


def _rabbit_queue_stats(bus: Any, queues: Sequence[str]) -> dict[str, tuple[int, int | None]]:
    """Passive declares on a connection of its own; a missing queue is skipped, not an error."""
    import pika
    from pika.exceptions import ChannelClosedByBroker

    from gateway.bus.pika_params import connection_parameters

    params = connection_parameters(bus.settings, f"{bus.topology.prefix}-metrics")
    params.socket_timeout = min(params.socket_timeout or 5.0, 5.0)
    conn = pika.BlockingConnection(params)
    out: dict[str, tuple[int, int | None]] = {}
    try:
        ch = conn.channel()
        for q in queues:
            try:
                m = ch.queue_declare(queue=q, passive=True).method
            except ChannelClosedByBroker:  # 404: not declared; the channel is closed, open another
                ch = conn.channel()
                continue
            out[q] = (int(m.message_count), int(m.consumer_count))
    finally:
        if conn.is_open:
            conn.close()
    return out


class RunnersCollector(Collector):
    """Counters of this process's source runners (kept in memory by each runner; no I/O).

    ``gateway_source_events_total{source,outcome}`` (``accepted``, ``duplicate``, ``rejected``)
    and ``gateway_source_polls_total{source}``, summed over the runners of each source in this
    process. They restart at 0 with the process, like any Prometheus counter; ``sum by (source)
    (rate(...))`` over all processes is the intake rate.

    Args:
        runners: returns the runners now (``lambda: gateway.runners``).
    """

    def __init__(self, runners: Callable[[], Iterable[Any]]) -> None:
        self._runners = runners

    def describe(self) -> Iterable[Metric]:
        return self._families([])

    def collect(self) -> Iterable[Metric]:
        return self._families(list(self._runners()))

    @staticmethod
    def _families(runners: list[Any]) -> list[Metric]:
        events = CounterMetricFamily("gateway_source_events",
                                     "Events from a source by outcome: accepted (new in the outbox), duplicate, "
                                     "rejected (dead-lettered at the source).", labels=["source", "outcome"])
        polls = CounterMetricFamily("gateway_source_polls", "Successful polls of a source.", labels=["source"])
        sums: dict[str, list[int]] = {}
        for r in runners:
            st = r.status
            acc = sums.setdefault(st.name, [0, 0, 0, 0])
            acc[0] += st.events_accepted
            acc[1] += st.duplicates
            acc[2] += st.rejected
            acc[3] += st.polls
        for name, (accepted, duplicate, rejected, n_polls) in sorted(sums.items()):
            events.add_metric([name, "accepted"], accepted)
            events.add_metric([name, "duplicate"], duplicate)
            events.add_metric([name, "rejected"], rejected)
            polls.add_metric([name], n_polls)
        return [events, polls]
