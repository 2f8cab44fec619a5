"""The RabbitMQ bus (pika): topology, publishers and consumers on separate connections (REL-10).

* :meth:`RabbitBus.declare_topology`, :meth:`RabbitBus.queue_depth` and :meth:`RabbitBus.health`
  use a short-lived ``BlockingConnection`` in the calling thread (never shared); ``health`` also
  reports the liveness of this bus's consumers (:meth:`RabbitBus.consumers_liveness`).
* Every :meth:`RabbitBus.publisher` and :meth:`RabbitBus.consumer` has its own
  ``SelectConnection`` and I/O thread, re-declares the topology on every (re)connect and recovers
  by itself.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pika
from pika.exceptions import AMQPError, ChannelClosedByBroker

from gateway.bus.pika_consumer import DeliveryTag, PikaConsumer
from gateway.bus.pika_params import IOThreadClient, connection_parameters, precondition_error, redact, topology_steps
from gateway.bus.pika_publisher import PikaPublisher
from gateway.bus.protocols import BusHealth
from gateway.bus.topology import Topology
from gateway.config import BusSettings
from gateway.errors import ConfigurationError, TransientError

__all__ = ["RabbitBus", "PikaPublisher", "PikaConsumer", "DeliveryTag"]


class RabbitBus:
    """The gateway's bus on RabbitMQ.

    Args:
        settings: bus settings; ``settings.url`` must be set (a ``SecretStr``, never logged).
        topology: exchange and queue names and arguments, usually ``Topology.from_settings``.
        thread_guard: wrap pika objects of publishers and consumers in a thread-ownership guard
            (default: env ``GATEWAY_PIKA_THREAD_GUARD``).
    """

    kind = "rabbitmq"

    def __init__(self, settings: BusSettings, topology: Topology, *, thread_guard: bool | None = None) -> None:
        if settings.url is None:
            raise ConfigurationError("bus.url is not set: RabbitMQ needs an AMQP URL")
        connection_parameters(settings)  # validate the URL early
        self.settings = settings
        self.topology = topology
        self._thread_guard = thread_guard
        self._clients: list[IOThreadClient] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._closed = False

    # -- blocking helpers (calling thread only)
    @contextmanager
    def _blocking_channel(self, name: str, quick: bool = False) -> Iterator[Any]:
        params = connection_parameters(self.settings, f"{self.topology.prefix}-{name}")
        if quick:
            params.socket_timeout = min(params.socket_timeout or 2.0, 2.0)
            params.stack_timeout = min(params.stack_timeout or 3.0, 3.0)
        try:
            conn = pika.BlockingConnection(params)
        except AMQPError as exc:
            raise TransientError(f"RabbitMQ not reachable: {redact(f'{type(exc).__name__}: {exc}', self.settings)}") from None
        except OSError as exc:
            raise TransientError(f"RabbitMQ not reachable: {redact(str(exc), self.settings)}") from None
        try:
            yield conn.channel()
        finally:
            if conn.is_open:
                try:
                    conn.close()
                except AMQPError:
                    pass

    def declare_topology(self) -> None:
        """Declare the DLX, the exchanges, the queues (exact arguments) and the bindings.

        Raises:
            ConfigurationError: ``PRECONDITION_FAILED`` naming the object when the broker has it
                with other arguments or type (REL-03: fail at start-up).
            TransientError: when the broker is not reachable.
        """
        what = ""
        try:
            with self._blocking_channel("topology") as ch:
                for what, call in topology_steps(self.topology):  # noqa: B007 -- `what` names the failure
                    call(ch)
        except ChannelClosedByBroker as exc:
            if exc.reply_code == 406:
                raise precondition_error(exc, what) from None
            raise ConfigurationError(f"declaring {what} failed: {exc.reply_code} {exc.reply_text}") from None

    def queue_depth(self, queue: str) -> int:
        """Ready messages in ``queue`` (passive declare; unacked deliveries not counted).

        Raises:
            ConfigurationError: ``NOT_FOUND`` when the queue does not exist.
        """
        try:
            with self._blocking_channel("inspect") as ch:
                return int(ch.queue_declare(queue=queue, passive=True).method.message_count)
        except ChannelClosedByBroker as exc:
            raise ConfigurationError(f"NOT_FOUND: no queue {queue!r} ({exc.reply_text})") from None

    def health(self) -> BusHealth:
        """Open and close a connection with short timeouts; the detail never shows the password."""
        try:
            with self._blocking_channel("health", quick=True):
                pass
        except TransientError as exc:
            return BusHealth(ok=False, kind=self.kind, detail=str(exc))
        except Exception as exc:  # noqa: BLE001 - health must answer, not raise
            return BusHealth(ok=False, kind=self.kind, detail=redact(f"{type(exc).__name__}: {exc}", self.settings))
        p = connection_parameters(self.settings)
        detail = f"connected to {p.host}:{p.port} vhost {p.virtual_host!r}"
        live = self.consumers_liveness()
        down = [d for ok, d in live.values() if not ok]
        if down:
            return BusHealth(ok=False, kind=self.kind, detail=f"{detail}; consumer not live: " + "; ".join(down))
        if live:
            paused = sum(1 for _ok, d in live.values() if ": paused" in d)
            detail += f"; {len(live)} consumers live ({paused} paused)"
        return BusHealth(ok=True, kind=self.kind, detail=detail)

    def consumers_liveness(self) -> dict[str, tuple[bool, str]]:
        """:meth:`PikaConsumer.liveness` of every open consumer this bus created, by connection name.

        ``health`` (and so ``/readyz``) fails when one of them is not live: closed by itself or
        disconnected longer than a connection attempt plus the backoff cap. A paused consumer is
        live. Consumers closed through ``close()`` are left out.
        """
        with self._lock:
            consumers = [c for c in self._clients if isinstance(c, PikaConsumer) and not c.close_requested]
        return {c.name: c.liveness() for c in consumers}

    # -- factories
    def publisher(self) -> PikaPublisher:
        """A new publisher with its own connection and I/O thread (connected when returned, if it can)."""
        pub = PikaPublisher(
            self.settings, self.topology, f"{self.topology.prefix}-publisher-{next(self._ids)}",
            thread_guard=self._thread_guard,
        )
        self._track(pub)
        pub.start(wait=self.settings.socket_timeout + 5.0)
        return pub

    def consumer(self, queue: str, prefetch: int) -> PikaConsumer:
        """A new consumer of ``queue`` with its own connection and I/O thread.

        Raises:
            ConfigurationError: ``NOT_FOUND`` when ``queue`` is not part of the topology and does
                not exist on the broker.
        """
        if queue not in {q.name for q in self.topology.queues()}:
            self.queue_depth(queue)  # raises NOT_FOUND
        con = PikaConsumer(
            self.settings, self.topology, queue, prefetch, f"{self.topology.prefix}-consumer-{next(self._ids)}",
            thread_guard=self._thread_guard,
        )
        self._track(con)
        con.start(wait=self.settings.socket_timeout + 5.0)
        return con

    def _track(self, client: IOThreadClient) -> None:
        with self._lock:
            if self._closed:
                raise ConfigurationError("the bus is closed")
            self._clients = [c for c in self._clients if not c._closed]
            self._clients.append(client)

    def close(self) -> None:
        """Close every publisher and consumer this bus created. Idempotent."""
        with self._lock:
            self._closed = True
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()  # type: ignore[attr-defined]
