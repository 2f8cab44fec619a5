"""Consuming an existing legacy queue on any AMQP 0-9-1 broker (``adapter: amqp``).

The source has its own connection settings, separate from the gateway's broker, and leaves the
legacy topology alone unless ``declare`` says otherwise. Each poll takes up to ``batch_size``
deliveries (manual acks, QoS ``prefetch``), decodes every message with the configured codec (one
message may carry several records) and returns them as one batch. The deliveries are acked only in
:meth:`AmqpSource.committed`, which the source runner calls **after** the batch's events (and dead
letters) are committed to the outbox. A crash in between redelivers the messages; their event ids
derive from the message id (or the body's hash) and the record's index, so the redelivery is
harmless.

A message that cannot be decoded, or that the broker has delivered more than ``delivery_limit``
times, becomes a dead letter with its raw body, headers and error, in the same transaction, and is
then acked: there is never a hot requeue loop. The consumer reconnects with jittered backoff by
itself after a broker restart and resumes consuming.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pika
import pika.exceptions
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from adapters.base import Batch, PollingSource, Record, Reject, SourceConfig
from gateway.bus.errors import classify_pika_error
from gateway.bus.pika_consumer import PikaConsumer
from gateway.bus.pika_params import connection_parameters, redact
from gateway.bus.protocols import Delivery
from gateway.bus.topology import DeclaredTopology, QueueSpec
from gateway.codecs import Codec, DecodeError, codec_from_config
from gateway.config import BusSettings
from gateway.errors import ConfigurationError, GatewayError

__all__ = ["AmqpSource", "AmqpSourceConfig", "Declare"]

log = logging.getLogger("gateway.sources.amqp")


class Declare(BaseModel):
    """Legacy topology to declare on connect (default: declare nothing, the queue must exist)."""

    model_config = ConfigDict(extra="forbid")

    durable: bool = Field(True, description="Declare the queue durable.")
    arguments: dict[str, Any] = Field(default_factory=dict, description="Queue arguments, e.g. {x-queue-type: quorum}.")
    exchange: str | None = Field(None, description="Exchange to declare and bind the queue to.")
    exchange_type: Literal["direct", "topic", "fanout", "headers"] = Field("direct", description="Type of that exchange.")
    routing_keys: list[str] = Field(default_factory=lambda: [""], description="Binding keys of the queue to the exchange.")


class AmqpSourceConfig(SourceConfig):
    """Settings of the ``amqp`` adapter (a legacy queue)."""

    url: SecretStr = Field(..., description="AMQP URL of the LEGACY broker (not the gateway's); use ${ENV} for the password.")
    queue: str = Field(..., min_length=1, max_length=255, description="Legacy queue to consume.")
    declare: Declare | None = Field(None, description="Declare the queue (and an exchange/binding); default: leave the legacy topology alone.")
    prefetch: int = Field(500, ge=1, le=65535, description="QoS prefetch: unacked deliveries the broker sends ahead.")
    codec: dict[str, Any] = Field(
        default_factory=lambda: {"format": "json"},
        description="How message bodies decode into records: {format: json|xml|csv|fixed, ...} (see docs/codecs.md).",
    )
    codecs_by_content_type: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Codecs chosen by the message's content_type (a queue carrying mixed formats), e.g. "
        "{text/csv: {format: csv, header: true}}; other messages use codec.",
    )
    delivery_limit: int = Field(
        5, ge=1, le=1000,
        description="Deliveries of one message after which it goes to dead letters instead of being processed again "
        "(x-delivery-count on quorum queues; counted by the gateway otherwise).",
    )
    max_wait: float = Field(1.0, gt=0, le=60, description="Longest wait in one poll for a first message (seconds).")
    linger: float = Field(0.05, ge=0, le=5, description="Wait after the first message to fill the batch (seconds).")
    heartbeat: int = Field(30, ge=0, le=600, description="AMQP heartbeat in seconds.")
    socket_timeout: float = Field(10.0, gt=0, le=300, description="TCP connect/socket timeout in seconds.")
    blocked_connection_timeout: float = Field(60.0, gt=0, description="Seconds a broker-blocked connection is tolerated.")
    reconnect_max_delay: float = Field(30.0, gt=0, le=600, description="Cap of the jittered reconnect backoff (seconds).")

    @field_validator("url")
    @classmethod
    def _amqp_url(cls, v: SecretStr) -> SecretStr:
        url = v.get_secret_value()
        scheme = url.split(":", 1)[0].lower()
        if scheme not in ("amqp", "amqps"):
            raise ValueError(f"expected an amqp:// or amqps:// URL, got scheme {scheme!r}")
        try:
            pika.URLParameters(url)  # a bad port or query parameter is a configuration error now, not at connect
        except Exception as exc:  # noqa: BLE001 -- pika raises ValueError/TypeError naming the URL part
            raise ValueError(f"not a valid AMQP URL: {redact(str(exc), BusSettings(url=v))}") from None
        return v

    @field_validator("codec")
    @classmethod
    def _codec(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            codec_from_config(v)  # validates now: a bad codec is a configuration error at start
        except ConfigurationError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("codecs_by_content_type")
    @classmethod
    def _codecs(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for ctype, raw in v.items():
            try:
                codec_from_config(raw)
            except (ValueError, ConfigurationError) as exc:
                raise ValueError(f"codecs_by_content_type[{ctype!r}]: {exc}") from None
        return {k.split(";", 1)[0].strip().lower(): raw for k, raw in v.items()}

    def bus_settings(self) -> BusSettings:
        """The connection settings in the form the gateway's pika clients take."""
        return BusSettings(
            url=self.url, heartbeat=self.heartbeat, socket_timeout=self.socket_timeout,
            blocked_connection_timeout=self.blocked_connection_timeout, reconnect_max_delay=self.reconnect_max_delay,
        )


def _topology(cfg: AmqpSourceConfig) -> DeclaredTopology:
    d = cfg.declare
    if d is None:
        return DeclaredTopology()
    bindings = tuple((d.exchange, key) for key in d.routing_keys) if d.exchange else ()
    return DeclaredTopology(
        ((d.exchange, d.exchange_type),) if d.exchange else (),
        (QueueSpec(cfg.queue, dict(d.arguments), bindings),),
    )


def message_key(delivery: Delivery) -> str:
    """The message's identity: its ``message_id``, else ``sha256:`` of its body (deterministic)."""
    return delivery.message_id or "sha256:" + hashlib.sha256(delivery.body).hexdigest()


def _headers(delivery: Delivery) -> dict[str, Any]:
    return {str(k): (base64.b64encode(v).decode() if isinstance(v, bytes) else v) for k, v in delivery.headers.items()}


class AmqpSource(PollingSource[AmqpSourceConfig]):
    """Consumes one legacy queue; acks only after the batch is committed to the outbox."""

    kind = "amqp"
    config_model = AmqpSourceConfig
    dry_run_redelivers = True  # a dry run takes messages and requeues them: quorum queues count it

    def __init__(self, config: AmqpSourceConfig, *, source_name: str) -> None:
        super().__init__(config, source_name=source_name)
        self.codec: Codec = codec_from_config(config.codec)
        self.codecs: dict[str, Codec] = {k: codec_from_config(v) for k, v in config.codecs_by_content_type.items()}
        self._consumer: PikaConsumer | None = None
        #: Deliveries seen redelivered by this process, by message key (classic queues report no count).
        self._seen: dict[str, int] = {}

    # ---------------------------------------------------------------- lifecycle
    def open(self) -> None:
        """Check the queue (unless declared), then start consuming on an own connection and I/O thread."""
        if self._consumer is not None:
            return
        cfg = self.config
        bus = cfg.bus_settings()
        if cfg.declare is None:
            self._check_queue(bus)
        consumer = PikaConsumer(bus, _topology(cfg), cfg.queue, cfg.prefetch, f"gateway-source-{self.source_name}")  # type: ignore[arg-type]
        consumer.start(wait=cfg.socket_timeout + 5.0)  # never raises: the consumer reconnects by itself
        self._consumer = consumer

    def _check_queue(self, bus: BusSettings) -> None:
        """A passive declare: a missing legacy queue is a configuration error, not a retry loop."""
        params = connection_parameters(bus, f"gateway-source-{self.source_name}-check")
        try:
            conn = pika.BlockingConnection(params)
        except pika.exceptions.AMQPError as exc:
            raise self.classify_error(exc) from None
        try:
            ch = conn.channel()
            ch.queue_declare(self.config.queue, passive=True)
        except pika.exceptions.AMQPError as exc:
            raise self.classify_error(exc) from None  # 404: the queue is missing (ConfigurationError)
        finally:
            if conn.is_open:
                conn.close()

    def close(self) -> None:
        """Stop consuming; unacked deliveries go back to the queue (the broker redelivers them)."""
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def check(self) -> None:
        """Connectivity check: the legacy broker answers and the queue exists (or will be declared)."""
        if self.config.declare is None:
            self._check_queue(self.config.bus_settings())

    # ---------------------------------------------------------------- reading
    def fetch(self, cursor: Any, limit: int) -> Batch:
        """Take up to ``limit`` deliveries and decode them; nothing is acked here."""
        self.open()
        assert self._consumer is not None
        cfg = self.config
        deliveries = self._consumer.get_batch(min(limit, cfg.prefetch), cfg.max_wait, cfg.linger)
        records: list[Record] = []
        rejects: list[Reject] = []
        for d in deliveries:
            key = message_key(d)
            position = {"queue": cfg.queue, "message_id": key}
            attempts = self._attempts(d, key)
            if attempts > cfg.delivery_limit:
                rejects.append(self._reject(
                    d, position, "DeliveryLimitExceeded",
                    f"source {self.source_name!r}: message {key} delivered {attempts} times "
                    f"(delivery_limit {cfg.delivery_limit}); not processed again", attempts,
                ))
                continue
            codec = self.codecs.get((d.content_type or "").split(";", 1)[0].strip().lower(), self.codec)
            try:
                decoded = codec.decode(d.body, content_type=d.content_type)
            except DecodeError as exc:
                rejects.append(self._reject(d, position, type(exc).__name__, f"source {self.source_name!r}: {exc}", attempts))
                continue
            for i, data in enumerate(decoded):
                records.append(Record(data={**data, "_message_id": key, "_record": i}, position={**position, "record": i}))
        return Batch(records=records, cursor=None, has_more=len(deliveries) >= min(limit, cfg.prefetch),
                     rejects=rejects, token=deliveries)

    def _attempts(self, d: Delivery, key: str) -> int:
        """This delivery's number (1 = first): the broker's count, or the gateway's own for redeliveries."""
        if "x-delivery-count" in d.headers:
            return d.delivery_count + 1
        if not d.redelivered:
            return 1
        n = self._seen.get(key, 1) + 1
        self._seen[key] = n
        if len(self._seen) > 100_000:  # bounded: the oldest counts go first
            for old in list(self._seen)[:10_000]:
                del self._seen[old]
        return n

    def _reject(self, d: Delivery, position: Mapping[str, Any], error_class: str, reason: str, attempts: int) -> Reject:
        return Reject(
            payload=d.body,
            headers={**_headers(d), "message_id": d.message_id, "content_type": d.content_type,
                     "routing_key": d.routing_key, "redelivered": d.redelivered},
            error_class=error_class, reason=reason, position=dict(position), attempts=attempts,
        )

    def committed(self, batch: Batch) -> None:
        """Ack the batch's deliveries: its events and dead letters are in the outbox now."""
        deliveries: Sequence[Delivery] = batch.token or ()
        if deliveries and self._consumer is not None:
            self._consumer.ack(deliveries)
            for d in deliveries:
                self._seen.pop(message_key(d), None)

    def released(self, batch: Batch) -> None:
        """The batch could not be committed: requeue its deliveries for a later attempt."""
        if self._consumer is not None:
            for d in batch.token or ():
                self._consumer.reject(d, requeue=True)

    # ---------------------------------------------------------------- errors
    def classify_error(self, exc: BaseException) -> GatewayError:
        """pika errors as :func:`~gateway.bus.errors.classify_pika_error` maps them.

        Connection problems are transient; refused credentials, a bad vhost and a missing queue
        (a passive declare answered 404) are configuration errors.
        """
        if isinstance(exc, GatewayError):
            return exc
        if isinstance(exc, pika.exceptions.ChannelClosedByBroker) and exc.reply_code == 404:
            return ConfigurationError(
                f"source {self.source_name!r}: config.queue: queue {self.config.queue!r} does not exist on the "
                "legacy broker (create it there, or set config.declare to let the gateway declare it)"
            )
        if isinstance(exc, pika.exceptions.AMQPError | OSError):
            return classify_pika_error(exc, f"source {self.source_name!r}: legacy broker")
        return super().classify_error(exc)
