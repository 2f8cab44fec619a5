"""Scale-out: two relay and three scorer processes share one PostgreSQL store and one RabbitMQ.

Real ``python -m gateway worker --role relay|scorer`` subprocesses (the chaos harness's process
machinery), one YAML config in tmp_path, a unique bus prefix and a fresh database. N events are
accepted into the outbox through ``EventStore.accept`` in batches while the workers run. Checks:

* every accepted event has exactly one row in ``scores``, all for the same model;
* a client queue bound to ``<prefix>.scored`` receives one scored event per accepted event, each
  original id exactly once (no crash here, so at-least-once must not show a duplicate);
* each relay process published some events and each scorer process scored some, read from each
  process's own Prometheus ``/metrics`` (``resilience.metrics_port``; the counters are per process):
  ``gateway_published_messages_total{role="relay",outcome="ack"}`` and
  ``gateway_scoring_events_total{outcome="scored"}``; the relays' sum must equal N and the
  scorers' sum N, so a process cannot be credited with another's work.

The throughput (events/s from the first acceptance to the arrival of the last scored event at the
client queue) is printed; bench/README.md ("Scale-out") keeps the last figure.
"""

from __future__ import annotations

import os
import random
import re
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from gateway.events import Event, event_id, utcnow
from gateway.store import EventStore, make_engine
from gateway.store.schema import scores
from tests.chaos.harness import (
    GatewayProc,
    Processes,
    ScoredSink,
    gateway_config,
    migrate,
    wait_for,
    write_config,
)

# Bounded: the whole test (five process starts, 20,000 events, checks) within two minutes.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(120)]

#: Events per run (``GATEWAY_SCALE_OUT_EVENTS`` overrides, e.g. for a longer local run).
EVENTS = int(os.environ.get("GATEWAY_SCALE_OUT_EVENTS", "20000"))
BATCH = 1000
RELAYS = 2
SCORERS = 3
SOURCE = "scale-out"


class _ArrivalTimes(dict):  # type: ignore[type-arg]
    """``ScoredSink.by_event`` that also notes when each original event first arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.first_seen: dict[str, float] = {}

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self.first_seen[key] = time.monotonic()
        return super().setdefault(key, default)


def _free_port(rng: random.Random) -> int:
    """A port free right now, below the kernel's ephemeral range (32768+), where other processes'
    outgoing connections cannot take it between this check and the worker's bind.

    ``resilience.metrics_port: 0`` means "off", so the test has to choose; a worker that still
    loses the race is restarted on another port (:func:`_start_worker`).
    """
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))  # where the worker's metrics server binds
            except OSError:
                continue
            return port
    raise AssertionError("no free port in 20000-32000")


def _start_worker(procs: Processes, role: str, config: Path, name: str, rng: random.Random) -> tuple[GatewayProc, int]:
    """Start one worker with its own metrics port and wait until it runs (at most 3 ports tried).

    Waits for the JSON log lines themselves: a crash traceback quotes the source line
    ``log.info("gateway running roles: ...")``, which would satisfy a bare pattern.
    """
    for _attempt in range(3):
        port = _free_port(rng)
        # Env overrides of the YAML (GATEWAY_<SECTION>__<KEY>): one metrics port per process.
        proc = procs.worker(role, config, name, GATEWAY_RESILIENCE__METRICS_PORT=str(port)).start()

        def state(proc: GatewayProc = proc, port: int = port) -> str | None:
            text = proc.log_text()
            if "Address already in use" in text:
                return "port-taken"
            if re.search(rf'"message":"metrics on http://[^"]*:{port}/metrics"', text) and re.search(
                r'"message":"gateway running roles: ', text
            ):
                return "running"
            if not proc.alive:
                raise AssertionError(f"{name} exited ({proc.poll()}) while starting:\n{proc.tail()}")
            return None

        if wait_for(state, 90, f"{name} to run with metrics on port {port}") == "running":
            return proc, port
        proc.kill()
    raise AssertionError(f"{name}: three metrics ports taken in a row")


def _metric(port: int, name: str, **labels: str) -> float:
    """Sum of the samples of counter ``name`` (``_total`` sample) matching ``labels`` on one process."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:  # loopback
        text = resp.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def _events(n: int) -> list[Event]:
    now = utcnow()
    return [
        Event(
            id=event_id(SOURCE, "order", i, 1), source=f"/legacy-gateway/sources/{SOURCE}",
            type="com.acme.order.changed", time=now, subject=f"order/{i}",
            data={"order_id": i, "amount": float(10 + i % 997), "currency": "EUR", "status": "NEW" if i % 3 else "PAID"},
            extensions={"sourcename": SOURCE},
        )
        for i in range(n)
    ]




def test_two_relays_three_scorers_score_every_event_once(
    tmp_path: Path, pg_db_url: str, amqp_url: str, chaos_bus: str, procs: Processes
) -> None:
    migrate(pg_db_url)
    doc = gateway_config(pg_db_url, amqp_url, chaos_bus, relay={"batch_size": 500, "claim_seconds": 10.0})
    config = write_config(tmp_path / "gateway.yaml", doc)
    sink = ScoredSink(amqp_url, chaos_bus)  # bound before any event is published
    sink.by_event = _ArrivalTimes()

    rng = random.Random()
    ports: dict[str, int] = {}
    workers: list[GatewayProc] = []
    for role, count in (("relay", RELAYS), ("scorer", SCORERS)):
        for k in range(1, count + 1):
            proc, ports[f"{role}{k}"] = _start_worker(procs, role, config, f"{role}{k}", rng)
            workers.append(proc)

    engine = make_engine(pg_db_url)
    try:
        store = EventStore(engine)
        batch = _events(EVENTS)
        ids = {e.id for e in batch}
        assert len(ids) == EVENTS
        t_first_accept = time.monotonic()
        for start in range(0, EVENTS, BATCH):
            result = store.accept(batch[start:start + BATCH], source_name=SOURCE)
            assert len(result.inserted) == min(BATCH, EVENTS - start), result.duplicates[:3]
        accepted_s = time.monotonic() - t_first_accept

        sink.drain_until(EVENTS, timeout=100)
        arrivals = sink.by_event.first_seen
        elapsed = max(arrivals.values()) - t_first_accept
        throughput = EVENTS / elapsed

        # Every event scored exactly once, by one model.
        with engine.connect() as c:
            rows = c.execute(
                select(scores.c.event_id, scores.c.model_name, func.count()).group_by(scores.c.event_id, scores.c.model_name)
            ).all()
        assert {r.event_id for r in rows} == ids, "scores do not cover exactly the accepted events"
        assert len({r.model_name for r in rows}) == 1, f"several models scored: {sorted({r.model_name for r in rows})}"
        doubled = [(r.event_id, r[2]) for r in rows if r[2] != 1]
        assert not doubled, f"{len(doubled)} events scored more than once, e.g. {doubled[:5]}"

        # Every original id exactly once at the sink, and nothing else.
        assert set(sink.by_event) == ids, f"sink: {len(set(sink.by_event) - ids)} unknown, {len(ids - set(sink.by_event))} missing"
        copies = {e: len(v) for e, v in sink.by_event.items() if len(v) != 1}
        assert not copies, f"{len(copies)} events arrived more than once at the sink, e.g. {list(copies.items())[:5]}"
        assert not sink.republished, f"scored-event ids delivered twice: {list(sink.republished.items())[:5]}"

        # Each process did its share; the per-process counters add up to N on each side.
        def shares() -> tuple[dict[str, float], dict[str, float]]:
            relay = {n: _metric(p, "gateway_published_messages_total", role="relay", outcome="ack")
                     for n, p in ports.items() if n.startswith("relay")}
            scorer = {n: _metric(p, "gateway_scoring_events_total", outcome="scored")
                      for n, p in ports.items() if n.startswith("scorer")}
            return relay, scorer

        # The sink has every event, but a counter may be bumped just after the publish it counts.
        def settled() -> tuple[dict[str, float], dict[str, float]] | None:
            relay, scorer = shares()
            return (relay, scorer) if sum(relay.values()) >= EVENTS and sum(scorer.values()) >= EVENTS else None

        relayed, scored = wait_for(settled, 15, f"per-process counters adding up to {EVENTS}")
        print(f"\nscale-out: {EVENTS} events, {RELAYS} relays, {SCORERS} scorers: accepted in {accepted_s:.1f} s; "
              f"first acceptance -> last scored event at the sink {elapsed:.1f} s = {throughput:,.0f} events/s")
        print(f"scale-out: published per relay {relayed}; scored per scorer {scored}")
        assert sum(relayed.values()) == EVENTS, relayed
        assert sum(scored.values()) == EVENTS, scored
        assert all(v > 0 for v in relayed.values()), f"a relay published nothing: {relayed}"
        assert all(v > 0 for v in scored.values()), f"a scorer scored nothing: {scored}"
        for w in workers:
            assert w.alive, f"{w.name} exited ({w.poll()}):\n{w.tail()}"
    finally:
        engine.dispose()
