"""The legacy-queue source without a broker: decoding, dead letters, ack order, event ids, settings.

A recording consumer stands in for the pika consumer, so these tests pin the adapter's own logic;
tests/integration/test_amqp_source.py runs the same paths against the local RabbitMQ.
"""

from __future__ import annotations

import base64
import itertools
import socket
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from adapters.amqp import AmqpSource
from adapters.amqp.source import message_key
from gateway.bus.pika_consumer import PikaConsumer
from gateway.bus.protocols import Delivery
from gateway.codecs import codec_from_config
from gateway.config import SourceSettings
from gateway.errors import StoreUnavailableError
from gateway.resilience import RetryPolicy
from gateway.sources.runner import SourceRunner
from gateway.store import EventFilter, EventStore

FIXED = {
    "format": "fixed", "encoding": "cp037", "record_length": 33,
    "layout": [{"name": "id", "pic": "9(8)"}, {"name": "customer", "pic": "X(20)"}, {"name": "amount", "pic": "S9(7)V99 COMP-3"}],
}
_tags = itertools.count(1)


class RecordingConsumer:
    """Hands out queued deliveries and records acks and rejects (in call order)."""

    def __init__(self) -> None:
        self.queue: list[Delivery] = []
        self.log: list[tuple[str, Any]] = []

    def get_batch(self, max_messages: int, max_wait: float, linger: float) -> list[Delivery]:
        out, self.queue = self.queue[:max_messages], self.queue[max_messages:]
        return out

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        self.log.append(("ack", [d.tag for d in deliveries]))

    def reject(self, delivery: Delivery, requeue: bool) -> None:
        self.log.append(("reject", (delivery.tag, requeue)))

    def close(self) -> None:
        self.log.append(("close", None))


def delivery(body: bytes, content_type: str = "application/json", message_id: str = "", *,
             redelivered: bool = False, headers: dict[str, Any] | None = None) -> Delivery:
    return Delivery(body, "legacy.rk", message_id, headers or {}, redelivered, next(_tags), content_type)


def source(**over: Any) -> tuple[AmqpSource, RecordingConsumer]:
    cfg = {
        "url": "amqp://legacy:secret@mq.legacy.example:5672/%2F", "queue": "BOOKINGS.OUT", "codec": {"format": "json"},
        "codecs_by_content_type": {"Application/X-EBCDIC-Fixed; charset=cp037": FIXED}, "delivery_limit": 3, **over,
    }
    src = AmqpSource(AmqpSource.parse_config(cfg), source_name="legacy-queue")  # type: ignore[arg-type]
    consumer = RecordingConsumer()
    src._consumer = consumer  # type: ignore[assignment]  # open() keeps an existing consumer
    return src, consumer


def runner_for(store: EventStore, src: AmqpSource, key: list[str]) -> SourceRunner:
    settings = SourceSettings.model_validate({
        "name": "legacy-queue", "adapter": "amqp", "config": {"url": "amqp://x/", "queue": "q"},
        "mapping": {"type": "com.acme.legacy.booking", "entity": "booking", "key": key},
    })
    return SourceRunner(settings, store, adapter=src, retry=RetryPolicy(attempts=1, base_delay=0.01, max_delay=0.01, deadline=1))


# ---------------------------------------------------------------- decoding
def test_codec_is_chosen_by_content_type_and_one_message_may_carry_several_records() -> None:
    src, consumer = source()
    fixed = codec_from_config(FIXED)
    body = fixed.encode([{"id": 1, "customer": "A", "amount": Decimal("-1.25")}, {"id": 2, "customer": "B", "amount": 0}])
    consumer.queue = [delivery(body, "application/x-ebcdic-fixed", "m-1"), delivery(b'[{"id": 3}, {"id": 4}]', "application/json")]
    batch = src.fetch(None, 100)
    assert [r.data["id"] for r in batch.records] == [1, 2, 3, 4]
    assert batch.records[0].data["amount"] == Decimal("-1.25") and batch.records[0].data["customer"] == "A"
    assert [r.data["_record"] for r in batch.records] == [0, 1, 0, 1]
    assert batch.records[0].data["_message_id"] == "m-1"
    assert batch.records[2].data["_message_id"] == "sha256:" + __import__("hashlib").sha256(b'[{"id": 3}, {"id": 4}]').hexdigest()
    assert batch.records[1].position == {"queue": "BOOKINGS.OUT", "message_id": "m-1", "record": 1}
    assert consumer.log == []  # nothing is acked by fetch


def test_an_undecodable_message_is_a_reject_with_raw_body_headers_and_error() -> None:
    src, consumer = source()
    bad = delivery(b"\xc1\xc2\x00", "application/x-ebcdic-fixed", "bad-1", headers={"origin": "MVS1", "blob": b"\x01\x02"})
    consumer.queue = [bad, delivery(b'{"id": 9}', "application/json", "ok-1")]
    batch = src.fetch(None, 100)
    assert [r.data["id"] for r in batch.records] == [9]  # the rest of the batch flows
    (reject,) = batch.rejects
    assert reject.payload == b"\xc1\xc2\x00" and reject.error_class == "DecodeError" and reject.attempts == 1
    assert reject.headers["origin"] == "MVS1" and reject.headers["blob"] == base64.b64encode(b"\x01\x02").decode()
    assert reject.headers["message_id"] == "bad-1" and reject.headers["content_type"] == "application/x-ebcdic-fixed"
    assert reject.headers["routing_key"] == "legacy.rk" and reject.position == {"queue": "BOOKINGS.OUT", "message_id": "bad-1"}
    assert reject.reason.startswith("source 'legacy-queue': ") and "record 0" in reject.reason and "33" in reject.reason


def test_delivery_limit_uses_the_brokers_count_or_counts_redeliveries_itself() -> None:
    src, consumer = source()
    consumer.queue = [delivery(b'{"id": 1}', message_id="q-1", headers={"x-delivery-count": 2}),  # 3rd delivery: ok
                      delivery(b'{"id": 2}', message_id="q-2", headers={"x-delivery-count": 3})]  # 4th: over the limit
    batch = src.fetch(None, 100)
    assert [r.data["id"] for r in batch.records] == [1]
    (reject,) = batch.rejects
    assert reject.error_class == "DeliveryLimitExceeded" and reject.attempts == 4 and "delivery_limit 3" in reject.reason
    # A classic queue sends no count: the source counts the redeliveries it sees, per message.
    attempts = []
    for redelivered in (False, True, True, True):
        consumer.queue = [delivery(b'{"id": 5}', message_id="c-1", redelivered=redelivered)]
        b = src.fetch(None, 100)
        attempts.append((len(b.records), [r.attempts for r in b.rejects]))
        src.released(b)
    assert attempts == [(1, []), (1, []), (1, []), (0, [4])]


# ---------------------------------------------------------------- ack order and event ids
def test_acked_only_after_the_commit_and_requeued_when_the_commit_fails(sqlite_store: EventStore) -> None:
    src, consumer = source()
    runner = runner_for(sqlite_store, src, ["id"])
    first = delivery(b'{"id": 1}', message_id="m-1")
    consumer.queue = [first]
    real_accept = sqlite_store.accept

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailableError("store down")

    sqlite_store.accept = failing  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailableError):
        runner.run_once()
    assert consumer.log == [("reject", (first.tag, True))]  # not committed: back to the queue, never acked
    sqlite_store.accept = real_accept  # type: ignore[method-assign]
    again = delivery(b'{"id": 1}', message_id="m-1", redelivered=True)
    consumer.queue = [again]

    def committed_then_ack(*args: Any, **kwargs: Any) -> Any:
        result = real_accept(*args, **kwargs)
        consumer.log.append(("commit", None))
        return result

    sqlite_store.accept = committed_then_ack  # type: ignore[method-assign]
    runner.run_once()
    assert consumer.log[1:] == [("commit", None), ("ack", [again.tag])]
    assert sqlite_store.stats()["events"] == 1


@pytest.mark.parametrize("key", [["_message_id", "_record"], ["id"]])
def test_a_redelivered_message_maps_to_the_same_event_ids(sqlite_store: EventStore, key: list[str]) -> None:
    """The event id derives from the message id (or body hash) and record index, or from key fields."""
    src, consumer = source()
    runner = runner_for(sqlite_store, src, key)
    bodies = [(b'{"id": 1}\n', "m-1"), (b'[{"id": 2}, {"id": 3}]', ""), (b'{"id": 4}', "m-4")]
    consumer.queue = [delivery(b, message_id=m) for b, m in bodies]
    runner.run_once()
    before = sorted(e.event["id"] for e in sqlite_store.list_events(EventFilter(), limit=100))
    consumer.queue = [delivery(b, message_id=m, redelivered=True) for b, m in bodies]  # e.g. the ack was lost
    runner.run_once()
    after = sorted(e.event["id"] for e in sqlite_store.list_events(EventFilter(), limit=100))
    assert len(before) == 4 and after == before and runner.status.duplicates == 4


def test_message_key_is_the_message_id_else_a_hash_of_the_body() -> None:
    assert message_key(delivery(b"x", message_id="M1")) == "M1"
    assert message_key(delivery(b"x")) == message_key(delivery(b"x", redelivered=True)) != message_key(delivery(b"y"))


# ---------------------------------------------------------------- own connection settings
def test_the_source_has_its_own_connection_settings_not_the_gateways(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_BUS__URL", "amqp://gateway:pw@gateway-bus:5672/%2F")
    monkeypatch.setenv("GATEWAY_BUS__HEARTBEAT", "99")
    src, _ = source(heartbeat=7, socket_timeout=3, reconnect_max_delay=4.5, blocked_connection_timeout=20)
    bus = src.config.bus_settings()
    assert bus.url is not None and bus.url.get_secret_value() == "amqp://legacy:secret@mq.legacy.example:5672/%2F"
    assert (bus.heartbeat, bus.socket_timeout, bus.reconnect_max_delay, bus.blocked_connection_timeout) == (7, 3, 4.5, 20)


def test_the_consumer_reconnects_with_the_sources_backoff_cap() -> None:
    with socket.socket() as s:  # a closed port: nothing answers
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = AmqpSource(AmqpSource.parse_config({
        "url": f"amqp://guest:guest@127.0.0.1:{port}/%2F", "queue": "q", "declare": {}, "reconnect_max_delay": 0.3,
        "socket_timeout": 0.1,
    }), source_name="legacy-queue")  # type: ignore[arg-type]
    src.open()  # never raises: the consumer keeps trying by itself
    try:
        consumer = src._consumer
        assert isinstance(consumer, PikaConsumer) and not consumer.ready
        backoff = consumer._backoff
        assert backoff.cap == 0.3  # the source's reconnect_max_delay, not the gateway bus's
        assert backoff.attempt >= 3  # open() waited ~5 s: it kept retrying, each delay at most the cap
        assert consumer.connects == 0 and "AMQPConnectionError" in (consumer.last_error or "")
        assert src.fetch(None, 10).records == []  # polling while down is an empty batch, not an error
    finally:
        src.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://mq/", "expected an amqp:// or amqps:// URL, got scheme 'http'"),
        ("amqp://u:secretpw@mq:notaport/", "not a valid AMQP URL: Port could not be cast to integer value as 'notaport'"),
        ("amqp://u:secretpw@mq/%2F?bogus=1", "not a valid AMQP URL: Unknown URL parameter: 'bogus'"),
    ],
)
def test_a_bad_legacy_url_is_a_configuration_error_naming_the_setting(url: str, message: str) -> None:
    with pytest.raises(ValidationError) as ei:
        AmqpSource.parse_config({"url": url, "queue": "q"})
    (err,) = ei.value.errors()
    assert err["loc"] == ("url",) and message in err["msg"] and "secretpw" not in str(ei.value)


def test_a_bad_message_redelivered_after_a_lost_ack_is_one_dead_letter(sqlite_store: EventStore) -> None:
    """Crash between the outbox commit and the legacy ack: the broker delivers the bad message
    again. Its dead letter is keyed by (source, position, error class): still one row."""
    src, consumer = source()
    runner = runner_for(sqlite_store, src, ["id"])
    consumer.queue = [delivery(b'{"id": 1, "broken', message_id="bad-1")]
    runner.run_once()
    consumer.queue = [delivery(b'{"id": 1, "broken', message_id="bad-1", redelivered=True),
                      delivery(b'{"id": 2, "broken', message_id="bad-2")]
    runner.run_once()
    dead = sqlite_store.list_dead_letters()
    assert sorted(d.headers["position"]["message_id"] for d in dead) == ["bad-1", "bad-2"]
