"""Dead letters on real foundations (RabbitMQ + PostgreSQL): idempotent replay (REL-13) and the
drain of the broker's dead-letter queue, with the relay and the scorer running in-process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pika
import pytest
from sqlalchemy import select

from gateway.config import Settings
from gateway.deadletters import DeadLetterReplayer, DeadLetterSelection
from gateway.events import Event, event_id
from gateway.runtime import Gateway
from gateway.store import EventStore, make_engine
from gateway.store.schema import EVENT_PUBLISHED, events
from tests.rabbit import delete_broker_objects, queue_depth

pytestmark = pytest.mark.integration

T0 = datetime(2024, 3, 1, tzinfo=UTC)


def make_events(n: int, start: int = 0) -> list[Event]:
    return [
        Event(
            id=event_id("orders", "order", i, "v1"), source="/legacy-gateway/sources/orders",
            type="com.acme.order.changed", time=T0, subject=f"order/{i}",
            data={"order_id": i, "amount": f"{10 + i % 7}.50", "status": "new"}, extensions={"sourcename": "orders"},
        )
        for i in range(start, start + n)
    ]


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    assert predicate(), f"timed out after {timeout} s waiting for {what}"


@pytest.fixture
def gateway(pg_db_url: str, amqp_url: str, bus_prefix: str) -> Iterator[Gateway]:
    """relay + scorer (with the DLQ drain) on PostgreSQL and RabbitMQ; broker objects removed after."""
    settings = Settings(
        profile="test",
        store={"url": pg_db_url},
        bus={"url": amqp_url, "prefix": bus_prefix, "publish_timeout": 20},
        relay={"idle_wait": 0.02},
        scoring={"warmup": 3},
    )
    gw = Gateway(settings, roles=["relay", "scorer"])
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()
        delete_broker_objects(amqp_url, gw.topology)


def other_process_store(gw: Gateway) -> EventStore:
    """A second engine on the same store, as a `gateway dead-letters replay` process has."""
    return EventStore(make_engine(gw.store.engine.url.render_as_string(hide_password=False)))


def scored(gw: Gateway) -> int:
    return sum(w.scored for w in gw.scorers)


def test_replaying_ten_already_scored_events_leaves_exactly_ten_scores(gateway: Gateway) -> None:
    gw = gateway
    evs = make_events(10)
    gw.store.accept(evs, source_name="orders")
    gw.wake_relay()
    wait(lambda: gw.store.count_scores() == 10, 60, "10 scores")
    before = scored(gw)
    # Ten dead letters for those events, as the scorer writes them (payload = the delivery body).
    dls = [
        gw.store.add_dead_letter(
            stage="scoring", error_class="RuntimeError", reason="scoring failed 3 times", payload=ev.to_json().decode(),
            event_id=ev.id, source_name="orders", headers={"x-delivery-count": 2}, attempts=3,
        )
        for ev in evs
    ]
    replayed_at = datetime.now(UTC)
    cli_store = other_process_store(gw)
    try:
        report = DeadLetterReplayer(cli_store, rate=50).replay(DeadLetterSelection(stage="scoring"))
    finally:
        cli_store.engine.dispose()
    assert (report.count("requeued"), report.failed, report.skipped) == (10, 0, 0)

    def published_again() -> bool:
        with gw.store.engine.connect() as conn:
            rows = conn.execute(select(events.c.status, events.c.published_at)).all()
        return len(rows) == 10 and all(s == EVENT_PUBLISHED and p is not None and p >= replayed_at for s, p in rows)

    wait(published_again, 60, "the relay to publish the 10 events again")
    wait(lambda: scored(gw) >= before + 10, 60, "the scorer to consume the 10 replayed events")
    time.sleep(0.5)  # nothing further may arrive
    assert gw.store.count_scores() == 10
    assert gw.store.stats()["events"] == 10
    rows = gw.store.get_dead_letters(dls)
    assert all(d.state == "replayed" and d.replay_count == 1 and d.last_replay_outcome == "requeued" for d in rows)
    # Replaying them again is a no-op unless asked for.
    again = DeadLetterReplayer(gw.store, rate=None).replay(DeadLetterSelection(ids=tuple(dls)))
    assert (again.skipped, again.replayed) == (10, 0)


def test_the_dlq_drain_stores_each_broker_dead_letter_once_and_replay_scores_it(
    gateway: Gateway, amqp_url: str
) -> None:
    gw = gateway
    topo = gw.topology
    (ev,) = make_events(1, start=100)  # never accepted by this store
    death = {
        "count": 1, "reason": "delivery_limit", "queue": topo.scoring_queue, "time": datetime(2024, 3, 1, tzinfo=UTC),
        "exchange": topo.events_exchange, "routing-keys": [ev.type],
    }
    props = pika.BasicProperties(
        message_id=ev.id, delivery_mode=2, content_type="application/cloudevents+json",
        headers={"x-death": [death], "x-first-death-reason": "delivery_limit", "origin": "test"},
    )
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    ch.confirm_delivery()
    for _ in range(2):  # the same message twice, as a redelivery would bring it
        ch.basic_publish("", topo.dead_letter_queue, ev.to_json(), props, mandatory=True)
    # And a poison message through the real scoring queue: the scorer parks it (stage scoring) and
    # rejects it, RabbitMQ dead-letters it with its own x-death: the drain must not store it again.
    ch.basic_publish(topo.events_exchange, ev.type, b"{not json",
                     pika.BasicProperties(message_id="poison-1", delivery_mode=2), mandatory=True)
    conn.close()

    wait(lambda: gw.drain.stats.stored + gw.drain.stats.duplicates >= 3, 60, "the drain to take 3 messages")
    broker = gw.store.list_dead_letters(stage="broker")
    assert len(broker) == 1, broker
    (d,) = broker
    assert (d.event_id, d.error_class, d.source_name) == (ev.id, "delivery_limit", "orders")
    assert d.attempts == gw.settings.bus.delivery_limit + 1 and d.payload == ev.to_json().decode()
    assert d.headers is not None and d.headers["x-death"][0]["queue"] == topo.scoring_queue and d.headers["origin"] == "test"
    (poison,) = gw.store.list_dead_letters(stage="scoring")
    assert poison.event_id == "poison-1" and gw.drain.stats.duplicates == 2
    wait(lambda: queue_depth(amqp_url, topo.dead_letter_queue) == 0, 10, "an empty DLQ")

    # Replaying the broker dead letter accepts the event; the relay and the scorer take it from there.
    report = DeadLetterReplayer(gw.store, rate=None, on_replayed=gw.wake_relay).replay(DeadLetterSelection(ids=(d.id,)))
    assert [(i.outcome, i.event_ids) for i in report.items] == [("accepted", (ev.id,))]
    wait(lambda: gw.store.get_scores([ev.id], gw.scorer.scorer.name, gw.scorer.scorer.version), 60, "its score")
    assert gw.store.count_scores() == 1
    # Poison cannot be replayed: it says why.
    (item,) = DeadLetterReplayer(gw.store, rate=None).replay(DeadLetterSelection(ids=(poison.id,))).items
    assert item.outcome == "failed" and "not a CloudEvent" in item.detail

    gw.stop()  # unacked messages would return to the queue now: there are none
    assert queue_depth(amqp_url, topo.dead_letter_queue) == 0
    assert len(gw.store.list_dead_letters(stage="broker")) == 1
