"""Bridging out: scored events reach a legacy queue on the local RabbitMQ as EBCDIC fixed-width records."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from decimal import Decimal
from typing import Any

import pika
import pytest

from gateway.bridge import Forwarder
from gateway.bus import InMemoryBus, Topology
from gateway.bus.protocols import Message, Outcome
from gateway.codecs import codec_from_config
from gateway.config import BridgeSettings, BusSettings, load_settings
from gateway.events import Event, utcnow
from gateway.events.scored import scored_event
from gateway.runtime import Gateway
from gateway.store import EventStore
from tests.legacy import make_orders, source_settings

FIXED = {
    "format": "fixed", "encoding": "cp037", "record_length": 33, "rounding": "half-up",
    "layout": [{"name": "id", "pic": "9(8)"}, {"name": "score", "pic": "9V9(4)"}, {"name": "model", "pic": "X(20)"}],
}
FIELDS = {"id": "data.event.data.id", "score": "data.score", "model": "data.model.name"}


def bridge(url: str, queue: str, **over: Any) -> dict[str, Any]:
    return {"name": "mainframe", "url": url, "routing_key": queue, "codec": FIXED, "fields": FIELDS,
            "content_type": "application/x-ebcdic-fixed", **over}


@pytest.fixture
def legacy_out(amqp_url: str) -> Iterator[str]:
    name = f"legacy-scored-{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    conn.channel().queue_declare(name, durable=True)
    conn.close()
    yield name
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    conn.channel().queue_delete(name)
    conn.close()


def drain(url: str, queue: str) -> list[tuple[bytes, Any]]:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    out = []
    while True:
        method, props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            break
        out.append((body, props))
    conn.close()
    return out


@pytest.mark.integration
def test_sql_rows_scored_and_forwarded_to_a_legacy_queue_in_ebcdic(tmp_path, amqp_url: str, legacy_out: str) -> None:
    legacy = f"sqlite:///{tmp_path / 'legacy.db'}"
    make_orders(legacy, 40).dispose()
    settings = load_settings(
        None,
        store={"url": f"sqlite:///{tmp_path / 'g.db'}"},
        scoring={"warmup": 5},
        sources=[source_settings(legacy)],
        bridges=[bridge(amqp_url, legacy_out, types=["com.acme.#"])],
    )
    gw = Gateway(settings, roles=["sources", "relay", "scorer", "bridge"])
    gw.start()
    try:
        received: list[tuple[bytes, Any]] = []
        deadline = time.monotonic() + 60
        while len(received) < 40 and time.monotonic() < deadline:
            received += drain(amqp_url, legacy_out)
            time.sleep(0.2)
    finally:
        gw.stop()
    assert len(received) == 40
    codec = codec_from_config(FIXED)
    records = [codec.decode(body)[0] for body, _ in received]
    assert sorted(r["id"] for r in records) == list(range(1, 41))
    assert all(Decimal(0) <= r["score"] <= Decimal(1) and r["model"] for r in records)
    ids = {props.message_id for _, props in received}
    assert len(ids) == 40 and all(props.content_type == "application/x-ebcdic-fixed" for _, props in received)
    assert gw.forwarders[0].stats.forwarded == 40


# ------------------------------------------------------------------ the forwarder alone (in-process bus)
class FlakyPublisher:
    """A legacy publisher whose broker refuses the first ``fail`` batches."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.sent: list[Message] = []

    def publish(self, exchange: str, messages: list[Message]) -> Future[list[Outcome]]:
        f: Future[list[Outcome]] = Future()
        if self.fail:
            self.fail -= 1
            f.set_result([Outcome.NACK] * len(messages))
        else:
            self.sent += messages
            f.set_result([Outcome.ACK] * len(messages))
        return f

    def close(self) -> None:
        pass


def scored(i: int, **data: Any) -> bytes:
    original = Event(id=f"e-{i}", source="/s", type="com.acme.order.changed", time=utcnow(), data={"id": i, **data})
    return scored_event(original, score=0.5 + i / 100, model_name="online", model_version="1").to_json()


def forwarder(store: EventStore, publisher: FlakyPublisher, **over: Any) -> tuple[Forwarder, InMemoryBus]:
    settings = BridgeSettings.model_validate(bridge("amqp://legacy/", "OUT", **over))
    topology = Topology.from_settings(BusSettings()).with_bridges([settings])
    bus = InMemoryBus(topology)
    bus.declare_topology()
    consumer = bus.consumer(topology.bridge_queue("mainframe"), 100)
    return Forwarder(settings, consumer, publisher, store), bus


def publish_scored(bus: InMemoryBus, bodies: list[bytes]) -> None:
    pub = bus.publisher()
    pub.publish(bus.topology.scored_exchange, [Message(b, "com.acme.order.changed", f"m{i}") for i, b in enumerate(bodies)]).result(5)


def test_an_unencodable_event_is_dead_lettered_and_the_rest_forwarded(sqlite_store: EventStore) -> None:
    publisher = FlakyPublisher()
    fwd, bus = forwarder(sqlite_store, publisher)
    publish_scored(bus, [scored(1), scored(123_456_789), scored(3)])  # 9 digits do not fit PIC 9(8)
    assert fwd.run_once(max_wait=0.5) == 3
    assert len(publisher.sent) == 2 and fwd.stats.dead_lettered == 1
    (dead,) = sqlite_store.list_dead_letters()
    assert dead.stage == "bridge" and dead.error_class == "EncodeError" and "field 'id'" in dead.reason
    assert fwd.run_once(max_wait=0.1) == 0  # everything was acked


def test_unconfirmed_messages_are_requeued_and_forwarded_later(sqlite_store: EventStore) -> None:
    publisher = FlakyPublisher(fail=1)
    fwd, bus = forwarder(sqlite_store, publisher)
    publish_scored(bus, [scored(1), scored(2)])
    fwd.run_once(max_wait=0.5)
    assert publisher.sent == [] and fwd.last_failed == 2
    fwd.run_once(max_wait=0.5)
    from gateway.events.scored import scored_event_id

    assert sorted(m.message_id for m in publisher.sent) == sorted(scored_event_id(f"e-{i}", "online", "1") for i in (1, 2))
    assert fwd.stats.forwarded == 2 and fwd.stats.requeued == 2


def test_min_score_filters_and_a_missing_path_is_a_dead_letter(sqlite_store: EventStore) -> None:
    publisher = FlakyPublisher()
    fwd, bus = forwarder(sqlite_store, publisher, min_score=0.52, fields={**FIELDS, "id": "data.event.data.order_no"})
    publish_scored(bus, [scored(1), scored(5)])
    fwd.run_once(max_wait=0.5)
    assert fwd.stats.filtered == 1 and fwd.stats.dead_lettered == 1 and publisher.sent == []
    (dead,) = sqlite_store.list_dead_letters()
    assert "path 'data.event.data.order_no' is not in the scored event" in dead.reason
