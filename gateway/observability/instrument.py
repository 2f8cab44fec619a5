"""Thin wrappers that observe the relay's and scorers' traffic without changing it.

The runtime wraps what it hands to the roles (:func:`gateway.observability.instrument_gateway`):

* :class:`ObservedPublisher` -- counts every publish outcome (``ack``, ``nack``, ``returned``,
  ``timeout``, ``lost``) per role and exchange when the confirm future resolves, and times the
  confirm; with tracing on, one PRODUCER span per batch linked to the events' ``traceparent``.
* :class:`ObservedConsumer` -- binds a correlation id per scoring batch (the worker thread's
  logs carry it) and, with tracing on, one CONSUMER span per batch linked to the events.
* :class:`ObservedStore` -- observes the end-to-end latency of every score committed
  (``save_scores``): from the event's source ``time``, and from the relay's publish stamp.

Cost on the hot path (measured in tests/unit/test_observability_metrics.py, bench note in
docs/observability.md): a dict update per delivery, one histogram observation per scored event and
a few counter increments per batch. Span work happens only when tracing is on.
"""

from __future__ import annotations

import threading
import time
from collections import Counter as _Tally
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from gateway.bus.protocols import PUBLISHED_AT_HEADER, Delivery, Message, Outcome
from gateway.observability.context import new_correlation_id, set_correlation

__all__ = ["ObservedConsumer", "ObservedPublisher", "ObservedStore", "PipelineMetrics"]

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400, 604800)
_BUS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

# The scoring batch a worker thread is handling: event id -> relay publish stamp (Unix ms).
_batch = threading.local()


class PipelineMetrics:
    """Publish outcomes and end-to-end latency, registered in ``registry`` (once per registry)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.published = Counter(
            "gateway_published_messages",
            "Messages published with confirms, by role (relay: events out; scorer: scored events, retries, "
            "late and parked copies), exchange and broker outcome (ack, nack, returned, timeout, lost).",
            ["role", "exchange", "outcome"], registry=registry,
        )
        self.confirm_seconds = Histogram(
            "gateway_publish_confirm_seconds", "Time from publishing a batch to its last confirm, by role.",
            ["role"], registry=registry, buckets=_BUS_BUCKETS,
        )
        self.source_latency = Histogram(
            "gateway_event_source_to_scored_seconds",
            "End-to-end latency of each scored event: from its source time (the event's `time`) to its score "
            "being committed, by source.", ["source"], registry=registry, buckets=_LATENCY_BUCKETS,
        )
        self.bus_latency = Histogram(
            "gateway_event_published_to_scored_seconds",
            "From the relay's publish (accepted events leave the outbox) to the score being committed, by source.",
            ["source"], registry=registry, buckets=_BUS_BUCKETS,
        )
        self._children: dict[tuple[Any, ...], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached (the labels() lookup takes a lock; this does not)."""
        key = (id(metric), *labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c


class ObservedPublisher:
    """A :class:`~gateway.bus.Publisher` that counts outcomes and, with ``tracing``, spans batches.

    Args:
        inner: the real publisher.
        metrics: where to count.
        role: ``relay`` or ``scorer``.
        tracing: a :class:`~gateway.observability.tracing.Tracing`, or ``None``.
    """

    def __init__(self, inner: Any, metrics: PipelineMetrics, role: str, tracing: Any = None) -> None:
        self._inner, self._metrics, self._role, self._tracing = inner, metrics, role, tracing

    def publish(self, exchange: str, messages: Sequence[Message]) -> Future[list[Outcome]]:
        started = time.perf_counter()
        span = self._tracing.batch_span(f"publish {exchange}", "producer", [m.body for m in messages], exchange) \
            if self._tracing is not None and messages else None
        fut = self._inner.publish(exchange, messages)
        n = len(messages)

        def done(f: Future[list[Outcome]]) -> None:
            try:
                outcomes = f.result()
            except BaseException:  # noqa: BLE001 -- a broken publisher loses the batch
                outcomes = [Outcome.LOST] * n
            m = self._metrics
            for outcome, k in _Tally(outcomes).items():
                m.child(m.published, self._role, exchange, outcome.value).inc(k)
            m.child(m.confirm_seconds, self._role).observe(time.perf_counter() - started)
            if span is not None:
                self._tracing.end_batch_span(span, outcomes)

        fut.add_done_callback(done)
        return fut

    def close(self) -> None:
        self._inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class ObservedConsumer:
    """A :class:`~gateway.bus.Consumer` that gives each fetched batch a correlation id (and span).

    The id is bound in the calling worker thread until its next ``get_batch``, so everything the
    worker logs while handling the batch carries it; with tracing on it is the batch span's trace
    id, so logs and traces join.
    """

    def __init__(self, inner: Any, tracing: Any = None, queue: str = "") -> None:
        self._inner, self._tracing, self._queue = inner, tracing, queue
        self._spans = threading.local()

    def get_batch(self, max_messages: int, max_wait: float, linger: float) -> list[Delivery]:
        prev = getattr(self._spans, "span", None)
        if prev is not None:
            self._spans.span = None
            self._tracing.end_batch_span(prev, None)
        batch = self._inner.get_batch(max_messages, max_wait, linger)
        _batch.published = {d.message_id: d.headers.get(PUBLISHED_AT_HEADER) for d in batch}
        if not batch:
            set_correlation(None)
            return batch
        if self._tracing is not None:
            span = self._spans.span = self._tracing.batch_span(
                f"score {self._queue}", "consumer", [d.body for d in batch], self._queue
            )
            set_correlation(format(span.get_span_context().trace_id, "032x"))
        else:
            set_correlation(new_correlation_id())
        return batch

    def close(self) -> None:
        self._inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class ObservedStore:
    """The event store, observing end-to-end latency of every score committed through it.

    Only the scoring workers get this wrapper; every other method is the store's own.
    """

    def __init__(self, inner: Any, metrics: PipelineMetrics) -> None:
        self._inner, self._metrics = inner, metrics

    def save_scores(self, records: Sequence[Any]) -> int:
        n: int = self._inner.save_scores(records)
        m = self._metrics
        published: dict[str, Any] = getattr(_batch, "published", None) or {}
        for r in records:
            source = r.source_name
            m.child(m.source_latency, source).observe(max(0.0, (r.scored_at - r.event_time).total_seconds()))
            stamp = published.get(r.event_id)
            if isinstance(stamp, int):
                m.child(m.bus_latency, source).observe(max(0.0, r.scored_at.timestamp() - stamp / 1000.0))
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
