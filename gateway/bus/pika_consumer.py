"""Consumer with prefetch and manual acks on a pika ``SelectConnection`` (REL-06, REL-07, REL-10).

Threading: the I/O thread receives deliveries and puts them in a ``queue.SimpleQueue``; worker
threads take micro-batches with :meth:`PikaConsumer.get_batch`. ``ack``/``reject`` from any thread
are handed to the I/O thread with ``add_callback_threadsafe``, because a pika channel must only
be used by the thread running its connection's I/O loop.

Recovery: after a connection or channel loss the consumer reconnects with jittered backoff,
re-declares the topology, re-sets QoS and subscribes again. Each channel is a new *generation*:
a :class:`DeliveryTag` carries it, so acks for deliveries of a dead channel are dropped (the
broker redelivers those messages) instead of acking an unrelated message on the new channel.
"""

from __future__ import annotations

import itertools
import logging
import queue
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from gateway.bus.pika_params import IOThreadClient
from gateway.bus.protocols import Delivery
from gateway.bus.topology import Topology
from gateway.config import BusSettings

__all__ = ["PikaConsumer", "DeliveryTag"]

_log = logging.getLogger(__name__)
_owners = itertools.count(1)
_CLOSED = object()  # wakes get_batch waiters on close


class DeliveryTag(NamedTuple):
    """``Delivery.tag`` of a pika delivery: which consumer, which channel generation, which tag."""

    owner: int
    generation: int
    delivery_tag: int


def _plain(value: Any) -> Any:
    """AMQP header value as plain Python: UTF-8 ``bytes`` -> ``str``, recursively in tables/arrays."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class PikaConsumer(IOThreadClient):
    """Consumes one queue with ``basic_qos(prefetch)`` and manual acks, reconnecting by itself.

    Args:
        settings: bus settings (URL, timeouts, backoff cap).
        topology: declared on every (re)connect before consuming resumes.
        queue: the queue to consume.
        prefetch: the QoS prefetch count (unacked deliveries the broker sends ahead).
        name: the connection name shown by the broker.
        thread_guard: wrap pika objects in a thread-ownership guard (default: env
            ``GATEWAY_PIKA_THREAD_GUARD``).
    """

    def __init__(
        self,
        settings: BusSettings,
        topology: Topology,
        queue: str,
        prefetch: int,
        name: str = "gateway-consumer",
        *,
        thread_guard: bool | None = None,
    ) -> None:
        super().__init__(settings, topology, name, thread_guard=thread_guard)
        self.queue = queue
        self._prefetch = prefetch
        self._owner = next(_owners)
        self._deliveries: queue.SimpleQueue[Any] = _new_queue()
        self._generation = 1  # written on the I/O thread; read (atomically) by get_batch
        # I/O thread only:
        self._outstanding: set[int] = set()
        self._consumer_tag: str | None = None
        self._consuming = False

    # -- any thread
    def get_batch(self, max_messages: int, max_wait: float, linger: float) -> list[Delivery]:
        """Wait up to ``max_wait`` s for a first delivery, then up to ``linger`` s to fill the batch.

        Deliveries of a channel that has since died are skipped: the broker redelivers them.
        """
        out: list[Delivery] = []
        if max_messages <= 0 or self._closed:
            return out
        q = self._deliveries
        deadline = time.monotonic() + max(0.0, max_wait)
        while len(out) < max_messages:
            try:
                item = q.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = q.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is _CLOSED:
                q.put(_CLOSED)  # wake the next waiter too
                break
            if item.tag.generation != self._generation:
                continue
            if not out:
                # The first delivery arrived: from now on only linger to fill the batch.
                deadline = min(deadline, time.monotonic() + max(0.0, linger)) if linger > 0 else time.monotonic()
            out.append(item)
        return out

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge ``deliveries`` (thread-safe); a delivery from a dead channel is dropped."""
        tags = [d.tag for d in deliveries]
        if tags:
            self.call_threadsafe(lambda: self._do_ack(tags))

    def reject(self, delivery: Delivery, requeue: bool) -> None:
        """Reject one delivery: ``requeue=False`` dead-letters it through the queue's DLX."""
        tag = delivery.tag
        self.call_threadsafe(lambda: self._do_reject(tag, requeue))

    def close(self) -> None:
        """Cancel the subscription and close the connection; unacked deliveries return to the queue."""
        self._stop(timeout=max(5.0, self._settings.socket_timeout))
        self._deliveries.put(_CLOSED)

    # -- I/O thread
    def _valid(self, tags: Sequence[DeliveryTag]) -> set[int]:
        if not self._consuming or self._channel is None:
            return set()
        owner, gen, outstanding = self._owner, self._generation, self._outstanding
        return {
            t.delivery_tag for t in tags
            if type(t) is DeliveryTag and t.owner == owner and t.generation == gen and t.delivery_tag in outstanding
        }

    def _do_ack(self, tags: Sequence[DeliveryTag]) -> None:
        valid = self._valid(tags)
        if not valid:
            return
        outstanding = self._outstanding
        top = max(valid)
        try:
            if len(valid) == len(outstanding) or len(valid) == sum(1 for t in outstanding if t <= top):
                # The common case: everything outstanding up to ``top`` is acked -> one frame.
                self._channel.basic_ack(delivery_tag=top, multiple=True)
            else:
                for t in sorted(valid):
                    self._channel.basic_ack(delivery_tag=t, multiple=False)
        except Exception as exc:  # the channel died meanwhile; the broker will redeliver
            _log.debug("%s: ack dropped: %s", self._name, type(exc).__name__)
        outstanding.difference_update(valid)

    def _do_reject(self, tag: DeliveryTag, requeue: bool) -> None:
        valid = self._valid([tag])
        if not valid:
            return
        try:
            self._channel.basic_reject(delivery_tag=tag.delivery_tag, requeue=requeue)
        except Exception as exc:
            _log.debug("%s: reject dropped: %s", self._name, type(exc).__name__)
        self._outstanding.discard(tag.delivery_tag)

    def _on_setup(self, channel: Any) -> None:
        channel.basic_qos(prefetch_count=self._prefetch, callback=self._on_qos_ok)

    def _on_qos_ok(self, _frame: Any) -> None:
        channel = self._channel
        if channel is None:
            return
        channel.add_on_cancel_callback(self._on_broker_cancel)
        self._outstanding = set()
        self._consumer_tag = channel.basic_consume(self.queue, self._on_message, auto_ack=False)
        self._consuming = True
        self._setup_done()
        _log.info("%s: consuming %s (prefetch %d)", self._name, self.queue, self._prefetch)

    def _on_message(self, _channel: Any, method: Any, properties: Any, body: bytes) -> None:
        tag = method.delivery_tag
        self._outstanding.add(tag)
        headers = properties.headers
        self._deliveries.put(
            Delivery(
                body,
                method.routing_key,
                properties.message_id or "",
                _plain(headers) if headers else {},
                method.redelivered,
                DeliveryTag(self._owner, self._generation, tag),
                properties.content_type or "",
            )
        )

    def _on_broker_cancel(self, _frame: Any) -> None:
        # The broker cancelled us (queue deleted, leader moved): close the channel so the normal
        # recovery path opens a new one, re-declares and subscribes again.
        _log.warning("%s: consumer cancelled by the broker; re-subscribing", self._name)
        channel = self._channel
        if channel is not None and channel.is_open:
            channel.close()

    def _on_lost(self) -> None:
        self._consuming = False
        self._consumer_tag = None
        self._outstanding = set()
        # A new generation: deliveries still in the local queue belong to a dead channel.
        self._generation += 1

    def _on_shutdown(self) -> bool:
        channel, tag = self._channel, self._consumer_tag
        if self._consuming and channel is not None and channel.is_open and tag:
            self._consuming = False
            # Cancel first so no new deliveries arrive, then close; unacked ones are requeued.
            channel.basic_cancel(tag, callback=lambda _frame: self._close_connection())
            self._ioloop.call_later(1.0, self._close_connection)
            return True
        return False

    def _on_stopped(self) -> None:
        self._deliveries.put(_CLOSED)


def _new_queue() -> queue.SimpleQueue[Any]:
    return queue.SimpleQueue()
