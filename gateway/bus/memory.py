"""The in-process bus: the embedded mode's broker, with RabbitMQ's delivery semantics.

It routes like RabbitMQ (topic, direct and fanout exchanges, ``mandatory`` returns), honours the
quorum queue arguments the gateway declares (delivery limit, dead-letter exchange and routing key,
``x-max-length`` with ``reject-publish``, ``x-message-ttl``), and requeues unacknowledged
deliveries when a consumer closes. Messages live in memory: the outbox is the durable copy, so a
process restart loses nothing that was accepted.

TTL (the delayed retries of REL-08): a message expires after the queue's ``x-message-ttl`` or its
own ``Message.expiration_ms``, whichever is shorter, and -- as on RabbitMQ -- only at the head of
its queue. It is then dead-lettered (reason ``expired``) to the queue's dead-letter exchange with
``x-dead-letter-routing-key``; with ``x-dead-letter-strategy=at-least-once`` a target that refuses
it (full) leaves it at the head to be tried again. Expiry runs on every bus operation and on a
daemon timer thread that lives while some message waits to expire. The clock is injectable.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.bus.protocols import BusHealth, Delivery, Message, Outcome
from gateway.bus.topology import QueueSpec, Topology, topic_matches
from gateway.errors import ConfigurationError

__all__ = ["InMemoryBus", "InMemoryPublisher", "InMemoryConsumer"]


@dataclass
class _Queued:
    message: Message
    exchange: str
    headers: dict[str, Any]
    deliveries: int = 0
    expires_at: float | None = None  # bus-clock time; None: never


@dataclass
class _Queue:
    spec: QueueSpec
    items: deque[_Queued] = field(default_factory=deque)


class InMemoryBus:
    """A broker inside the process. Thread-safe.

    Args:
        topology: the gateway topology :meth:`declare_topology` declares.
        clock: monotonic clock in seconds for message TTLs (tests inject a fake one and call
            :meth:`expire` after advancing it).
    """

    kind = "memory"

    def __init__(self, topology: Topology, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.topology = topology
        self._clock = clock
        self._cond = threading.Condition()
        self._exchanges: dict[str, str] = {}
        self._alternates: dict[str, str] = {}  # exchange -> its alternate exchange
        self._queues: dict[str, _Queue] = {}
        self._bindings: list[tuple[str, str, str]] = []  # exchange, pattern, queue
        self._exchange_bindings: list[tuple[str, str, str]] = []  # source, pattern, destination
        self._closed = False
        self._timer: threading.Thread | None = None

    # -- topology
    def declare_topology(self) -> None:
        """Declare the gateway topology (idempotent; a changed argument is an error)."""
        self.declare(self.topology)

    def declare(self, topology: Topology) -> None:
        """Declare ``topology``'s exchanges, queues and bindings as RabbitMQ would; drop its obsolete bindings."""
        with self._cond:
            for name, kind in topology.exchanges():
                self.declare_exchange(name, kind, topology.exchange_arguments(name))
            for spec in topology.queues():
                self.declare_queue(spec)
            for destination, source, pattern in topology.exchange_bindings():
                if (source, pattern, destination) not in self._exchange_bindings:
                    self._exchange_bindings.append((source, pattern, destination))
            for queue, exchange, pattern in topology.obsolete_bindings():
                if (exchange, pattern, queue) in self._bindings:
                    self._bindings.remove((exchange, pattern, queue))

    def declare_exchange(self, name: str, kind: str, arguments: dict[str, Any] | None = None) -> None:
        with self._cond:
            have = self._exchanges.setdefault(name, kind)
            if have != kind:
                raise ConfigurationError(f"exchange {name!r} exists as {have}, declared as {kind}")
            alternate = (arguments or {}).get("alternate-exchange")
            if alternate:
                self._alternates[name] = alternate

    def declare_queue(self, spec: QueueSpec) -> None:
        with self._cond:
            q = self._queues.get(spec.name)
            if q is None:
                self._queues[spec.name] = _Queue(spec)
            elif q.spec.arguments != spec.arguments:
                raise ConfigurationError(
                    f"PRECONDITION_FAILED: queue {spec.name!r} exists with arguments "
                    f"{q.spec.arguments}, declared with {spec.arguments}"
                )
            for exchange, pattern in spec.bindings:
                self.bind(spec.name, exchange, pattern)

    def bind(self, queue: str, exchange: str, pattern: str) -> None:
        with self._cond:
            if (exchange, pattern, queue) not in self._bindings:
                self._bindings.append((exchange, pattern, queue))

    def queue_depth(self, queue: str) -> int:
        """Ready messages in ``queue`` (unacked ones not counted)."""
        with self._cond:
            self._expire_locked()
            return len(self._queues[queue].items)

    # -- TTL
    def expire(self) -> int:
        """Dead-letter every message whose TTL has passed and that is at its queue's head.

        Returns:
            How many messages expired.
        """
        with self._cond:
            return self._expire_locked()

    def _expire_locked(self) -> int:
        now = self._clock()
        expired = 0
        for q in list(self._queues.values()):
            while q.items and q.items[0].expires_at is not None and q.items[0].expires_at <= now:
                item = q.items[0]
                ok = self._dead_letter_locked(q, item, "expired")
                if not ok and q.spec.arguments.get("x-dead-letter-strategy") == "at-least-once":
                    break  # the target refused it: keep it at the head, try again later
                q.items.popleft()
                expired += 1
        return expired

    def _next_expiry_locked(self) -> float | None:
        heads = [q.items[0].expires_at for q in self._queues.values() if q.items and q.items[0].expires_at is not None]
        return min(heads) if heads else None

    def _ensure_timer_locked(self) -> None:
        """Start the expiry timer thread unless it runs; it ends when nothing waits to expire."""
        if self._timer is None and not self._closed:
            self._timer = threading.Thread(target=self._run_timer, name="gateway-memory-bus-ttl", daemon=True)
            self._timer.start()

    def _run_timer(self) -> None:
        with self._cond:
            try:
                while not self._closed:
                    if self._expire_locked():
                        self._cond.notify_all()
                    nxt = self._next_expiry_locked()
                    if nxt is None:
                        return
                    # Real seconds, capped: with an injected fake clock this is only a poll interval.
                    self._cond.wait(min(max(nxt - self._clock(), 0.001), 0.25))
            finally:
                self._timer = None

    # -- routing
    def _route(self, exchange: str, routing_key: str, _via: frozenset[str] = frozenset()) -> list[_Queue]:
        """The queues ``routing_key`` reaches from ``exchange``: its queue bindings, its
        exchange-to-exchange bindings (followed), and its alternate exchange when nothing matched."""
        kind = self._exchanges.get(exchange)
        if kind is None or exchange in _via:
            return []
        via = _via | {exchange}

        def hit(pattern: str) -> bool:
            return kind == "fanout" or (kind == "topic" and topic_matches(pattern, routing_key)) or (
                kind == "direct" and pattern == routing_key
            )

        out: dict[str, _Queue] = {}  # a queue gets a message once, however many of its bindings match
        for ex, pattern, qname in self._bindings:
            if ex == exchange and qname not in out and hit(pattern):
                out[qname] = self._queues[qname]
        for source, pattern, destination in self._exchange_bindings:
            if source == exchange and hit(pattern):
                for q in self._route(destination, routing_key, via):
                    out.setdefault(q.spec.name, q)
        if not out and exchange in self._alternates:
            for q in self._route(self._alternates[exchange], routing_key, via):
                out.setdefault(q.spec.name, q)
        return list(out.values())

    def _publish_locked(self, exchange: str, msg: Message, headers: dict[str, Any] | None = None) -> Outcome:
        targets = self._route(exchange, msg.routing_key)
        if not targets:
            return Outcome.RETURNED
        for q in targets:
            limit = q.spec.arguments.get("x-max-length")
            if limit is not None and len(q.items) >= limit:
                return Outcome.NACK
        now: float | None = None
        for q in targets:
            ttls = [t for t in (q.spec.arguments.get("x-message-ttl"), msg.expiration_ms) if t is not None]
            expires_at = None
            if ttls:
                now = self._clock() if now is None else now
                expires_at = now + min(ttls) / 1000.0
            q.items.append(_Queued(msg, exchange, dict(headers if headers is not None else msg.headers),
                                   expires_at=expires_at))
            if expires_at is not None:
                self._ensure_timer_locked()
        self._cond.notify_all()
        return Outcome.ACK

    def _dead_letter_locked(self, q: _Queue, item: _Queued, reason: str) -> bool:
        """Publish ``item`` to ``q``'s DLX as RabbitMQ does; False when the DLX target refused it."""
        dlx = q.spec.arguments.get("x-dead-letter-exchange")
        if not dlx:
            return True  # RabbitMQ drops it too when no DLX is configured
        headers = dict(item.headers)
        death = {"queue": q.spec.name, "reason": reason, "exchange": item.exchange,
                 "routing-keys": [item.message.routing_key], "count": 1}
        headers["x-death"] = [death, *headers.get("x-death", [])]
        headers["x-first-death-reason"] = headers.get("x-first-death-reason", reason)
        # Like RabbitMQ: the per-message TTL is removed, the routing key may be replaced.
        message = replace(
            item.message,
            routing_key=q.spec.arguments.get("x-dead-letter-routing-key", item.message.routing_key),
            expiration_ms=None,
        )
        return self._publish_locked(dlx, message, headers) is not Outcome.NACK

    def _return_locked(self, q: _Queue, item: _Queued, *, count: bool) -> None:
        if count:
            item.deliveries += 1
        limit = q.spec.arguments.get("x-delivery-limit")
        if limit is not None and item.deliveries > limit:
            self._dead_letter_locked(q, item, "delivery_limit")
        else:
            q.items.appendleft(item)
            self._cond.notify_all()

    # -- factories
    def publisher(self) -> InMemoryPublisher:
        return InMemoryPublisher(self)

    def consumer(self, queue: str, prefetch: int) -> InMemoryConsumer:
        with self._cond:
            if queue not in self._queues:
                raise ConfigurationError(f"NOT_FOUND: no queue {queue!r}")
        return InMemoryConsumer(self, queue, prefetch)

    def health(self) -> BusHealth:
        return BusHealth(ok=not self._closed, kind=self.kind, detail="in-process bus")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class InMemoryPublisher:
    """Publisher of the in-process bus; every future is resolved at once."""

    def __init__(self, bus: InMemoryBus) -> None:
        self._bus = bus
        self._closed = False

    def publish(self, exchange: str, messages: Sequence[Message]) -> Future[list[Outcome]]:
        fut: Future[list[Outcome]] = Future()
        with self._bus._cond:
            if self._bus._closed or self._closed:
                fut.set_result([Outcome.LOST] * len(messages))
            else:
                self._bus._expire_locked()
                fut.set_result([self._bus._publish_locked(exchange, m) for m in messages])
        return fut

    def close(self) -> None:
        # Like RabbitMQ's publisher: a closed publisher delivers nothing (LOST), it never ACKs.
        self._closed = True


class InMemoryConsumer:
    """Consumer of the in-process bus with prefetch, manual ack, and pause/resume."""

    _tags = itertools.count(1)

    def __init__(self, bus: InMemoryBus, queue: str, prefetch: int) -> None:
        self._bus = bus
        self._queue = queue
        self._prefetch = prefetch
        self._unacked: dict[int, _Queued] = {}
        self._closed = False
        self._paused = False

    @property
    def prefetch(self) -> int:
        """The current prefetch (unacked deliveries at most)."""
        return self._prefetch

    @property
    def paused(self) -> bool:
        """Whether :meth:`pause` is in effect."""
        return self._paused

    def pause(self) -> None:
        """Take no deliveries until :meth:`resume`; handed-out ones stay valid.

        This consumer holds nothing it has not handed out (``get_batch`` takes from the queue
        directly), so there is nothing to give back. Idempotent; thread-safe.
        """
        with self._bus._cond:
            self._paused = True
            self._bus._cond.notify_all()

    def resume(self, prefetch: int | None = None) -> None:
        """Take deliveries again, at most ``prefetch`` unacked (default: unchanged). Thread-safe."""
        if prefetch is not None and prefetch < 1:
            raise ValueError("prefetch must be >= 1")
        with self._bus._cond:
            if prefetch is not None:
                self._prefetch = prefetch
            self._paused = False
            self._bus._cond.notify_all()

    def get_batch(self, max_messages: int, max_wait: float, linger: float) -> list[Delivery]:
        """Up to ``max_messages`` deliveries; waits like the pika consumer (nothing while paused)."""
        out: list[Delivery] = []
        if max_messages <= 0:
            return out
        deadline = time.monotonic() + max_wait
        with self._bus._cond:
            q = self._bus._queues[self._queue]
            while not self._closed and not self._bus._closed:
                self._bus._expire_locked()
                while (not self._paused and q.items and len(out) < max_messages
                       and len(self._unacked) < self._prefetch):
                    item = q.items.popleft()
                    tag = next(self._tags)
                    self._unacked[tag] = item
                    headers = dict(item.headers)
                    if item.deliveries:
                        headers["x-delivery-count"] = item.deliveries
                    out.append(
                        Delivery(item.message.body, item.message.routing_key, item.message.message_id,
                                 headers, item.deliveries > 0, tag, item.message.content_type)
                    )
                if out and (len(out) >= max_messages or len(self._unacked) >= self._prefetch):
                    break
                if out and linger <= 0:
                    break
                if out and deadline > time.monotonic() + linger:
                    deadline = time.monotonic() + linger
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._bus._cond.wait(remaining)
        return out

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        with self._bus._cond:
            for d in deliveries:
                self._unacked.pop(d.tag, None)
            self._bus._cond.notify_all()

    def reject(self, delivery: Delivery, requeue: bool) -> None:
        with self._bus._cond:
            item = self._unacked.pop(delivery.tag, None)
            if item is None:
                return
            q = self._bus._queues[self._queue]
            if requeue:
                self._bus._return_locked(q, item, count=True)
            else:
                self._bus._dead_letter_locked(q, item, "rejected")

    def close(self) -> None:
        with self._bus._cond:
            q = self._bus._queues[self._queue]
            for tag in sorted(self._unacked, reverse=True):
                self._bus._return_locked(q, self._unacked.pop(tag), count=True)
            self._closed = True
            self._bus._cond.notify_all()
