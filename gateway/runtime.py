"""Wiring: build the store, bus and roles from settings and run them in threads.

``gateway run`` runs every role in one process; ``gateway worker --role X`` runs one. Roles:
``sources`` (one runner thread per enabled source), ``relay``, ``scorer`` (with the drain of the
broker's dead-letter queue) and ``api``.

Several processes may run ``sources`` on one store: each source is polled by the runner holding
its lease, the others stand by (:class:`~gateway.sources.runner.SourceRunner`). :meth:`Gateway.stop`
lets every runner release its leases, so standbys elsewhere take over at once.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from gateway.bus import Bus, Topology, bus_from_settings
from gateway.config import ProcessSettings, Settings
from gateway.errors import ConfigurationError
from gateway.governance import Governance
from gateway.metrics import ResilienceMetrics, ScoringMetrics, serve_metrics
from gateway.observability import Instruments, instrument_gateway
from gateway.relay import Relay
from gateway.resilience import (
    BreakerRegistry,
    OutboxBackpressure,
    RetryPolicy,
    retrying,
)
from gateway.sources.runner import SourceRunner
from gateway.store import EventStore, engine_from_settings
from gateway.store.migrate import upgrade

__all__ = ["Gateway", "ROLES", "tune_process"]

log = logging.getLogger("gateway")

ROLES = ("sources", "relay", "scorer", "api", "bridge")


def tune_process(settings: ProcessSettings) -> None:
    """Garbage-collector tuning for a long-running process; call it once start-up is done.

    ``gc.freeze()`` moves every object alive now (modules, settings, loaded models, compiled
    statements) to the permanent generation, so the collections that follow no longer walk them;
    a higher young-generation threshold collects less often while batches of events allocate
    thousands of short-lived containers. Reference counting still frees nearly everything at once;
    the collector is only for cycles, which are still collected. Measured in the end-to-end
    benchmark: the collector's share of the gateway's CPU fell from about 17% to 1%
    (docs/decisions/0013-end-to-end-ceiling.md).
    """
    if settings.gc_freeze:
        gc.collect()  # what is garbage now should not become permanent
        gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(settings.gc_threshold, gen1, gen2)
    log.debug("process tuning: gc.freeze %s (%d objects frozen), young-generation threshold %d",
              settings.gc_freeze, gc.get_freeze_count(), settings.gc_threshold)


@dataclass
class _Worker:
    name: str
    thread: threading.Thread
    close: Callable[[], None] = lambda: None


@dataclass
class Gateway:
    """A running set of gateway roles sharing one store and one bus.

    Args:
        settings: validated settings.
        roles: which roles to run.
    """

    settings: Settings
    roles: Iterable[str] = ROLES
    store: EventStore = field(init=False)
    bus: Bus = field(init=False)
    topology: Topology = field(init=False)
    runners: list[SourceRunner] = field(default_factory=list, init=False)
    #: Circuit breakers and retry budgets shared by the source runners: sources whose adapters
    #: return the same ``breaker_key()`` (one downstream endpoint) share one breaker and one budget,
    #: and pause together. Every one of them is exported in :attr:`metrics_registry`.
    breakers: BreakerRegistry = field(init=False)
    #: This process's Prometheus registry: resilience metrics, and the API's when it runs here.
    metrics_registry: CollectorRegistry = field(default_factory=CollectorRegistry, init=False)
    #: The pollers' outbox backlog gate (REL-09), shared by every runner of this process.
    backpressure: OutboxBackpressure = field(init=False)
    relay: Relay | None = field(default=None, init=False)
    scorer: Any = field(default=None, init=False)
    scorers: list[Any] = field(default_factory=list, init=False)
    api_server: Any = field(default=None, init=False)
    forwarders: list[Any] = field(default_factory=list, init=False)
    #: The broker dead-letter-queue drain (scorer role), a :class:`~gateway.deadletters.DeadLetterDrain`.
    drain: Any = field(default=None, init=False)
    #: Scoring routes the scorer role serves: None for all of them (default route: None in the list).
    scoring_routes: Iterable[str | None] | None = None
    #: The scorer role's model-state checkpointer (a :class:`~gateway.scoring.checkpoint.ModelCheckpointer`).
    checkpointer: Any = field(default=None, init=False)
    #: Scrape-time collectors, publish/consume wrappers and tracing (docs/observability.md).
    observability: Instruments = field(init=False)

    def __post_init__(self) -> None:
        self.roles = tuple(self.roles)
        unknown = set(self.roles) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown role(s) {sorted(unknown)}; roles: {', '.join(ROLES)}")
        engine = engine_from_settings(self.settings.store)
        if self.settings.store.auto_migrate:
            upgrade(engine)
        self.store = EventStore(engine)
        res = self.settings.resilience
        self.breakers = BreakerRegistry(
            metrics=ResilienceMetrics(self.metrics_registry), budget_policy=res.budget_policy
        )
        self.backpressure = OutboxBackpressure(
            lambda: self.store.pending_stats()[0],
            res.backlog_threshold or self.settings.api.backlog_threshold,
            resume_ratio=res.backlog_resume_ratio,
            interval=res.backlog_check_interval,
        )
        self.topology = Topology.from_settings(self.settings.bus, self.settings.scoring).with_bridges(self.settings.bridges)
        self.bus = bus_from_settings(self.settings.bus, self.topology)
        self._stop = threading.Event()
        self._workers: list[_Worker] = []
        self._closers: list[Callable[[], None]] = []
        self.observability = instrument_gateway(self)

    # ------------------------------------------------------------------ lifecycle
    def _startup_policy(self) -> RetryPolicy:
        return self.settings.resilience.retry_policy(
            "startup", default=RetryPolicy(attempts=12, base_delay=0.5, max_delay=10.0, deadline=60.0)
        )

    def start(self) -> None:
        """Declare the topology and start every role in its own thread(s).

        An unreachable broker or store is retried for up to a minute (compose starts services in
        any order); a topology mismatch fails at once.
        """
        for attempt in retrying(self._startup_policy(), logger=log):
            with attempt:
                self.store.ping()
                self.bus.declare_topology()
        if "relay" in self.roles:
            publisher = self.observability.publisher(self.bus.publisher(), "relay")
            self.relay = Relay(
                self.store, publisher, self.topology, self.settings.relay,
                publish_timeout=self.settings.bus.publish_timeout,
            )
            self._spawn("relay", self.relay.run, publisher.close)
        if "scorer" in self.roles:
            self._start_scorer()
            self._start_dead_letter_drain()
        if "bridge" in self.roles:
            self._start_bridges()
        if "sources" in self.roles:
            for src in self.settings.sources:
                if not src.enabled:
                    continue
                runner = SourceRunner(
                    src, self.store, on_accept=self.wake_relay, breakers=self.breakers,
                    resilience=self.settings.resilience, backpressure=self.backpressure,
                    governance=Governance.from_settings(self.settings, self.store),  # one per runner (thread)
                )
                self.runners.append(runner)
                self._spawn(f"source:{src.name}", runner.run)
        if "api" in self.roles:
            self._start_api()

    def _start_scorer(self) -> None:
        """Workers for every scoring route this process serves (:attr:`scoring_routes`).

        Each route has its own consumer, model breaker, fallback, shadow and workers, so one
        route's outage pauses only that route's queue. A model used by several routes is built
        once here (one instance, one breaker, one learned state).
        """
        sc = self.settings.scoring
        routes = sc.route_names() if self.scoring_routes is None else list(self.scoring_routes)
        unknown = [r for r in routes if r not in sc.route_names()]
        if unknown:
            raise ConfigurationError(
                f"unknown scoring route(s) {unknown}; configured: {[r or 'default' for r in sc.route_names()]}"
            )
        publisher = self.observability.publisher(self.bus.publisher(), "scorer")  # thread-safe; shared by the workers
        self._closers.append(publisher.close)
        scoring_metrics = ScoringMetrics(self.metrics_registry)  # shared by the workers
        models: dict[str, Any] = {}  # model name -> the one instance of this process
        workers: list[tuple[str, Any]] = []
        for route in routes:
            workers.extend(self._build_route(route, publisher, scoring_metrics, models))
        self.scorers = [w for _, w in workers]
        self.scorer = self.scorers[0]
        if sc.checkpoint_interval > 0:
            # Restore BEFORE any worker scores: a batch scored by a fresh model would store
            # warm-up scores for good (scores are written once per event and model version).
            from gateway.scoring.checkpoint import ModelCheckpointer

            self.checkpointer = ModelCheckpointer(self.store, list(models.values()), interval=sc.checkpoint_interval)
            for attempt in retrying(self._startup_policy(), logger=log):
                with attempt:
                    restored = self.checkpointer.restore()
            if restored:
                log.info("model state restored from checkpoints: %s", restored)
            self.checkpointer.start()
            self._closers.insert(0, self.checkpointer.stop)  # the final checkpoint before anything closes
        for name, worker in workers:
            self._spawn(name, worker.run)

    def _build_route(
        self, route: str | None, publisher: Any, scoring_metrics: ScoringMetrics, models: dict[str, Any]
    ) -> list[tuple[str, Any]]:
        """The workers of one scoring route (thread name, worker), not started yet."""
        from gateway.bus.retry import RetrySchedule
        from gateway.scoring import LockedScorer, ScoringWorker, scorer_from_settings
        from gateway.scoring.resilience import AttemptLedger, scorer_breaker_policy
        from gateway.scoring.routing import build_fallback, build_shadow

        sc = self.settings.scoring.for_route(route)
        topology = self.topology.for_route(route)
        label = route or "default"

        def shared(name: str, build: Callable[[], Any]) -> Any:
            if name not in models:
                models[name] = build()
            return models[name]

        model = shared(sc.model, lambda: LockedScorer(scorer_from_settings(sc)))
        fallback = shared(sc.fallback, lambda: build_fallback(sc)) if sc.fallback is not None else None
        shadow = None
        if sc.shadow is not None:  # its breaker is in the registry too, so metrics and readiness see it
            shadow = build_shadow(sc, self.breakers.get(f"shadow:{sc.shadow.model}", scorer_breaker_policy()))
            if shadow is not None:
                shadow.scorer = shared(sc.shadow.model, lambda: shadow.scorer)
        # One breaker per model (in the registry, so metrics and readiness see it), one schedule
        # and one attempt ledger, shared by the route's workers.
        breaker = self.breakers.get(f"scorer:{model.name}", scorer_breaker_policy(sc.breaker.to_policy()))
        retry = RetrySchedule.from_settings(sc)
        ledger = AttemptLedger()
        # One consumer (one connection) shared by the route's workers: its get_batch, ack and
        # reject are thread-safe. With a consumer per worker, a dying process returned its messages
        # twice: the broker handed the first connection's unacked messages to the second one of
        # the same dead process before noticing that one was gone too, raising every delivery
        # count by 2.
        consumer = self.observability.consumer(
            self.bus.consumer(topology.scoring_queue, self.settings.bus.prefetch), topology.scoring_queue
        )
        self._closers.append(consumer.close)
        workers = []
        for i in range(sc.workers):
            worker = ScoringWorker(
                consumer, publisher, self.observability.scoring_store, model, topology,
                batch_max=sc.batch_max, batch_linger_ms=sc.batch_linger_ms,
                max_attempts=self.settings.bus.max_attempts, publish_timeout=self.settings.bus.publish_timeout,
                retry=retry, breaker=breaker, score_timeout=sc.score_timeout,
                prefetch=self.settings.bus.prefetch, ledger=ledger, fallback=fallback, shadow=shadow,
                metrics=scoring_metrics, late_after=sc.late_after,
            )
            workers.append((f"scorer-{label}-{i}" if self.settings.scoring.routes else f"scorer-{i}", worker))
        log.info("scoring route %s: %s -> model %r%s", label, topology.scoring_queue, model.name,
                 f", fallback {fallback.name!r}" if fallback is not None else "")
        return workers

    def _start_dead_letter_drain(self) -> None:
        """Drain ``<prefix>.dead`` into ``dead_letters`` (stage ``broker``): what the broker
        dead-lettered by itself (delivery limit, rejects) becomes inspectable and replayable.
        Every scorer process runs one; they compete for the queue like the scorers do."""
        from gateway.deadletters import DeadLetterDrain

        consumer = self.bus.consumer(self.topology.dead_letter_queue, 100)
        self.drain = DeadLetterDrain(consumer, self.store, self.topology)
        self._spawn("dead-letter-drain", self.drain.run, consumer.close)

    def _start_bridges(self) -> None:
        """One forwarder per bridge: its gateway queue in, the legacy broker (confirms) out."""
        from gateway.bridge import Forwarder
        from gateway.bus.pika_publisher import PikaPublisher
        from gateway.bus.topology import DeclaredTopology

        self.forwarders = []
        for b in self.settings.bridges:
            legacy = self.settings.bus.model_copy(update={"url": b.url})
            publisher = PikaPublisher(legacy, DeclaredTopology(), f"gateway-bridge-{b.name}")  # type: ignore[arg-type]
            publisher.start(wait=legacy.socket_timeout + 5.0)
            consumer = self.bus.consumer(self.topology.bridge_queue(b.name), self.settings.bus.prefetch)
            fwd = Forwarder(b, consumer, publisher, self.store, publish_timeout=self.settings.bus.publish_timeout)
            self.forwarders.append(fwd)

            def close(c: Any = consumer, p: Any = publisher) -> None:
                c.close()
                p.close()

            self._spawn(f"bridge:{b.name}", fwd.run, close)

    def _start_api(self) -> None:
        import uvicorn

        from gateway.api import create_app

        app = create_app(self.settings, self.store, self.bus, on_accept=self.wake_relay, registry=self.metrics_registry)
        app.state.breakers = self.breakers  # /readyz shows this process's breakers
        config = uvicorn.Config(
            app, host=self.settings.api.host, port=self.settings.api.port, log_level="warning", lifespan="off"
        )
        self.api_server = uvicorn.Server(config)

        def serve(_stop: threading.Event) -> None:
            self.api_server.run()

        def close() -> None:
            from gateway.api.routers.stream import close_stream_hub

            close_stream_hub(app)  # uvicorn runs lifespan="off" here: end the open SSE streams ourselves
            self.api_server.should_exit = True

        self._spawn("api", serve, close)

    def serve_metrics(self, port: int, addr: str = "0.0.0.0") -> None:  # noqa: S104
        """Serve :attr:`metrics_registry` on ``addr:port`` (a worker without the API role).

        Args:
            port: TCP port (0: any free port).
            addr: bind address.
        """
        server, _thread = serve_metrics(port, self.metrics_registry, addr)  # type: ignore[misc]
        self._closers.append(server.shutdown)
        log.info("metrics on http://%s:%d/metrics", addr, server.server_port)

    def _spawn(self, name: str, target: Callable[[threading.Event], None], close: Callable[[], None] = lambda: None) -> None:
        def body() -> None:
            try:
                target(self._stop)
            except Exception:
                log.exception("role %s crashed", name)

        thread = threading.Thread(target=body, name=f"gateway-{name}", daemon=True)
        self._workers.append(_Worker(name, thread, close))
        thread.start()

    def wake_relay(self) -> None:
        """Wake the in-process relay after a commit (no fixed-interval wait while work waits)."""
        if self.relay is not None:
            self.relay.wake()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop intake, let every role finish its current batch, then close connections."""
        self._stop.set()
        if self.api_server is not None:
            self.api_server.should_exit = True
        for w in self._workers:
            w.thread.join(timeout)
        for close in [w.close for w in reversed(self._workers)] + self._closers:
            try:
                close()
            except Exception:  # noqa: BLE001 -- closing is best effort
                log.exception("closing failed")
        self.bus.close()
        self.store.engine.dispose()

    def __enter__(self) -> Gateway:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
