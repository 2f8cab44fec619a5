"""Prometheus metrics of issue 8 after real activity: relay + scorer on SQLite and the in-process bus."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.bus import InMemoryBus, Message, Topology
from gateway.config import BusSettings, Settings
from gateway.events import Event, utcnow
from gateway.observability.instrument import (
    ObservedPublisher,
    ObservedStore,
    PipelineMetrics,
)
from gateway.observability.metrics import (
    Cached,
    QueueCollector,
    RunnersCollector,
    StoreCollector,
)
from gateway.store import EventStore, ScoreRecord


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, keyed by (name, sorted labels)."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text) for s in fam.samples
    }


def value(snap: dict[Any, float], name: str, **labels: str) -> float | None:
    return snap.get((name, tuple(sorted(labels.items()))))


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def events(n: int, age: float, source: str = "orders", traceparent: str | None = None) -> list[Event]:
    t = utcnow() - timedelta(seconds=age)
    ext: dict[str, str | int | bool] = {"sourcename": source}
    if traceparent:
        ext["traceparent"] = traceparent
    return [Event(id=f"evt-{source}-{i}", source=f"/legacy-gateway/sources/{source}", type="com.acme.order.changed",
                  time=t, subject=f"order/{i}", data={"order_id": i, "amount": f"{10 + i}.50"}, extensions=ext)
            for i in range(n)]


def gateway_settings(tmp_path: Path, **extra: Any) -> Settings:
    return Settings(
        profile="test", store={"url": f"sqlite:///{tmp_path / 'g.db'}"}, relay={"idle_wait": 0.02},
        scoring={"model": "guard", "checkpoint_interval": 0, "models": {"guard": {"kind": "rules", "options": {
            "rules": [{"when": "data.order_id > 1000", "score": 0.9, "reason": "big"}], "default": 0.25}}}},
        observability={"metrics_cache_seconds": 0}, **extra,
    )


def test_relay_and_scorer_activity_shows_in_the_metrics(tmp_path: Path) -> None:
    from gateway.runtime import Gateway

    gw = Gateway(gateway_settings(tmp_path), roles=["relay", "scorer"])
    gw.start()
    try:
        topo = gw.topology
        gw.store.accept(events(12, age=30.0), source_name="orders")
        gw.store.accept(events(3, age=0.0, source="billing"), source_name="billing")
        gw.store.set_cursor("orders", {"id": 12})
        gw.store.add_dead_letter(stage="scoring", error_class="ContractError", reason="bad", payload="{}",
                                 source_name="orders")
        gw.wake_relay()
        wait_for(lambda: gw.store.count_scores() == 15, "15 scores")
        wait_for(lambda: (value(samples(gw.metrics_registry), "gateway_published_messages_total", role="scorer",
                                exchange=topo.scored_exchange, outcome="returned") or 0) == 15, "15 scored publishes")
        snap = samples(gw.metrics_registry)
    finally:
        gw.stop()
    # events out: the relay's confirms, by outcome
    assert value(snap, "gateway_published_messages_total", role="relay", exchange=topo.events_exchange,
                 outcome="ack") == 15
    assert value(snap, "gateway_published_messages_total", role="relay", exchange=topo.events_exchange,
                 outcome="nack") is None
    assert value(snap, "gateway_publish_confirm_seconds_count", role="relay") >= 1
    # end-to-end latency from the source time: 12 events 30 s old, 3 fresh ones
    assert value(snap, "gateway_event_source_to_scored_seconds_count", source="orders") == 12
    assert value(snap, "gateway_event_source_to_scored_seconds_count", source="billing") == 3
    assert 12 * 30.0 <= value(snap, "gateway_event_source_to_scored_seconds_sum", source="orders") < 12 * 60.0
    assert value(snap, "gateway_event_source_to_scored_seconds_bucket", source="orders", le="10.0") == 0
    assert value(snap, "gateway_event_source_to_scored_seconds_bucket", source="billing", le="10.0") == 3
    # ... and from the relay's publish
    assert value(snap, "gateway_event_published_to_scored_seconds_count", source="orders") == 12
    assert value(snap, "gateway_event_published_to_scored_seconds_sum", source="orders") < 12 * 10.0
    # outbox, dead letters, source lag (scrape-time, cache 0)
    assert value(snap, "gateway_outbox_pending") == 0
    assert value(snap, "gateway_outbox_oldest_pending_age_seconds") == 0
    assert value(snap, "gateway_dead_letters", stage="scoring", state="open") == 1
    assert value(snap, "gateway_dead_letters", stage="scoring", state="replayed") == 0
    lag = value(snap, "gateway_source_lag_seconds", source="orders")
    assert lag is not None and 0 <= lag < 30
    # queues (the in-process bus has no consumer count) and the existing breaker gauge
    assert value(snap, "gateway_queue_messages", queue=topo.scoring_queue) == 0
    assert value(snap, "gateway_breaker_state", breaker="scorer:guard") == 0
    assert value(snap, "gateway_collector_up", collector="store") == 1
    assert value(snap, "gateway_collector_up", collector="queues") == 1


def test_pending_events_show_as_outbox_backlog_and_queue_depth(tmp_path: Path, bus_prefix: str) -> None:
    from gateway.store import engine_from_settings
    from gateway.store.migrate import upgrade

    settings = gateway_settings(tmp_path)
    engine = engine_from_settings(settings.store)
    upgrade(engine)
    store = EventStore(engine)
    store.accept(events(4, age=100.0), source_name="orders")
    registry = CollectorRegistry()
    registry.register(StoreCollector(store, ttl=0))
    topo = Topology.from_settings(BusSettings(prefix=bus_prefix))
    bus = InMemoryBus(topo)
    bus.declare_topology()
    bus.publisher().publish(topo.events_exchange, [Message(b"{}", "com.acme.x", "m1"), Message(b"{}", "com.acme.y", "m2")])
    registry.register(QueueCollector(bus, [q.name for q in topo.queues()] + ["not-declared"], ttl=0))
    snap = samples(registry)
    assert value(snap, "gateway_outbox_pending") == 4
    assert value(snap, "gateway_outbox_oldest_pending_age_seconds") >= 0  # accepted just now
    assert value(snap, "gateway_queue_messages", queue=topo.scoring_queue) == 2
    assert value(snap, "gateway_queue_messages", queue="not-declared") is None
    engine.dispose()


def test_runner_counters_are_summed_per_source() -> None:
    def runner(name: str, accepted: int, dup: int, rej: int, polls: int) -> Any:
        return SimpleNamespace(status=SimpleNamespace(name=name, events_accepted=accepted, duplicates=dup,
                                                      rejected=rej, polls=polls))

    runners = [runner("orders", 5, 1, 0, 3), runner("orders", 2, 0, 1, 1), runner("soap", 7, 0, 0, 2)]
    registry = CollectorRegistry()
    registry.register(RunnersCollector(lambda: runners))
    snap = samples(registry)
    assert value(snap, "gateway_source_events_total", source="orders", outcome="accepted") == 7
    assert value(snap, "gateway_source_events_total", source="orders", outcome="duplicate") == 1
    assert value(snap, "gateway_source_events_total", source="orders", outcome="rejected") == 1
    assert value(snap, "gateway_source_events_total", source="soap", outcome="accepted") == 7
    assert value(snap, "gateway_source_polls_total", source="orders") == 4


def test_scrape_time_reads_are_cached_and_a_failing_backend_never_fails_the_scrape() -> None:
    now = [0.0]
    calls: list[int] = []

    def read() -> int:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("store down")
        return len(calls)

    cache = Cached(read, ttl=5.0, clock=lambda: now[0])
    assert cache.get() == 1 and cache.get() == 1 and len(calls) == 1
    now[0] = 5.0
    assert cache.get() == 2
    now[0] = 10.0
    assert cache.get() is None and cache.ok is False

    class Broken:
        def pending_stats(self) -> Any:
            raise RuntimeError("no store")

    registry = CollectorRegistry()
    registry.register(StoreCollector(Broken(), ttl=0))
    snap = samples(registry)
    assert value(snap, "gateway_collector_up", collector="store") == 0
    assert value(snap, "gateway_outbox_pending") is None


def test_the_hot_path_wrappers_cost_microseconds_per_event(tmp_path: Path) -> None:
    """The relay's publisher and the scorers' store wrappers: measured per event against the bare call."""
    n, rounds = 500, 40
    topo = Topology.from_settings(BusSettings(prefix="perf"))
    bus = InMemoryBus(topo)
    bus.declare_topology()
    metrics = PipelineMetrics(CollectorRegistry())
    msgs = [Message(b"{}", "nowhere.x", f"m{i}") for i in range(n)]
    bare, observed = bus.publisher(), ObservedPublisher(bus.publisher(), metrics, "relay")

    def per_event(fn: Callable[[], Any]) -> float:
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(rounds):
                fn()
            best = min(best, (time.perf_counter() - t) / (rounds * n))
        return best

    base = per_event(lambda: bare.publish("perf.dlx", msgs).result())
    wrapped = per_event(lambda: observed.publish("perf.dlx", msgs).result())

    class NullStore:
        def save_scores(self, records: Any) -> int:
            return len(records)

    t0 = utcnow()
    records = [ScoreRecord(f"e{i}", "m", "1", 0.5, None, "t", "orders", t0 - timedelta(seconds=3), t0) for i in range(n)]
    scoring = ObservedStore(NullStore(), metrics)
    latency = per_event(lambda: scoring.save_scores(records))
    print(f"\npublish: {base * 1e6:.2f} us/event bare, {(wrapped - base) * 1e6:.3f} us/event added; "
          f"latency observation: {latency * 1e6:.2f} us/event")
    assert wrapped - base < 2e-6  # counting outcomes: a tally per batch, not a metric call per message
    assert latency < 10e-6
    assert metrics.source_latency.labels("orders")._sum.get() == pytest.approx(3.0 * n * rounds * 5)
