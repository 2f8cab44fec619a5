"""Bridging out: scored events back to a legacy queue, in a legacy format (the ``bridge`` role).

Each configured bridge consumes its own gateway queue (``<prefix>.bridge.<name>``, bound to the
scored exchange by the bridge's ``types``), turns every scored event into one legacy record by the
bridge's ``fields`` (dotted paths into the scored event), encodes it with the bridge's codec
(fixed-width EBCDIC, CSV, XML, JSON) and publishes it to the legacy broker with publisher
confirms. A delivery is acked on the gateway queue only after the legacy broker confirmed the
message, so a crash forwards it again; the legacy message's ``message_id`` is the scored event's
id, so legacy consumers can drop the duplicate.

A scored event that cannot be encoded (a field missing, a value too wide for its PIC) becomes a
dead letter (``stage: bridge``) and is acked. A publish the legacy broker does not confirm is
requeued; the gateway queue's delivery limit sends a message that never gets through to the
gateway's dead-letter queue.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

import orjson

from gateway.bus.protocols import Consumer, Delivery, Message, Outcome, Publisher
from gateway.codecs import Codec, CodecError, codec_from_config
from gateway.config import BridgeSettings
from gateway.store import EventStore

__all__ = ["Forwarder", "BridgeStats"]

log = logging.getLogger("gateway.bridge")

_MISSING = object()


class BridgeStats:
    """Counters of one bridge (read by status and metrics)."""

    def __init__(self) -> None:
        self.forwarded = 0
        self.filtered = 0
        self.dead_lettered = 0
        self.requeued = 0


def _dig(event: Mapping[str, Any], path: str) -> Any:
    value: Any = event
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


class Forwarder:
    """Forwards one bridge's scored events to the legacy broker.

    Args:
        settings: the bridge's settings.
        consumer: a consumer of the bridge's gateway queue.
        publisher: a publisher connected to the LEGACY broker.
        store: the gateway store (dead letters).
        publish_timeout: seconds to wait for the legacy broker's confirms.
    """

    def __init__(
        self,
        settings: BridgeSettings,
        consumer: Consumer,
        publisher: Publisher,
        store: EventStore,
        *,
        publish_timeout: float = 30.0,
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.publisher = publisher
        self.store = store
        self.codec: Codec = codec_from_config(settings.codec)
        self.publish_timeout = publish_timeout
        self.stats = BridgeStats()
        #: Messages of the last round the legacy broker did not confirm (requeued).
        self.last_failed = 0

    def record_of(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """The legacy record for a scored event (``fields`` paths); a missing path is an error."""
        record: dict[str, Any] = {}
        for name, path in self.settings.fields.items():
            value = _dig(event, path)
            if value is _MISSING:
                raise KeyError(f"bridge {self.settings.name!r}: field {name!r}: path {path!r} is not in the scored event")
            record[name] = value
        return record

    def run_once(self, max_wait: float = 1.0) -> int:
        """Forward one batch; returns the number of deliveries handled."""
        deliveries = self.consumer.get_batch(self.settings.batch_max, max_wait, 0.05)
        if not deliveries:
            return 0
        to_ack: list[Delivery] = []
        outgoing: list[tuple[Delivery, Message]] = []
        for d in deliveries:
            try:
                event = orjson.loads(d.body)
                score = _dig(event, "data.score")
                if self.settings.min_score is not None and (not isinstance(score, (int, float)) or score < self.settings.min_score):
                    self.stats.filtered += 1
                    to_ack.append(d)
                    continue
                body = self.codec.encode([self.record_of(event)])
            except (orjson.JSONDecodeError, KeyError, CodecError, TypeError, ValueError) as exc:
                self._dead_letter(d, exc)
                to_ack.append(d)
                continue
            outgoing.append((d, Message(
                body=body, routing_key=self.settings.routing_key, message_id=str(event.get("id") or d.message_id),
                headers={"ce_type": str(event.get("type", "")), "ce_source": str(event.get("source", ""))},
                content_type=self.settings.content_type,
            )))
        failed = 0
        if outgoing:
            try:
                outcomes = self.publisher.publish(self.settings.exchange, [m for _, m in outgoing]).result(self.publish_timeout + 5)
            except Exception as exc:  # noqa: BLE001 -- every message of the batch is requeued
                log.warning("bridge %r: publish failed: %s", self.settings.name, type(exc).__name__)
                outcomes = [Outcome.LOST] * len(outgoing)
            for (d, _), outcome in zip(outgoing, outcomes):
                if outcome is Outcome.ACK:
                    to_ack.append(d)
                    self.stats.forwarded += 1
                else:
                    self.consumer.reject(d, requeue=True)  # the gateway queue's delivery limit bounds it
                    self.stats.requeued += 1
                    failed += 1
        if to_ack:
            self.consumer.ack(to_ack)
        self.last_failed = failed
        if failed:
            log.warning("bridge %r: %d message(s) not confirmed by the legacy broker; requeued", self.settings.name, failed)
        return len(deliveries)

    def _dead_letter(self, d: Delivery, exc: BaseException) -> None:
        self.stats.dead_lettered += 1
        self.store.add_dead_letter(
            stage="bridge",
            error_class=type(exc).__name__,
            reason=f"bridge {self.settings.name!r}: {exc}"[:2000],
            payload=d.body.decode("utf-8", "replace"),
            event_id=d.message_id or None,
            headers={"bridge": self.settings.name, "routing_key": d.routing_key},
        )

    def run(self, stop: threading.Event) -> None:
        """Forward until ``stop`` is set; a round the legacy broker failed waits a second before the next."""
        while not stop.is_set():
            try:
                self.run_once()
                if self.last_failed:
                    stop.wait(1.0)  # no hot requeue loop while the legacy broker refuses
            except Exception:  # noqa: BLE001 -- a forwarder must never die silently
                log.exception("bridge %r: unexpected error; retrying in 1 s", self.settings.name)
                stop.wait(1.0)
