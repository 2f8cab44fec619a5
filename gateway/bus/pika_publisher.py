"""Publisher with confirms in flight on a pika ``SelectConnection`` (REL-01, REL-09, REL-10).

Threading: every pika call happens on the publisher's I/O thread. :meth:`PikaPublisher.publish`
only appends the batch to a hand-over list under a lock and wakes the I/O thread with
``add_callback_threadsafe``; futures are resolved on the I/O thread (so a future's
``add_done_callback`` runs there and must not block).

Confirm bookkeeping: delivery tags count from 1 per channel (after ``Confirm.Select``);
``_inflight`` maps tag -> (batch, index) for at most ``confirm_window`` messages. ``basic.return``
(unroutable, ``mandatory``) arrives *before* the ``basic.ack`` of the same message, so a returned
message is marked RETURNED and the later ack does not overwrite it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from functools import partial
from typing import Any

from pika import BasicProperties
from pika.spec import Basic

from gateway.bus.pika_params import IOThreadClient
from gateway.bus.protocols import Message, Outcome
from gateway.bus.topology import Topology
from gateway.config import BusSettings

__all__ = ["PikaPublisher"]

_log = logging.getLogger(__name__)
_ACK, _NACK, _LOST, _TIMEOUT, _RETURNED = Outcome.ACK, Outcome.NACK, Outcome.LOST, Outcome.TIMEOUT, Outcome.RETURNED


class _Batch:
    """One ``publish`` call: its messages, outcomes and future (I/O thread after hand-over)."""

    __slots__ = ("future", "exchange", "messages", "outcomes", "unresolved", "sent", "tags", "timer", "done")

    def __init__(self, exchange: str, messages: list[Message], future: Future[list[Outcome]]) -> None:
        self.future = future
        self.exchange = exchange
        self.messages = messages
        self.outcomes: list[Outcome | None] = [None] * len(messages)
        self.unresolved = len(messages)
        self.sent = 0
        self.tags: list[int] = []
        self.timer: Any = None
        self.done = False


class PikaPublisher(IOThreadClient):
    """Publishes with confirms, ``mandatory`` and persistent delivery; shareable by threads.

    Args:
        settings: bus settings (URL, ``confirm_window``, ``publish_timeout``, timeouts, backoff cap).
        topology: declared on every (re)connect before publishing resumes.
        name: the connection name shown by the broker.
        thread_guard: wrap pika objects in a thread-ownership guard (default: env
            ``GATEWAY_PIKA_THREAD_GUARD``).
    """

    def __init__(
        self,
        settings: BusSettings,
        topology: Topology,
        name: str = "gateway-publisher",
        *,
        thread_guard: bool | None = None,
    ) -> None:
        super().__init__(settings, topology, name, thread_guard=thread_guard)
        self._window = settings.confirm_window
        self._timeout = settings.publish_timeout
        self._handoff: list[_Batch] = []  # any thread, under _lock
        self._wakeup_pending = False  # under _lock
        # I/O thread only:
        self._pending: deque[_Batch] = deque()  # batches with unsent messages, in order
        self._inflight: dict[int, tuple[_Batch, int]] = {}
        self._next_tag = 1
        self._low = 1  # lowest tag that may still be unconfirmed (for multiple=True)
        self._confirming = False
        self._blocked = False

    # -- any thread
    @property
    def blocked(self) -> bool:
        """Whether the broker blocked this connection (resource alarm); publishing is on hold."""
        return self._blocked

    def publish(self, exchange: str, messages: Sequence[Message]) -> Future[list[Outcome]]:
        """Publish ``messages`` in order to ``exchange``.

        Returns:
            A future with one :class:`Outcome` per message: ``ACK`` only after the broker's
            confirm; ``NACK``, ``RETURNED`` (unroutable), ``TIMEOUT`` (no confirm within
            ``publish_timeout``) or ``LOST`` (connection/channel lost, or publisher closed).
            While reconnecting, a batch waits for the new channel, bounded by the timeout.
        """
        future: Future[list[Outcome]] = Future()
        msgs = list(messages)
        if not msgs:
            future.set_result([])
            return future
        batch = _Batch(exchange, msgs, future)
        with self._lock:
            if self._closed:
                future.set_result([_LOST] * len(msgs))
                return future
            self._handoff.append(batch)
            if not self._wakeup_pending:
                self._wakeup_pending = True
                # Only this thread-safe call crosses threads; pika itself is touched on the I/O thread.
                self._ioloop.add_callback_threadsafe(self._drain)
        return future

    def close(self) -> None:
        """Close the connection cleanly; unresolved futures resolve ``LOST``. Idempotent."""
        self._stop(timeout=max(5.0, self._settings.socket_timeout))
        self._sweep_handoff()

    # -- I/O thread
    def _drain(self) -> None:
        with self._lock:
            batches, self._handoff = self._handoff, []
            self._wakeup_pending = False
        call_later, timeout = self._ioloop.call_later, self._timeout
        for batch in batches:
            batch.timer = call_later(timeout, partial(self._on_batch_timeout, batch))
            self._pending.append(batch)
        self._pump()

    def _pump(self) -> None:
        """Send queued messages while the channel is ready, not blocked and the window has room."""
        if not self._confirming or self._blocked or not self._pending:
            return
        publish = self._channel.basic_publish
        pending, inflight, window = self._pending, self._inflight, self._window
        tag = self._next_tag
        try:
            while pending and len(inflight) < window:
                batch = pending[0]
                if batch.done:
                    pending.popleft()
                    continue
                exchange, messages, tags = batch.exchange, batch.messages, batch.tags
                i, n = batch.sent, len(messages)
                while i < n and len(inflight) < window:
                    m = messages[i]
                    props = BasicProperties(
                        content_type=m.content_type, delivery_mode=2, message_id=m.message_id,
                        headers=m.headers or None,
                        expiration=str(m.expiration_ms) if m.expiration_ms is not None else None,
                    )
                    publish(exchange, m.routing_key, m.body, props, True)
                    inflight[tag] = (batch, i)
                    tags.append(tag)
                    tag += 1
                    i += 1
                batch.sent = i
                if i == n:
                    pending.popleft()
        except Exception as exc:  # channel closed under us; its close callback fails the in-flight
            _log.warning("%s: publish failed: %s", self._name, type(exc).__name__)
        finally:
            self._next_tag = tag

    def _on_connection_hooks(self, connection: Any) -> None:
        self._blocked = False
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)

    def _on_blocked(self, _conn: Any, _frame: Any) -> None:
        _log.warning("%s: connection blocked by the broker; holding publishes", self._name)
        self._blocked = True

    def _on_unblocked(self, _conn: Any, _frame: Any) -> None:
        _log.info("%s: connection unblocked", self._name)
        self._blocked = False
        self._pump()

    def _on_channel_hooks(self, channel: Any) -> None:
        channel.add_on_return_callback(self._on_return)

    def _on_setup(self, channel: Any) -> None:
        channel.confirm_delivery(self._on_confirm, callback=self._on_confirm_select_ok)

    def _on_confirm_select_ok(self, _frame: Any) -> None:
        self._next_tag = 1
        self._low = 1
        self._confirming = True
        self._setup_done()
        self._pump()

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        outcome = _ACK if isinstance(method, Basic.Ack) else _NACK
        tag = method.delivery_tag
        inflight = self._inflight
        if method.multiple:
            for t in range(self._low, tag + 1):
                slot = inflight.pop(t, None)
                if slot is not None:
                    self._settle(slot[0], slot[1], outcome)
            if tag >= self._low:
                self._low = tag + 1
        else:
            slot = inflight.pop(tag, None)
            if slot is not None:
                self._settle(slot[0], slot[1], outcome)
        self._pump()

    def _settle(self, batch: _Batch, index: int, outcome: Outcome) -> None:
        if batch.done:
            return
        if batch.outcomes[index] is None:  # a RETURNED mark stays (the ack follows the return)
            batch.outcomes[index] = outcome
        batch.unresolved -= 1
        if batch.unresolved == 0:
            self._finish(batch)

    def _on_return(self, _channel: Any, method: Any, properties: Any, _body: bytes) -> None:
        # basic.return carries no delivery tag: match the oldest unconfirmed message with the
        # same exchange, routing key and message id. Returns are rare, so a scan is fine.
        message_id = properties.message_id
        for batch, index in self._inflight.values():
            if batch.outcomes[index] is not None or batch.exchange != method.exchange:
                continue
            m = batch.messages[index]
            if m.routing_key == method.routing_key and m.message_id == message_id:
                batch.outcomes[index] = _RETURNED
                return
        _log.warning("%s: unmatched basic.return for %r", self._name, method.routing_key)

    def _on_batch_timeout(self, batch: _Batch) -> None:
        if batch.done:
            return
        for tag in batch.tags:
            self._inflight.pop(tag, None)
        # Sent but unconfirmed: TIMEOUT. Never sent: LOST if we have no channel, else TIMEOUT.
        unsent = _TIMEOUT if self._confirming else _LOST
        outcomes = batch.outcomes
        for i in range(len(outcomes)):
            if outcomes[i] is None:
                outcomes[i] = _TIMEOUT if i < batch.sent else unsent
        self._finish(batch)
        self._pump()

    def _finish(self, batch: _Batch) -> None:
        batch.done = True
        if batch.timer is not None:
            self._ioloop.remove_timeout(batch.timer)
            batch.timer = None
        if not batch.future.done():
            batch.future.set_result(list(batch.outcomes))  # type: ignore[arg-type]

    def _fail(self, batch: _Batch) -> None:
        if batch.done:
            return
        batch.outcomes = [o if o is not None else _LOST for o in batch.outcomes]
        self._finish(batch)

    def _on_lost(self) -> None:
        """Channel/connection gone: every unconfirmed message of started batches is LOST."""
        self._confirming = False
        started = {id(b): b for b, _ in self._inflight.values()}
        self._inflight.clear()
        if self._pending and self._pending[0].sent:
            head = self._pending.popleft()
            started[id(head)] = head
        for batch in started.values():
            self._fail(batch)
        self._next_tag = self._low = 1
        if self._closing:
            while self._pending:
                self._fail(self._pending.popleft())

    def _on_shutdown(self) -> bool:
        self._on_lost()
        self._drain_to_lost()
        return False

    def _drain_to_lost(self) -> None:
        while self._pending:
            self._fail(self._pending.popleft())

    def _on_stopped(self) -> None:
        self._drain_to_lost()
        for batch, _ in list(self._inflight.values()):
            self._fail(batch)
        self._inflight.clear()
        self._sweep_handoff()

    # -- any thread
    def _sweep_handoff(self) -> None:
        with self._lock:
            if not self._closed:
                return
            batches, self._handoff = self._handoff, []
        for batch in batches:
            if not batch.future.done():
                batch.future.set_result([_LOST] * len(batch.messages))
