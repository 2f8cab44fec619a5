"""Scoring routes, fallback and shadow on real foundations (issue 7): RabbitMQ and PostgreSQL.

* The topology on RabbitMQ routes every event to exactly one scoring queue (the router exchange,
  its alternate exchange for the default route) and removes the pre-routes binding of the default
  queue to the events exchange.
* relay + scorer in one process: route ``pay`` scores through a real OIP v2 server over HTTP, with
  a ``rules`` fallback and a shadow model; the default route scores everything else. While the
  server answers 500 the pay route degrades to the fallback (scored events say ``degraded``), the
  default route is untouched; once the server is back, the primary scores again. Every event is
  published scored exactly once and stored with exactly one primary-or-fallback score; the shadow
  comparison covers the events the primary scored.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pytest

from gateway.bus import Topology
from gateway.bus.rabbitmq import RabbitBus
from gateway.config import BusSettings, ScoringSettings, Settings
from gateway.runtime import Gateway
from tests.oip_server import OipServer
from tests.rabbit import delete_broker_objects, queue_depth
from tests.unit.test_scoring_worker import make_events

pytestmark = pytest.mark.integration

WAIT = 20.0


def wait_for(cond: Callable[[], bool], what: str, timeout: float = WAIT, diag: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what} {diag()}"
        time.sleep(0.05)


def test_rabbitmq_routes_each_event_to_one_scoring_queue_and_drops_the_old_binding(
    amqp_url: str, bus_prefix: str
) -> None:
    scoring = ScoringSettings(routes=[
        {"name": "pay", "types": ["payments.#"], "model": "rules-a"},
        {"name": "ord", "types": ["orders.*.created", "orders.*.updated"], "model": "rules-b"},
    ])
    settings = BusSettings(url=amqp_url, prefix=bus_prefix)
    topo = Topology.from_settings(settings, scoring)
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    # The previous version's binding: the default queue straight on the events exchange.
    ch.exchange_declare(topo.events_exchange, "topic", durable=True)
    ch.queue_declare(topo.scoring_queue, durable=True, arguments=next(
        q.arguments for q in topo.queues() if q.name == topo.scoring_queue))
    ch.queue_bind(topo.scoring_queue, topo.events_exchange, "#")
    bus = RabbitBus(settings, topo)
    try:
        bus.declare_topology()
        bus.declare_topology()  # idempotent, the removal of the old binding too
        ch.confirm_delivery()
        types = ["payments.card.charged", "payments", "orders.x.created", "orders.x.updated", "orders.x.deleted",
                 "other"]
        for i, t in enumerate(types):
            ch.basic_publish(topo.events_exchange, t, json.dumps({"n": i}).encode(), mandatory=True)
        got = {name or "default": 0 for name, _ in topo.scoring_queues()}
        deadline = time.monotonic() + 10
        while sum(got.values()) < len(types) and time.monotonic() < deadline:
            got = {name or "default": queue_depth(amqp_url, q) for name, q in topo.scoring_queues()}
            time.sleep(0.05)
        assert got == {"default": 2, "pay": 2, "ord": 2}
    finally:
        bus.close()
        conn.close()
        delete_broker_objects(amqp_url, topo)


class ScoredSink:
    """A queue of its own on the scored exchange, read with basic_get."""

    def __init__(self, amqp_url: str, topo: Topology, name: str) -> None:
        self.conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        self.ch = self.conn.channel()
        self.queue = name
        self.ch.queue_declare(name, durable=False, exclusive=True)
        self.ch.queue_bind(name, topo.scored_exchange, "#")
        self.events: list[dict[str, Any]] = []

    def drain(self) -> list[dict[str, Any]]:
        while True:
            method, _props, body = self.ch.basic_get(self.queue, auto_ack=True)
            if method is None:
                return self.events
            self.events.append(json.loads(body))

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def oip() -> Iterator[OipServer]:
    with OipServer() as srv:
        yield srv


def test_route_degrades_to_its_fallback_with_a_shadow_while_the_default_route_scores_on(
    pg_db_url: str, amqp_url: str, bus_prefix: str, oip: OipServer
) -> None:
    features = [{"name": "amount", "path": "data.amount", "type": "number"},
                {"name": "qty", "path": "data.qty", "type": "number", "default": 1}]
    settings = Settings(
        profile="test",
        store={"url": pg_db_url},
        bus={"url": amqp_url, "prefix": bus_prefix, "publish_timeout": 20, "max_attempts": 20, "delivery_limit": 50},
        relay={"idle_wait": 0.02},
        scoring={
            "model": "base", "checkpoint_interval": 0, "score_timeout": 2.0, "workers": 1,
            "retry_min_delay": 0.05, "retry_base_delay": 0.05, "retry_max_delay": 0.2,
            "breaker": {"window_size": 2, "minimum_calls": 2, "wait_in_open": 60.0, "half_open_permits": 1},
            "models": {
                "base": {"kind": "rules", "options": {"rules": [
                    {"when": "data.amount > 1000000", "score": 0.9, "reason": "huge"}], "default": 0.2}},
                "guard": {"kind": "rules", "options": {"rules": [
                    {"when": "data.amount > 12", "score": 0.7, "reason": "over 12"}], "default": 0.1}},
                "challenger": {"kind": "rules", "options": {"rules": [
                    {"when": "data.amount > 14", "score": 0.8, "reason": "over 14"}], "default": 0.05}},
                "fraud": {"kind": "oip", "options": {"url": oip.url, "model": "fraud", "timeout": 1.0,
                                                     "features": features}},
            },
            "routes": [{"name": "pay", "types": ["com.acme.payment.#"], "model": "fraud", "fallback": "guard",
                        "shadow": {"model": "challenger", "fraction": 1.0}}],
        },
    )
    gw = Gateway(settings, roles=["relay", "scorer"])
    sink = None
    gw.start()
    try:
        sink = ScoredSink(amqp_url, gw.topology, f"{bus_prefix}.test-sink")
        store = gw.store
        pay_worker = gw.scorers[-1]
        versions = {w.scorer.name: w.scorer.version for w in gw.scorers}
        versions["guard"] = pay_worker.fallback.version
        versions["challenger"] = pay_worker.shadow.scorer.version

        def scores(evs: list[Any], model: str) -> dict[str, Any]:
            return store.get_scores([e.id for e in evs], model, versions[model])

        # (1) Healthy: the pay route scores with the OIP model (and the shadow), orders by base.
        pay1 = make_events(10, "com.acme.payment.received", start=1000)
        orders1 = make_events(10, "com.acme.order.changed", start=0)
        store.accept(pay1 + orders1, source_name="orders")
        gw.wake_relay()
        wait_for(lambda: len(scores(pay1, "fraud")) == 10 and len(scores(orders1, "base")) == 10, "phase 1 scores")
        wait_for(lambda: len(scores(pay1, "challenger")) == 10, "the shadow scores")
        assert scores(orders1, "challenger") == {}  # the shadow belongs to the pay route only

        # (2) The server fails: the pay breaker opens, the fallback scores, the default route goes on.
        oip.fail(500)
        pay2 = make_events(10, "com.acme.payment.received", start=2000)
        orders2 = make_events(10, "com.acme.order.changed", start=100)
        store.accept(pay2 + orders2, source_name="orders")
        gw.wake_relay()
        wait_for(lambda: len(scores(pay2, "guard")) + len(scores(pay2, "fraud")) == 10, "phase 2 pay scores")
        wait_for(lambda: len(scores(orders2, "base")) == 10, "phase 2 order scores")
        assert gw.breakers.get("scorer:fraud").state.value == "open"
        assert len(scores(pay2, "guard")) >= 8  # at most the window's calls failed before it opened
        assert gw.breakers.get("scorer:base").state.value == "closed"

        # (3) Recovery: an operator resets the breaker (wait_in_open is long); fraud scores again.
        oip.recover()
        gw.breakers.get("scorer:fraud").reset()
        pay3 = make_events(10, "com.acme.payment.received", start=3000)
        store.accept(pay3, source_name="orders")
        gw.wake_relay()
        wait_for(lambda: len(scores(pay3, "fraud")) == 10, "phase 3 scores",
                 diag=lambda: f"guard={len(scores(pay3, 'guard'))} fraud={len(scores(pay3, 'fraud'))} "
                 f"pending={store.stats()} worker={vars(pay_worker).get('scored')} "
                 f"depth={[queue_depth(amqp_url, q) for _, q in gw.topology.scoring_queues()]} reqs={len(oip.infer_requests())}")

        every = pay1 + orders1 + pay2 + orders2 + pay3
        wait_for(lambda: len(sink.drain()) >= len(every), "every scored event at the sink")
        time.sleep(0.5)
        published = sink.drain()
        originals = [e["data"]["event"]["id"] for e in published]
        assert sorted(originals) == sorted(e.id for e in every), "a scored event was published twice or not at all"
        model_of = {e["data"]["event"]["id"]: e["data"]["model"]["name"] for e in published}
        assert {model_of[e.id] for e in orders1 + orders2} == {"base"}
        assert {model_of[e.id] for e in pay1 + pay3} == {"fraud"}
        degraded = {e["data"]["event"]["id"] for e in published if e.get("degraded") is True}
        assert degraded == set(scores(pay2, "guard")) and {model_of[i] for i in degraded} == {"guard"}
        assert len(degraded) >= 8
        # Exactly one primary-or-fallback score per event (shadow rows are extra, challenger only).
        primaries = sum(len(scores(evs, m)) for evs, m in ((pay1, "fraud"), (pay2, "fraud"), (pay2, "guard"),
                                                          (pay3, "fraud"), (orders1, "base"), (orders2, "base")))
        assert primaries == len(every)
        report = store.compare_scores("fraud", "challenger")
        assert report.count >= 20 and report.agreement is not None  # pay1 and pay3 (pay2 partly)
        assert store.list_dead_letters() == []
    finally:
        if sink is not None:
            sink.close()
        gw.stop()
        delete_broker_objects(amqp_url, gw.topology)
