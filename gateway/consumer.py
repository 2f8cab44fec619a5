"""A small decorator-style consumer of scored events (``<prefix>.scored``), for downstream apps.

::

    from gateway.consumer import ScoredEvent, ScoredEventConsumer

    app = ScoredEventConsumer("amqp://...", queue="fraud-desk.scored", prefix="gateway", prefetch=100)

    @app.on("com.acme.cards.#", min_score=0.99)
    def high_risk(event: ScoredEvent) -> None:
        ...

    app.run()  # blocks until SIGINT/SIGTERM or app.stop()

Transport: the gateway's own :class:`~gateway.bus.pika_consumer.PikaConsumer` (a
``SelectConnection`` on its own I/O thread; reconnect with jittered backoff that re-declares the
topology and QoS; watchdog; thread-safe acks). The consumer declares its own topology (see
:meth:`ScoredEventConsumer.topology`) on every (re)connect: the scored exchange with exactly the
gateway's declaration (durable topic, no arguments), so either side may start first; a quorum
queue bound with every handler's pattern; and its own dead-letter exchange ``<queue>.dlx`` with
the dead queue ``<queue>.dead``.

Delivery semantics (docs/consumers.md):

* manual ack after every matching handler returned; parse errors, :class:`PermanentError` and
  the last failed attempt are rejected without requeue (to ``<queue>.dead``) with a logged reason;
* other handler exceptions reject with requeue until ``max_attempts``; the attempt is the broker's
  ``x-delivery-count`` + 1 (quorum queues), or this process's own failure count by message id,
  whichever is larger; the queue's ``x-delivery-limit`` is the broker-side backstop;
* :class:`SkippableError` from a handler is logged and counts as done.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import signal
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol, Self

from pydantic import SecretStr, ValidationError

from gateway.bus.protocols import Consumer, Delivery
from gateway.bus.topology import DeclaredTopology, QueueSpec, Topology, topic_matches
from gateway.config import BusSettings
from gateway.errors import (
    ConfigurationError,
    ContractError,
    PermanentError,
    SkippableError,
)
from gateway.events.jsonsafe import loads
from gateway.events.model import Event
from gateway.events.scored import SCORED_SUFFIX

__all__ = ["DEFAULT_DELIVERY_LIMIT", "ConsumerStats", "Delivery", "ScoredEvent", "ScoredEventConsumer"]

_log = logging.getLogger(__name__)

#: Default ``x-delivery-limit`` of the consumer's queue. Fixed (not derived from ``max_attempts``)
#: so tuning ``max_attempts`` never changes the queue's arguments (a PRECONDITION_FAILED).
DEFAULT_DELIVERY_LIMIT = 20
_LOCAL_COUNTS = 100_000  # in-memory failure counts kept at most (oldest dropped first)


@dataclass(frozen=True, slots=True)
class ScoredEvent:
    """A parsed, typed view of one scored event (docs/consumers.md#the-scored-event).

    Attributes:
        id: the scored event's id: deterministic per (original id, model name, model version);
            de-duplicate on it.
        type: ``<original type>.scored``.
        source: the scorer's source, ``/legacy-gateway/scorer``.
        time: when the event was scored (aware UTC).
        subject: the original event's subject, if any.
        score: in [0, 1]; higher is more anomalous.
        model_name: the model that produced the score.
        model_version: its version.
        explanation: the model's explanation object, or ``None``.
        original_id: the original event's id (``GET /v1/events/{original_id}``).
        original_type: the original event's type (the routing key).
        original_source: the original event's source.
        data: the original event's data (the legacy record).
        original: the original event, whole (a structured-mode CloudEvent dict).
        extensions: the scored event's extension attributes (lineage, ``originalid``, ...).
        raw: the whole scored CloudEvent as received.
    """

    id: str
    type: str
    source: str
    time: datetime
    subject: str | None
    score: float
    model_name: str
    model_version: str
    explanation: Any
    original_id: str
    original_type: str
    original_source: str
    data: Any
    original: dict[str, Any] = field(repr=False)
    extensions: Mapping[str, Any] = field(repr=False)
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, body: bytes | str) -> ScoredEvent:
        """Parse a structured-mode scored CloudEvent.

        Raises:
            ContractError: naming what is wrong (not JSON, a missing attribute, a bad score...).
        """
        try:
            raw = loads(body)
        except ValueError as exc:
            raise ContractError(f"body is not valid JSON: {exc}") from None
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Any) -> ScoredEvent:
        """Validate a structured-mode scored event object (see :meth:`from_json`)."""
        outer = Event.from_dict(raw, "scored event")
        data = outer.data
        if not isinstance(data, dict):
            raise ContractError(f"scored event.data: expected an object, got {type(data).__name__}")
        score = data.get("score")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0.0 <= float(score) <= 1.0:
            raise ContractError(f"scored event.data.score: expected a number in [0, 1], got {score!r}")
        model = data.get("model")
        if not isinstance(model, dict) or not all(isinstance(model.get(k), str) for k in ("name", "version")):
            raise ContractError(f"scored event.data.model: expected {{name, version}} strings, got {model!r}")
        original_obj = data.get("event")
        original = Event.from_dict(original_obj, "scored event.data.event")
        if not outer.type.endswith(SCORED_SUFFIX):
            raise ContractError(f"scored event.type: expected '<original type>{SCORED_SUFFIX}', got {outer.type!r}")
        return cls(
            id=outer.id, type=outer.type, source=outer.source, time=outer.time, subject=outer.subject,
            score=float(score), model_name=model["name"], model_version=model["version"],
            explanation=data.get("explanation"),
            original_id=str(outer.extensions.get("originalid", original.id)),
            original_type=original.type, original_source=original.source, data=original.data,
            original=dict(original_obj),  # type: ignore[call-overload]
            extensions=dict(outer.extensions), raw=raw,
        )


@dataclass
class ConsumerStats:
    """Counters of one :class:`ScoredEventConsumer` (read them for logs, metrics or tests)."""

    acked: int = 0  #: messages acked (every matching handler done)
    retried: int = 0  #: rejects with requeue after a handler failure
    dead_lettered: int = 0  #: rejects without requeue (to ``<queue>.dead``)
    parse_errors: int = 0  #: bodies that were no valid scored event (dead-lettered)
    unmatched: int = 0  #: acked messages no handler pattern matched (a stale binding)
    handler_calls: int = 0  #: handler invocations (filtered or de-duplicated ones not counted)
    duplicates_skipped: int = 0  #: handler calls skipped by ``idempotent=True``


Handler = Callable[..., Any]


@dataclass
class _Route:
    pattern: str
    handler: Handler
    wants_delivery: bool
    min_score: float | None
    idempotent: bool
    seen: OrderedDict[str, None] = field(default_factory=OrderedDict)

    @property
    def name(self) -> str:
        return getattr(self.handler, "__qualname__", repr(self.handler))


class _Declaring(Protocol):
    """What an in-process bus offers to declare a consumer's own topology (``InMemoryBus``)."""

    def declare_exchange(self, name: str, kind: str) -> None: ...

    def declare_queue(self, spec: QueueSpec) -> None: ...

    def consumer(self, queue: str, prefetch: int) -> Consumer: ...


def _arity(handler: Handler) -> bool:
    """True when ``handler`` takes (event, delivery), False for (event); else TypeError."""
    try:
        params = list(inspect.signature(handler).parameters.values())
    except (TypeError, ValueError):  # no signature (some builtins): pass the event only
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in params if p.default is p.empty and p.kind is not p.VAR_KEYWORD]
    if not positional or len(required) > 2 or any(p.kind is p.KEYWORD_ONLY for p in required):
        raise TypeError(f"handler {handler!r} must take (event) or (event, delivery)")
    return len(positional) >= 2


class ScoredEventConsumer:
    """Consume scored events by type pattern with decorator-registered handlers.

    Args:
        url: AMQP URL of the RabbitMQ the gateway publishes to (ignored when ``bus`` is given).
        queue: your queue, named after your application (e.g. ``fraud-desk.scored``).
        prefix: the gateway's ``bus.prefix``; scored events come from ``<prefix>.scored``.
        prefetch: unacked deliveries the broker sends ahead (QoS); at least ``workers``.
        workers: worker threads running handlers, one delivery at a time each.
        max_attempts: deliveries of a message whose handler fails before it goes to the dead queue.
        delivery_limit: the queue's ``x-delivery-limit`` (broker backstop, > ``max_attempts``).
            Part of the queue's arguments: changing it later fails with PRECONDITION_FAILED.
        seen_size: entries of each ``idempotent=True`` handler's in-memory seen-set.
        stop_timeout: seconds :meth:`stop` waits for in-flight handlers before closing anyway.
        name: the connection name the broker shows (default ``<queue>-consumer``).
        settings: connection tuning (heartbeat, timeouts, ``reconnect_max_delay``,
            ``watchdog_interval``); its ``url`` and ``prefix`` are replaced by ``url``/``prefix``.
        bus: an in-process bus (``gateway.bus.InMemoryBus``) instead of RabbitMQ, for tests.
        thread_guard: pika thread-ownership guard (debug), see ``gateway.bus.pika_params``.

    Raises:
        ConfigurationError: a bad queue name (one of the gateway's), or bad numbers.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        queue: str,
        prefix: str = "gateway",
        prefetch: int = 100,
        workers: int = 1,
        max_attempts: int = 3,
        delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
        seen_size: int = 10_000,
        stop_timeout: float = 30.0,
        name: str | None = None,
        settings: BusSettings | None = None,
        bus: _Declaring | None = None,
        thread_guard: bool | None = None,
    ) -> None:
        if (url is None) == (bus is None):
            raise ConfigurationError("give exactly one of url (RabbitMQ) and bus (in-process)")
        if not 1 <= prefetch <= 65535 or workers < 1 or prefetch < workers:
            raise ConfigurationError(f"need 1 <= workers <= prefetch <= 65535, got workers={workers} prefetch={prefetch}")
        if max_attempts < 1 or delivery_limit <= max_attempts:
            raise ConfigurationError(
                f"need 1 <= max_attempts < delivery_limit, got max_attempts={max_attempts} delivery_limit={delivery_limit}"
            )
        _check_queue_name(queue, prefix)
        self.queue = queue
        self.prefix = prefix
        self.prefetch = prefetch
        self.workers = workers
        self.max_attempts = max_attempts
        self.delivery_limit = delivery_limit
        self.seen_size = seen_size
        self.stop_timeout = stop_timeout
        self.name = name or f"{queue}-consumer"
        self.stats = ConsumerStats()
        self._settings = _bus_settings(url, prefix, settings) if url is not None else None
        self._bus = bus
        self._thread_guard = thread_guard
        self._routes: list[_Route] = []
        self._lock = threading.Lock()  # stats, seen-sets, failure counts
        self._life = threading.Lock()  # start/stop: a stop during start waits for it, then undoes it
        self._failures: OrderedDict[str, int] = OrderedDict()
        self._consumer: Consumer | None = None
        self._threads: list[threading.Thread] = []
        self._stop_requested = threading.Event()
        self._started = False
        self._stopping = False

    # -- registration
    def on(
        self, pattern: str, *, min_score: float | None = None, idempotent: bool = False
    ) -> Callable[[Handler], Handler]:
        """Register the decorated function for scored events whose original type matches ``pattern``.

        Args:
            pattern: an AMQP topic pattern on the original event type (``*`` one word, ``#`` zero
                or more); it becomes a binding of the queue.
            min_score: call the handler only for scores >= this (others count as done).
            idempotent: skip the handler for an event id it already handled successfully in
                this process (a bounded in-memory seen-set; see docs/consumers.md).

        Returns:
            A decorator returning the function unchanged. The function takes ``(event)`` or
            ``(event, delivery)`` and runs on a worker thread.

        Raises:
            RuntimeError: when the consumer has already started (bindings are declared at start).
        """
        if not pattern or any(w == "" for w in pattern.split(".")):
            raise ConfigurationError(f"bad topic pattern {pattern!r}")
        if min_score is not None and not 0.0 <= min_score <= 1.0:
            raise ConfigurationError(f"min_score must be within [0, 1], got {min_score!r}")

        def register(handler: Handler) -> Handler:
            if self._started:
                raise RuntimeError("register handlers before start(): bindings are declared at start")
            self._routes.append(_Route(pattern, handler, _arity(handler), min_score, idempotent))
            return handler

        return register

    # -- topology
    @property
    def scored_exchange(self) -> str:
        return Topology(self.prefix).scored_exchange

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.queue}.dlx"

    @property
    def dead_queue(self) -> str:
        return f"{self.queue}.dead"

    def topology(self) -> DeclaredTopology:
        """What the consumer declares on every (re)connect (exact arguments, REL-03)."""
        queue_args: dict[str, Any] = {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": self.dead_letter_exchange,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
            "x-delivery-limit": self.delivery_limit,
        }
        patterns = list(dict.fromkeys(r.pattern for r in self._routes))
        return DeclaredTopology(
            # The DLX first; the scored exchange exactly as the gateway declares it (durable topic).
            ((self.dead_letter_exchange, "fanout"), (self.scored_exchange, "topic")),
            (
                QueueSpec(self.dead_queue, {"x-queue-type": "quorum"}, ((self.dead_letter_exchange, ""),)),
                QueueSpec(self.queue, queue_args, tuple((self.scored_exchange, p) for p in patterns)),
            ),
        )

    # -- life cycle
    def start(self) -> None:
        """Declare, connect and start the workers; returns at once (the connection may still be coming).

        Raises:
            ConfigurationError: no handler registered, or the in-process bus refused the topology.
        """
        if not self._start_unless_stopped():
            raise RuntimeError("this consumer was stopped; create a new one")

    def _start_unless_stopped(self) -> bool:
        with self._life:
            if self._stopping:
                return False
            if not self._started:
                if not self._routes:
                    raise ConfigurationError("register at least one handler with @app.on(pattern) before start()")
                self._start()
                self._started = True
            return True

    def _start(self) -> None:
        topology = self.topology()
        if self._bus is not None:
            self._bus.declare(topology)
            self._consumer = self._bus.consumer(self.queue, self.prefetch)
        else:
            from gateway.bus.pika_consumer import PikaConsumer  # pika only when used

            settings = self._settings
            assert settings is not None
            con = PikaConsumer(
                settings, topology, self.queue, self.prefetch, self.name,  # type: ignore[arg-type]
                thread_guard=self._thread_guard,
            )
            con.start(wait=settings.socket_timeout + 5.0)  # never raises: it reconnects by itself
            self._consumer = con
        for i in range(self.workers):
            t = threading.Thread(target=self._work, name=f"{self.name}-worker-{i + 1}", daemon=True)
            self._threads.append(t)
            t.start()
        _log.info("%s: consuming %s from %s, patterns %s", self.name, self.queue, self.scored_exchange,
                  [r.pattern for r in self._routes])

    def run(self) -> None:
        """Start, then block until SIGINT/SIGTERM (main thread only) or :meth:`stop`; then stop gracefully.

        Returns at once when :meth:`stop` came first.
        """
        if not self._start_unless_stopped():
            return
        restore: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                restore[sig] = signal.signal(sig, lambda _s, _f: self._stop_requested.set())
        try:
            while not self._stop_requested.wait(0.5):
                pass
        finally:
            for sig, handler in restore.items():
                signal.signal(sig, handler)
            self._shutdown()

    def stop(self) -> None:
        """Stop gracefully: no new deliveries, in-flight handlers finish and are acked, then close.

        Safe from any thread, also from a handler (which then returns first) or a signal handler.
        """
        self._stop_requested.set()
        if threading.current_thread() in self._threads:
            return  # a handler asked: its worker must return before the shutdown can finish
        self._shutdown()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    @property
    def consumer(self) -> Consumer | None:
        """The underlying bus consumer (``PikaConsumer`` on RabbitMQ) once started."""
        return self._consumer

    def _shutdown(self) -> None:
        self._stop_requested.set()
        with self._life:  # a concurrent start() finishes first, so nothing it opens is left running
            first = not self._stopping
            self._stopping = True
            if first:
                self._close()

    def _close(self) -> None:
        try:
            con = self._consumer
            if con is not None:
                con.pause()  # stop intake; received but not handed-out deliveries go back
            for t in self._threads:
                if t is not threading.current_thread():
                    t.join(self.stop_timeout)
            busy = [t.name for t in self._threads if t.is_alive()]
            if busy:
                _log.warning("%s: %s still in a handler after %.0f s; closing (their messages are redelivered)",
                             self.name, busy, self.stop_timeout)
            if con is not None:
                con.close()  # acks handed over before this go out first (same I/O queue)
        finally:
            _log.info("%s: stopped (%s)", self.name, self.stats)

    # -- workers
    def _work(self) -> None:
        con = self._consumer
        assert con is not None
        while not self._stop_requested.is_set():
            try:
                batch = con.get_batch(1, 0.2, 0.0)
            except Exception:  # noqa: BLE001 - never let a worker die
                _log.exception("%s: get_batch failed", self.name)
                self._stop_requested.wait(0.5)
                continue
            for delivery in batch:
                try:
                    self.process(con, delivery)
                except Exception:  # noqa: BLE001 - a bug here must not end the loop
                    _log.exception("%s: processing message %s failed", self.name, delivery.message_id)

    def process(self, con: Consumer, delivery: Delivery) -> None:
        """Parse, dispatch to every matching handler, then ack or reject ``delivery`` on ``con``.

        The workers call this for every delivery; it is public so tests (and custom loops) can
        drive one delivery through the same path.

        Args:
            con: the consumer ``delivery`` came from (acks and rejects go back to it).
            delivery: one delivery of a scored event.
        """
        key = delivery.message_id or "sha256:" + hashlib.sha256(delivery.body).hexdigest()
        try:
            event = ScoredEvent.from_json(delivery.body)
        except ContractError as exc:
            _log.warning("%s: message %s is no valid scored event, to %s: %s", self.name, key, self.dead_queue, exc)
            self._count(parse_errors=1, dead_lettered=1)
            con.reject(delivery, requeue=False)
            return
        routing_key = delivery.routing_key or event.original_type
        routes = [r for r in self._routes if topic_matches(r.pattern, routing_key)]
        if not routes:
            _log.info("%s: no handler matches %r (a binding left from earlier?); acked", self.name, routing_key)
            self._count(unmatched=1, acked=1)
            con.ack([delivery])
            return
        attempt = self._attempt(delivery, key)
        for route in routes:
            if route.min_score is not None and event.score < route.min_score:
                continue
            if route.idempotent and self._seen(route, event.id):
                self._count(duplicates_skipped=1)
                continue
            try:
                self._count(handler_calls=1)
                route.handler(event, delivery) if route.wants_delivery else route.handler(event)
            except SkippableError as exc:
                _log.info("%s: %s skipped event %s: %s", self.name, route.name, event.id, exc)
            except Exception as exc:  # noqa: BLE001 - handler code: classify, never crash
                self._failed(con, delivery, key, route, event, attempt, exc)
                return
            if route.idempotent:
                self._remember(route, event.id)
        with self._lock:
            self._failures.pop(key, None)
            self.stats.acked += 1
        con.ack([delivery])

    def _failed(
        self, con: Consumer, delivery: Delivery, key: str, route: _Route, event: ScoredEvent, attempt: int,
        exc: Exception,
    ) -> None:
        permanent = isinstance(exc, PermanentError)
        if permanent or attempt >= self.max_attempts:
            why = "permanent error" if permanent else f"attempt {attempt} of {self.max_attempts}"
            _log.warning("%s: %s failed on event %s (%s), to %s: %s: %s", self.name, route.name, event.id, why,
                         self.dead_queue, type(exc).__name__, exc, exc_info=not permanent)
            with self._lock:
                self._failures.pop(key, None)
                self.stats.dead_lettered += 1
            con.reject(delivery, requeue=False)
            return
        _log.warning("%s: %s failed on event %s (attempt %d of %d), requeued: %s: %s", self.name, route.name,
                     event.id, attempt, self.max_attempts, type(exc).__name__, exc)
        with self._lock:
            self._failures[key] = attempt
            self._failures.move_to_end(key)
            while len(self._failures) > _LOCAL_COUNTS:
                self._failures.popitem(last=False)
            self.stats.retried += 1
        con.reject(delivery, requeue=True)

    def _attempt(self, delivery: Delivery, key: str) -> int:
        """This delivery's attempt (1 = first): broker count + 1 or local failures + 1, the larger."""
        with self._lock:
            local = self._failures.get(key, 0)
        return max(delivery.delivery_count, local) + 1

    def _seen(self, route: _Route, event_id: str) -> bool:
        with self._lock:
            return event_id in route.seen

    def _remember(self, route: _Route, event_id: str) -> None:
        with self._lock:
            route.seen[event_id] = None
            route.seen.move_to_end(event_id)
            while len(route.seen) > self.seen_size:
                route.seen.popitem(last=False)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, n in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + n)


def _bus_settings(url: str, prefix: str, base: BusSettings | None) -> BusSettings:
    """``base`` (or the defaults) with ``url`` and ``prefix``, validated; the URL is checked at once."""
    from gateway.bus.pika_params import connection_parameters

    try:
        settings = BusSettings.model_validate(
            {**(base or BusSettings()).model_dump(), "url": SecretStr(url), "prefix": prefix}
        )
    except ValidationError as exc:
        raise ConfigurationError(f"consumer settings: {exc}") from None
    connection_parameters(settings)  # a bad URL fails here, not on the I/O thread
    return settings


def _check_queue_name(queue: str, prefix: str) -> None:
    """Refuse the gateway's own names: declaring them with our arguments would fight the gateway."""
    if not queue or len(queue) > 200:
        raise ConfigurationError(f"bad queue name {queue!r}")
    gateway = Topology(prefix)
    taken = {q.name for q in gateway.queues()} | {n for n, _k in gateway.exchanges()} | {prefix}
    if queue in taken or queue.startswith((f"{prefix}.scoring", f"{prefix}.bridge.")):
        raise ConfigurationError(
            f"queue {queue!r} is one of the gateway's names under prefix {prefix!r}; name it after your application"
        )
