"""Prometheus metrics of the resilience layer: circuit breakers, retries and retry budgets.

The metrics live in a :class:`~prometheus_client.CollectorRegistry` the caller owns (never the
process-global default registry, so tests and several gateways can share a process). The runtime
creates one per process: the API's ``/metrics`` serves it, and a worker without the API role
serves it on ``resilience.metrics_port`` (:func:`serve_metrics`).

They are fed by listeners: :class:`~gateway.resilience.BreakerRegistry` calls
:meth:`ResilienceMetrics.observe_breaker` and :meth:`ResilienceMetrics.observe_budget` for every
breaker and budget it creates, so everything created through a registry is observed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from gateway.resilience.breaker import BreakerState, CircuitBreaker
    from gateway.resilience.budget import BudgetEvent, RetryBudget

__all__ = ["BREAKER_STATE_VALUES", "ResilienceMetrics", "ScoringMetrics", "serve_metrics"]

#: ``gateway_breaker_state`` values.
BREAKER_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}


class ResilienceMetrics:
    """Breaker, retry and budget metrics registered in ``registry``.

    Args:
        registry: where to register (once per registry: a second instance on the same registry
            raises ``ValueError`` for the duplicate names).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.breaker_state = Gauge(
            "gateway_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            ["breaker"],
            registry=registry,
        )
        self.breaker_transitions = Counter(
            "gateway_breaker_transitions",
            "Circuit breaker state transitions.",
            ["breaker", "from", "to"],
            registry=registry,
        )
        self.breaker_calls = Counter(
            "gateway_breaker_calls",
            "Calls through a circuit breaker by outcome: success, failure, ignored or rejected (each call "
            "once), and slow (in addition, for a recorded call slower than the slow-call duration).",
            ["breaker", "outcome"],
            registry=registry,
        )
        self.retries = Counter(
            "gateway_retries", "Retries made (after a transient error), by downstream.", ["downstream"],
            registry=registry,
        )
        self.budget_exhausted = Counter(
            "gateway_retry_budget_exhausted",
            "Retries not made because the downstream's retry budget was empty.",
            ["downstream"],
            registry=registry,
        )

    def observe_breaker(self, breaker: CircuitBreaker) -> None:
        """Export ``breaker``'s state now and follow its transitions and calls."""
        self.breaker_state.labels(breaker.name).set(BREAKER_STATE_VALUES[breaker.state.value])
        breaker.add_listener(self._on_transition)
        breaker.add_call_listener(self._on_call)

    def observe_budget(self, budget: RetryBudget) -> None:
        """Count ``budget``'s retries and refusals."""
        self.retries.labels(budget.name)  # the series exists (at 0) before the first retry
        self.budget_exhausted.labels(budget.name)
        budget.add_listener(self._on_budget)

    def _on_transition(self, name: str, old: BreakerState, new: BreakerState) -> None:
        self.breaker_state.labels(name).set(BREAKER_STATE_VALUES[new.value])
        self.breaker_transitions.labels(name, old.value, new.value).inc()

    def _on_call(self, name: str, outcome: str) -> None:
        self.breaker_calls.labels(name, outcome).inc()

    def _on_budget(self, name: str, event: BudgetEvent) -> None:
        (self.retries if event == "retry" else self.budget_exhausted).labels(name).inc()


class ScoringMetrics:
    """Metrics of the scoring workers of a process: model calls, scores and what became of events.

    * ``gateway_scoring_batch_size{model}`` -- events per model call (histogram);
    * ``gateway_scoring_call_seconds{model}`` -- latency of a model call (histogram);
    * ``gateway_scoring_score{model}`` -- the scores given (histogram, 0.1 wide buckets);
    * ``gateway_scoring_events_total{outcome}`` -- ``scored`` (committed, published, acked),
      ``fallback`` (of those, scored by the fallback model), ``retried`` (sent to a delay level),
      ``dead_lettered``, ``shadow`` (shadow scores stored). The fallback rate is
      ``rate(..{outcome="fallback"}) / rate(..{outcome="scored"})``.

    Args:
        registry: where to register (once per registry).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.batch_size = Histogram(
            "gateway_scoring_batch_size", "Events per model call.", ["model"], registry=registry,
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
        )
        self.call_seconds = Histogram(
            "gateway_scoring_call_seconds", "Latency of one model call (a micro-batch), in seconds.", ["model"],
            registry=registry, buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.scores = Histogram(
            "gateway_scoring_score", "Scores given, by model.", ["model"], registry=registry,
            buckets=tuple(round(0.1 * i, 1) for i in range(1, 11)),
        )
        self.events = Counter(
            "gateway_scoring_events", "Scoring outcomes of events: scored, fallback, retried, dead_lettered, shadow.",
            ["outcome"], registry=registry,
        )

    def model_call(self, model: str, size: int, seconds: float, scores: Sequence[float]) -> None:
        """Record one successful model call of ``size`` events."""
        self.batch_size.labels(model).observe(size)
        self.call_seconds.labels(model).observe(seconds)
        hist = self.scores.labels(model)
        for score in scores:
            hist.observe(score)

    def outcome(self, outcome: str, n: int = 1) -> None:
        """Count ``n`` events with ``outcome``."""
        if n:
            self.events.labels(outcome).inc(n)


def serve_metrics(port: int, registry: CollectorRegistry, addr: str = "0.0.0.0") -> object:  # noqa: S104
    """Serve ``registry`` in Prometheus text format on ``addr:port`` from a daemon thread.

    Args:
        port: TCP port (0: any free one).
        registry: what to expose.
        addr: bind address.

    Returns:
        prometheus_client's ``(server, thread)``; ``server.shutdown()`` stops it.
    """
    from prometheus_client import start_http_server

    return start_http_server(port, addr=addr, registry=registry)
