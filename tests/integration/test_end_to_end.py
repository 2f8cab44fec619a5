"""The spine on real foundations: PostgreSQL legacy table -> outbox -> RabbitMQ -> scorer -> scored exchange."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pika
import pytest
from cloudevents.core.formats.json import JSONFormat

from gateway.bus import Topology
from gateway.config import BusSettings, Settings
from gateway.runtime import Gateway
from gateway.store.schema import scores
from tests.legacy import T0, make_orders, source_settings, touch_orders
from tests.rabbit import delete_broker_objects

pytestmark = pytest.mark.integration


class ScoredSink:
    """An independent AMQP consumer (raw pika) bound to the scored exchange, like any client."""

    def __init__(self, amqp_url: str, prefix: str) -> None:
        self.conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        self.ch = self.conn.channel()
        self.queue = f"{prefix}.test-sink"
        self.ch.exchange_declare(f"{prefix}.scored", "topic", durable=True)
        self.ch.queue_declare(self.queue, durable=True, arguments={"x-queue-type": "quorum"})
        self.ch.queue_bind(self.queue, f"{prefix}.scored", "com.acme.#")
        self.bodies: list[dict[str, Any]] = []
        self.routing_keys: Counter[str] = Counter()

    def drain(self, until: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.bodies) < until and time.monotonic() < deadline:
            method, _props, body = self.ch.basic_get(self.queue, auto_ack=True)
            if method is None:
                self.conn.sleep(0.05)
                continue
            self.routing_keys[method.routing_key] += 1
            obj = json.loads(body)
            self.bodies.append(obj)
            # The official SDK parses every scored event and every original event inside it.
            scored = JSONFormat().read(None, body)
            assert scored.get_type().endswith(".scored")
            original = JSONFormat().read(None, json.dumps(obj["data"]["event"]).encode())
            assert original.get_id() == scored.get_extension("originalid")

    def close(self) -> None:
        self.conn.close()


def _settings(store_url: str, amqp_url: str, prefix: str, legacy_url: str, **scoring: Any) -> Settings:
    return Settings(
        profile="test",
        store={"url": store_url},
        bus={"url": amqp_url, "prefix": prefix, "publish_timeout": 20},
        relay={"batch_size": 500, "idle_wait": 0.02},
        scoring={"warmup": 20, **scoring},
        api={"port": 0},
        sources=[source_settings(legacy_url, batch_size=1000)],
    )


def _cleanup(amqp_url: str, prefix: str) -> None:
    delete_broker_objects(amqp_url, Topology.from_settings(BusSettings(prefix=prefix)), queues=[f"{prefix}.test-sink"])


def _score_rows(gw: Gateway) -> Counter[str]:
    from sqlalchemy import select

    with gw.store.engine.connect() as conn:
        return Counter(conn.execute(select(scores.c.event_id)).scalars())


def _wait(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@contextmanager
def _pipeline(pg_db_url: str, amqp_url: str, bus_prefix: str, rows: int) -> Iterator[tuple[Any, ScoredSink, Settings]]:
    """A legacy table of ``rows`` orders, a scored-event sink and settings; all cleaned up after."""
    legacy = make_orders(pg_db_url, rows)
    sink = ScoredSink(amqp_url, bus_prefix)
    try:
        yield legacy, sink, _settings(pg_db_url, amqp_url, bus_prefix, pg_db_url)
    finally:
        sink.close()
        legacy.dispose()
        _cleanup(amqp_url, bus_prefix)


@pytest.mark.slow
def test_ten_thousand_rows_become_ten_thousand_scored_events(pg_db_url: str, amqp_url: str, bus_prefix: str) -> None:
    with _pipeline(pg_db_url, amqp_url, bus_prefix, 10_000) as (legacy, sink, settings):
        gw = Gateway(settings, roles=["sources", "relay", "scorer"])
        gw.start()
        try:
            sink.drain(10_000, timeout=180)
            assert len(sink.bodies) == 10_000
            ids = Counter(b["data"]["event"]["id"] for b in sink.bodies)
            assert len(ids) == 10_000 and max(ids.values()) == 1
            assert set(sink.routing_keys) == {"com.acme.order.changed"}
            assert all(0.0 <= b["data"]["score"] <= 1.0 for b in sink.bodies)
            assert _wait(lambda: gw.store.count_scores() == 10_000, 30)

            # Running the source again over the same rows adds no event.
            runner = gw.runners[0]
            assert _wait(lambda: runner.status.polls >= 12, 10)
            assert gw.store.stats()["events"] == 10_000

            # Updating 100 rows yields exactly 100 new events.
            touch_orders(legacy, list(range(500, 600)), T0 + timedelta(days=2))
            sink.drain(10_100, timeout=60)
            assert len(sink.bodies) == 10_100
            assert gw.store.stats()["events"] == 10_100
            new = [b for b in sink.bodies[10_000:]]
            assert sorted(int(b["data"]["event"]["subject"].split("/")[1]) for b in new) == list(range(500, 600))
            time.sleep(0.5)
            sink.drain(10_101, timeout=1)
            assert len(sink.bodies) == 10_100  # nothing more arrives
            rows = _score_rows(gw)
            assert len(rows) == 10_100 and max(rows.values()) == 1
        finally:
            gw.stop()


@pytest.mark.slow
def test_stopping_relay_and_scorer_mid_run_loses_and_duplicates_nothing(pg_db_url: str, amqp_url: str, bus_prefix: str) -> None:
    with _pipeline(pg_db_url, amqp_url, bus_prefix, 6_000) as (legacy, sink, settings):
        sources = Gateway(settings, roles=["sources"])
        sources.start()
        workers = Gateway(settings, roles=["relay", "scorer"])
        workers.start()
        try:
            assert _wait(lambda: workers.store.count_scores() >= 1_000, 60)
            workers.stop()  # mid-run: batches in flight are settled or handed back
            assert workers.store.count_scores() < 6_000  # it really was stopped mid-run
            workers = Gateway(settings, roles=["relay", "scorer"])
            workers.start()
            sink.drain(6_000, timeout=120)
            assert _wait(lambda: workers.store.count_scores() == 6_000, 30)
            rows = _score_rows(workers)
            assert len(rows) == 6_000 and max(rows.values()) == 1  # none lost, none duplicated
            ids = Counter(b["data"]["event"]["id"] for b in sink.bodies)
            assert len(ids) == 6_000  # every event reached consumers (a redelivery may repeat one)
            assert workers.store.stats()["pending"] == 0
        finally:
            workers.stop()
            sources.stop()
