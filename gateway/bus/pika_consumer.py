"""Consumer with prefetch and manual acks on a pika ``SelectConnection`` (REL-06, REL-07, REL-10).

Threading: the I/O thread receives deliveries and puts them in a ``queue.SimpleQueue``; worker
threads take micro-batches with :meth:`PikaConsumer.get_batch`. ``ack``/``reject`` from any thread
are handed to the I/O thread with ``add_callback_threadsafe``, because a pika channel must only
be used by the thread running its connection's I/O loop.

Recovery: after a connection or channel loss the consumer reconnects with jittered backoff,
re-declares the topology, re-sets QoS and subscribes again (unless it is paused). Each channel is
a new *generation*: a :class:`DeliveryTag` carries it, so acks for deliveries of a dead channel
are dropped (the broker redelivers those messages) instead of acking an unrelated message on the
new channel.

Pause/resume (backpressure): :meth:`PikaConsumer.pause` cancels the subscription and gives the
deliveries received but not handed out yet back to the broker; deliveries already handed out stay
valid. Which of the two a delivery is gets decided under one lock (``_hand``): ``get_batch``
hands out only tags still in ``_queued``, and ``pause`` moves every tag of ``_queued`` to
``_returns`` for the I/O thread to reject with ``requeue=True``.

Watchdog: every ``watchdog_interval`` s the I/O thread checks for "connected but not consuming"
(see :meth:`PikaConsumer._watchdog_tick`) and re-subscribes through the normal recovery path.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
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
#: Consecutive suspicious watchdog checks before the consumer is re-subscribed. Two, so a message
#: published just before a check (still in flight to us) is never mistaken for a dead consumer.
_WATCHDOG_STRIKES = 2


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


def _ignore(_frame: Any) -> None:
    """RPC completion callback for replies we do not need (it makes pika wait for them)."""


class PikaConsumer(IOThreadClient):
    """Consumes one queue with ``basic_qos(prefetch)`` and manual acks, reconnecting by itself.

    Args:
        settings: bus settings (URL, timeouts, backoff cap, ``watchdog_interval``).
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
        _check_prefetch(prefetch)
        self.queue = queue
        self._owner = next(_owners)
        self._deliveries: queue.SimpleQueue[Any] = _new_queue()
        # Under _hand (any thread): the hand-out decision, the desired state and the generation.
        self._hand = threading.Lock()
        self._generation = 1  # bumped on the I/O thread; read by get_batch
        self._queued: set[int] = set()  # received on this generation, not handed out yet
        self._returns: list[int] = []  # taken back by pause(): to reject(requeue) on the I/O thread
        self._paused = False  # desired: no subscription
        self._want_prefetch = prefetch  # desired prefetch
        self._close_requested = False
        # I/O thread only:
        self._outstanding: set[int] = set()  # unacked tags of this generation (queued or handed out)
        self._consumer_tag: str | None = None
        self._consuming = False
        self._qos_prefetch: int | None = None  # prefetch the current subscription was started with
        self._delivered = 0  # deliveries received so far (watchdog progress counter)
        self._last_delivery: float | None = None  # monotonic time of the last delivery
        self._down_since: float | None = time.monotonic()
        self._watchdog_armed = False
        self._watchdog_seen = 0
        self._watchdog_strikes = 0
        self.watchdog_resubscribes = 0  #: re-subscriptions forced by the liveness watchdog

    # -- any thread
    @property
    def paused(self) -> bool:
        """Whether :meth:`pause` is in effect (the subscription is, or is being, cancelled)."""
        return self._paused

    @property
    def close_requested(self) -> bool:
        """Whether :meth:`close` was called (a consumer closed on purpose is not "down")."""
        return self._close_requested

    @property
    def prefetch(self) -> int:
        """The prefetch asked for (the last :meth:`resume` value, else the constructor's)."""
        return self._want_prefetch

    def get_batch(self, max_messages: int, max_wait: float, linger: float) -> list[Delivery]:
        """Wait up to ``max_wait`` s for a first delivery, then up to ``linger`` s to fill the batch.

        Deliveries of a channel that has since died are skipped: the broker redelivers them.
        Deliveries given back by :meth:`pause` are skipped too; while paused this waits
        ``max_wait`` s and returns an empty batch.
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
            tag = item.tag
            with self._hand:
                # Hand out only what pause() has not taken back and what lives on this channel.
                if tag.generation != self._generation or tag.delivery_tag not in self._queued:
                    continue
                self._queued.discard(tag.delivery_tag)
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

    def pause(self) -> None:
        """Cancel the subscription until :meth:`resume`; thread-safe, idempotent, non-blocking.

        On return, ``get_batch`` no longer hands out anything received before; those deliveries
        go back to the queue (``basic.reject`` with ``requeue=True``, right after the
        ``basic.cancel``). Deliveries already handed out stay valid for ``ack``/``reject``. The
        broker sees no consumer shortly after (one I/O-loop turn plus a round trip). The pause
        survives reconnects: recovery re-declares and re-sets QoS but does not subscribe.

        On RabbitMQ 3.x quorum queues a requeue counts towards ``x-delivery-limit``, so each
        pause costs the (at most ``prefetch``) locally buffered messages one delivery attempt.
        """
        with self._hand:
            self._paused = True
            self._returns.extend(self._queued)
            self._queued.clear()
        self.call_threadsafe(self._reconcile)

    def resume(self, prefetch: int | None = None) -> None:
        """Subscribe again, with at most ``prefetch`` unacked deliveries (default: unchanged).

        Thread-safe, idempotent and non-blocking: the I/O thread applies it within one loop turn.
        A changed prefetch is set with ``basic.qos``; since RabbitMQ applies a per-consumer
        prefetch only to consumers started after it, a running subscription is cancelled and
        started again (deliveries already received stay valid; until they are acked they count
        on top of the new limit).

        Raises:
            ValueError: when ``prefetch`` is not within 1..65535.
        """
        if prefetch is not None:
            _check_prefetch(prefetch)
        with self._hand:
            self._paused = False
            if prefetch is not None:
                self._want_prefetch = prefetch
        self.call_threadsafe(self._reconcile)

    def liveness(self) -> tuple[bool, str]:
        """Whether this consumer is alive, for readiness, and a one-line detail.

        Alive: set up and consuming (or deliberately paused), or reconnecting for less than the
        grace of one connection attempt plus the backoff cap. Not alive: closed, or down longer.
        The watchdog repairs "connected but not consuming" by itself, so it does not count here.
        """
        now = time.monotonic()
        if self._close_requested or self._closed:
            return False, f"{self.queue}: closed"
        resubs = f"{max(0, self.connects - 1)} reconnects, {self.watchdog_resubscribes} watchdog re-subscribes"
        if not self.ready:
            since = self._down_since
            down = now - since if since is not None else 0.0
            grace = self._settings.socket_timeout + 5.0 + self._settings.reconnect_max_delay
            error = f"; last error: {self.last_error}" if self.last_error else ""
            return down < grace, f"{self.queue}: disconnected for {down:.1f} s, {resubs}{error}"
        if self._paused:
            state = "paused"
        elif self._consuming:
            state = f"consuming (prefetch {self._qos_prefetch})"
        else:
            state = "subscribing"
        last = self._last_delivery
        age = "no delivery yet" if last is None else f"last delivery {now - last:.1f} s ago"
        return True, f"{self.queue}: {state}, {age}, {resubs}"

    def close(self) -> None:
        """Cancel the subscription and close the connection; unacked deliveries return to the queue."""
        self._close_requested = True
        self._stop(timeout=max(5.0, self._settings.socket_timeout))
        self._deliveries.put(_CLOSED)

    # -- I/O thread
    def _valid(self, tags: Sequence[DeliveryTag]) -> set[int]:
        # Not tied to _consuming: deliveries handed out before a pause stay ackable.
        if self._channel is None:
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
        prefetch = self._want_prefetch
        channel.basic_qos(prefetch_count=prefetch, callback=lambda _frame: self._on_qos_ok(prefetch))

    def _on_qos_ok(self, prefetch: int) -> None:
        channel = self._channel
        if channel is None:
            return
        channel.add_on_cancel_callback(self._on_broker_cancel)
        self._outstanding = set()
        self._qos_prefetch = prefetch
        self._down_since = None
        self._setup_done()
        if not self._watchdog_armed:
            self._watchdog_armed = True
            self._arm_watchdog()
        self._reconcile()  # subscribe, unless paused (a pause survives reconnects)

    def _reconcile(self) -> None:
        """Bring the subscription in line with the desired state (paused, prefetch). Idempotent."""
        channel = self._channel
        with self._hand:
            returns, self._returns = self._returns, []
            paused, prefetch = self._paused, self._want_prefetch
        if channel is None or self._closing or not self._ready.is_set():
            return  # no channel: returns died with it; the next set-up reads the desired state
        try:
            if paused:
                # Cancel *before* rejecting: a requeue while still subscribed could come straight back.
                if self._consumer_tag is not None:
                    channel.basic_cancel(self._consumer_tag, callback=_ignore)
                    self._consumer_tag = None
                    self._consuming = False
                    _log.info("%s: paused consuming %s", self._name, self.queue)
                self._give_back(channel, returns)
                return
            self._give_back(channel, returns)
            if self._qos_prefetch != prefetch:
                channel.basic_qos(prefetch_count=prefetch, callback=_ignore)
                self._qos_prefetch = prefetch
                if self._consumer_tag is not None:
                    # RabbitMQ applies a per-consumer prefetch only to consumers started after the
                    # basic.qos (checked on 3.10): start the subscription again. Deliveries of the
                    # old subscription stay valid (same channel); pika rejects any still in flight.
                    channel.basic_cancel(self._consumer_tag, callback=_ignore)
                    self._consumer_tag = None
                    self._consuming = False
            if self._consumer_tag is None:
                self._consumer_tag = channel.basic_consume(self.queue, self._on_message, auto_ack=False)
                self._consuming = True
                _log.info("%s: consuming %s (prefetch %d)", self._name, self.queue, prefetch)
        except Exception as exc:  # noqa: BLE001 - the channel died under us; recovery reads the desired state
            _log.debug("%s: reconcile interrupted: %s", self._name, type(exc).__name__)

    def _give_back(self, channel: Any, tags: Sequence[int]) -> None:
        outstanding = self._outstanding
        for tag in sorted(tags):
            if tag in outstanding:
                channel.basic_reject(delivery_tag=tag, requeue=True)
                outstanding.discard(tag)

    def _on_message(self, _channel: Any, method: Any, properties: Any, body: bytes) -> None:
        tag = method.delivery_tag
        self._outstanding.add(tag)
        self._delivered += 1
        self._last_delivery = time.monotonic()
        with self._hand:
            paused = self._paused
            if paused:
                self._returns.append(tag)  # arrived after pause(): straight back
            else:
                self._queued.add(tag)
            generation = self._generation
        if paused:
            self._reconcile()
            return
        headers = properties.headers
        self._deliveries.put(
            Delivery(
                body,
                method.routing_key,
                properties.message_id or "",
                _plain(headers) if headers else {},
                method.redelivered,
                DeliveryTag(self._owner, generation, tag),
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

    def _arm_watchdog(self) -> None:
        interval = self._settings.watchdog_interval
        if interval > 0 and not self._closing:
            self._ioloop.call_later(interval, self._watchdog_tick)

    def _watchdog_tick(self) -> None:
        """Detect "connected but not consuming" and re-subscribe (I/O thread, every interval).

        Suspicious: the consumer should consume (not paused, not closing), holds nothing unacked
        (a slow handler sitting on a full prefetch is busy, not dead), got no delivery since the
        last check, and a passive declare shows ready messages in its queue -- which the broker
        would have delivered to a live subscription with free prefetch. After
        ``_WATCHDOG_STRIKES`` such checks in a row the channel is closed, so recovery re-declares,
        re-sets QoS and subscribes again.
        """
        if self._closing:
            return
        self._arm_watchdog()
        seen, self._watchdog_seen = self._watchdog_seen, self._delivered
        channel = self._channel
        if not self._suspect(seen) or channel is None:
            self._watchdog_strikes = 0
            return
        try:
            channel.queue_declare(
                self.queue, passive=True, callback=lambda frame: self._on_watchdog_depth(channel, frame)
            )
        except Exception as exc:  # noqa: BLE001 - channel closing: recovery is on its way anyway
            _log.debug("%s: watchdog check skipped: %s", self._name, type(exc).__name__)

    def _suspect(self, seen_before: int) -> bool:
        return (
            self._ready.is_set() and self._consuming and not self._paused and not self._closing
            and not self._outstanding and self._delivered == seen_before
        )

    def _on_watchdog_depth(self, channel: Any, frame: Any) -> None:
        if channel is not self._channel:
            return  # answered on a channel that has since been replaced
        ready = int(frame.method.message_count)
        if ready == 0 or not self._suspect(self._watchdog_seen):
            self._watchdog_strikes = 0
            return
        self._watchdog_strikes += 1
        if self._watchdog_strikes < _WATCHDOG_STRIKES:
            return
        self._watchdog_strikes = 0
        self.watchdog_resubscribes += 1
        _log.warning(
            "%s: connected but not consuming: %d ready in %s, nothing unacked, no delivery for %d "
            "checks; re-subscribing", self._name, ready, self.queue, _WATCHDOG_STRIKES,
        )
        if channel.is_open:
            channel.close()  # the channel-close path re-declares, re-sets QoS and subscribes

    def _on_lost(self) -> None:
        self._consuming = False
        self._consumer_tag = None
        self._qos_prefetch = None
        self._outstanding = set()
        self._watchdog_strikes = 0
        if self._down_since is None:
            self._down_since = time.monotonic()
        with self._hand:
            # A new generation: deliveries still in the local queue belong to a dead channel.
            self._generation += 1
            self._queued.clear()
            self._returns.clear()

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


def _check_prefetch(prefetch: int) -> None:
    if not isinstance(prefetch, int) or isinstance(prefetch, bool) or not 1 <= prefetch <= 65535:
        raise ValueError(f"prefetch must be an int within 1..65535, got {prefetch!r}")


def _new_queue() -> queue.SimpleQueue[Any]:
    return queue.SimpleQueue()
