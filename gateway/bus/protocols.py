"""The bus interface shared by RabbitMQ (pika) and the in-process bus.

Delivery semantics are part of the contract:

* ``Publisher.publish`` resolves a message as ``ACK`` only after the broker confirmed it
  (publisher confirms, ``mandatory``, persistent). Anything else -- nack, return (unroutable),
  timeout, connection loss -- is not ``ACK``, and the caller must keep the message to retry.
* ``Consumer`` deliveries are acknowledged manually, only after the caller's side effects are
  committed. ``ack`` and ``reject`` are safe to call from any thread.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["PUBLISHED_AT_HEADER", "Message", "Outcome", "Delivery", "Publisher", "Consumer", "Bus", "BusHealth"]

#: Header the relay sets on every event it publishes: when (Unix ms, the relay's clock) the event
#: entered the bus. The scorer's deadline (``scoring.late_after``) counts from it.
PUBLISHED_AT_HEADER = "x-gw-published-at"


@dataclass(frozen=True, slots=True)
class Message:
    """One message to publish.

    Attributes:
        body: the payload (structured-mode CloudEvent JSON for gateway events).
        routing_key: routing key (the event type for events and scored events).
        message_id: AMQP ``message_id``; the event id, so consumers can de-duplicate.
        headers: AMQP headers (string keys; values str/int/float/bool).
        content_type: AMQP ``content_type``.
        expiration_ms: per-message TTL (AMQP ``expiration``) in ms; ``None``: none. Delayed retries
            use it: the message expires in its retry queue and is dead-lettered back.
    """

    body: bytes
    routing_key: str
    message_id: str
    headers: Mapping[str, Any] = field(default_factory=dict)
    content_type: str = "application/cloudevents+json"
    expiration_ms: int | None = None


class Outcome(enum.Enum):
    """The broker's verdict on one published message."""

    ACK = "ack"  #: confirmed: the broker took responsibility for it
    NACK = "nack"  #: refused (e.g. ``x-overflow=reject-publish`` on a full queue)
    RETURNED = "returned"  #: unroutable (``mandatory``): no queue bound for the routing key
    TIMEOUT = "timeout"  #: no confirm within the publish timeout
    LOST = "lost"  #: the connection or channel closed before the confirm


@dataclass(frozen=True, slots=True)
class Delivery:
    """One received message, to be acked or rejected through its consumer.

    Attributes:
        body: the payload.
        routing_key: the routing key it was published with.
        message_id: AMQP ``message_id`` (may be empty for foreign publishers).
        headers: AMQP headers, including ``x-delivery-count`` on quorum queues.
        redelivered: whether the broker delivered it before.
        tag: opaque handle for ``ack``/``reject``; valid only on the consumer that produced it.
        content_type: AMQP ``content_type`` (empty when the publisher set none).
    """

    body: bytes
    routing_key: str
    message_id: str
    headers: Mapping[str, Any]
    redelivered: bool
    tag: Any
    content_type: str = ""

    @property
    def delivery_count(self) -> int:
        """Earlier delivery attempts reported by the broker (0 on first delivery)."""
        value = self.headers.get("x-delivery-count", 0)
        return int(value) if isinstance(value, (int, str)) and str(value).isdigit() else 0


@runtime_checkable
class Publisher(Protocol):
    """Publishes with confirms; one publisher may be shared by threads."""

    def publish(self, exchange: str, messages: Sequence[Message]) -> Future[list[Outcome]]:
        """Publish ``messages`` in order; the future resolves with one outcome per message.

        It never resolves ``ACK`` for a message the broker has not confirmed.
        """
        ...

    def close(self) -> None:
        """Stop; unresolved futures resolve with ``LOST`` (or ``TIMEOUT``)."""
        ...


@runtime_checkable
class Consumer(Protocol):
    """Pulls micro-batches from one queue with manual acknowledgement."""

    def get_batch(self, max_messages: int, max_wait: float, linger: float) -> list[Delivery]:
        """Wait up to ``max_wait`` s for a first delivery, then up to ``linger`` s to fill the batch."""
        ...

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge ``deliveries`` (their side effects are committed). Thread-safe."""
        ...

    def reject(self, delivery: Delivery, requeue: bool) -> None:
        """Reject one delivery; ``requeue=False`` dead-letters it through the queue's DLX."""
        ...

    def pause(self) -> None:
        """Stop taking new deliveries (cancel the subscription) until :meth:`resume`.

        Deliveries already handed out stay valid: ack or reject them as usual. Deliveries the
        consumer received but ``get_batch`` has not handed out yet go back to the queue. Used for
        backpressure (an open circuit breaker on the model): the broker keeps the messages
        instead of the worker burning their attempts. Idempotent; thread-safe.
        """
        ...

    def resume(self, prefetch: int | None = None) -> None:
        """Take deliveries again, at most ``prefetch`` unacked at a time (default: unchanged).

        Also changes the prefetch of a running consumer (a gradual resume raises it step by
        step). Idempotent; thread-safe.
        """
        ...

    def close(self) -> None:
        """Stop consuming; unacked deliveries return to the queue."""
        ...


@dataclass(frozen=True, slots=True)
class BusHealth:
    """Readiness detail of the bus."""

    ok: bool
    kind: str
    detail: str = ""


@runtime_checkable
class Bus(Protocol):
    """A message bus: topology, publishers and consumers."""

    kind: str

    def declare_topology(self) -> None:
        """Declare exchanges, queues and bindings; raise ConfigurationError on a mismatch."""
        ...

    def publisher(self) -> Publisher:
        """A new publisher (its own connection on RabbitMQ)."""
        ...

    def consumer(self, queue: str, prefetch: int) -> Consumer:
        """A new consumer of ``queue`` (its own connection on RabbitMQ)."""
        ...

    def health(self) -> BusHealth:
        """Whether the broker is reachable."""
        ...

    def close(self) -> None:
        """Close everything this bus opened."""
        ...
