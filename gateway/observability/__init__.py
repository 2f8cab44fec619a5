"""Observability: Prometheus collectors, JSON logs with correlation ids, optional OpenTelemetry.

:func:`instrument_gateway` is the runtime's one hook: it registers the scrape-time collectors in
the gateway's registry, teaches the log redactor the settings' secrets, starts tracing when it is
enabled, and returns the :class:`Instruments` that wrap what the relay and scorers are given.
Importing this package imports no OpenTelemetry module (docs/observability.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.observability.context import (
    bind_correlation,
    correlation_id,
    new_correlation_id,
    set_correlation,
)
from gateway.observability.instrument import (
    ObservedConsumer,
    ObservedPublisher,
    ObservedStore,
    PipelineMetrics,
)
from gateway.observability.logs import configure_logging, secrets_of
from gateway.observability.metrics import (
    QueueCollector,
    RunnersCollector,
    StoreCollector,
)

__all__ = [
    "Instruments",
    "bind_correlation",
    "configure_logging",
    "correlation_id",
    "instrument_gateway",
    "new_correlation_id",
    "set_correlation",
]


@dataclass
class Instruments:
    """What :func:`instrument_gateway` set up for one :class:`~gateway.runtime.Gateway`."""

    pipeline: PipelineMetrics
    store: StoreCollector
    queues: QueueCollector | None
    tracing: Any = None
    scoring_store: Any = None

    def publisher(self, inner: Any, role: str) -> Any:
        """``inner`` counting its outcomes as ``role`` (and spanning batches when tracing)."""
        return ObservedPublisher(inner, self.pipeline, role, self.tracing)

    def consumer(self, inner: Any, queue: str) -> Any:
        """``inner`` binding a correlation id (and a span when tracing) per fetched batch."""
        return ObservedConsumer(inner, self.tracing, queue)


def instrument_gateway(gateway: Any) -> Instruments:
    """Register observability for ``gateway`` (call once, in ``Gateway.__post_init__``).

    Args:
        gateway: a :class:`~gateway.runtime.Gateway` (its settings, store, bus, topology, roles,
            runners and ``metrics_registry``).

    Returns:
        The wrappers' factory; ``scoring_store`` is the store the scoring workers get.
    """
    from gateway.observability.logs import add_secrets
    from gateway.observability.tracing import process_tracing

    obs = gateway.settings.observability
    add_secrets(secrets_of(gateway.settings))
    registry = gateway.metrics_registry
    pipeline = PipelineMetrics(registry)
    # The API's app registers its own (uncached) outbox gauges in the same registry.
    store = StoreCollector(gateway.store, outbox="api" not in gateway.roles, ttl=obs.metrics_cache_seconds)
    registry.register(store)
    queues = None
    if obs.queue_metrics:
        queues = QueueCollector(gateway.bus, [q.name for q in gateway.topology.queues()], ttl=obs.metrics_cache_seconds)
        registry.register(queues)
    registry.register(RunnersCollector(lambda: gateway.runners))
    return Instruments(pipeline, store, queues, process_tracing(obs), ObservedStore(gateway.store, pipeline))
