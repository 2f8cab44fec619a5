"""Acceptance (issue 7, remote scoring): a real scoring worker scores through a local OIP v2 server
over real loopback HTTP. When the server fails (HTTP 500) or is slower than the timeout, the
model's breaker opens and intake pauses, nothing is dead-lettered; when it recovers, every event is
scored exactly once, with the server's scores. With a fallback model configured, the fallback scores
while the breaker is open (nothing waits) and the primary takes over again after a half-open trial.

Needs no external service (the in-process bus, SQLite and a loopback HTTP server), so it runs
everywhere; it is marked ``integration`` because it runs the whole worker loop over the network.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from gateway.bus import InMemoryBus, Message, QueueSpec, Topology
from gateway.bus.retry import RetrySchedule
from gateway.config import ScoringSettings
from gateway.events import Event
from gateway.events.jsonsafe import loads
from gateway.resilience import BreakerPolicy, CircuitBreaker
from gateway.scoring import ScoringWorker
from gateway.scoring.oip import create
from gateway.scoring.resilience import scorer_breaker_policy
from gateway.store import EventStore
from tests.oip_server import OipServer
from tests.unit.test_scoring_worker import TEST_QUEUE, make_events

pytestmark = pytest.mark.integration

FEATURES = [{"name": "amount", "path": "data.amount", "type": "number"},
            {"name": "qty", "path": "data.qty", "type": "number", "default": 1}]
WAIT = 20.0  # generous upper bound for each phase; the run takes a few seconds


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def expected(ev: Event) -> float:
    """The local server's model: (amount + qty) / 100, qty defaulting to 1."""
    return (float(ev.data["amount"]) + 1.0) / 100.0


def _rig(bus_prefix: str, wait_in_open: float) -> tuple[RetrySchedule, Topology, InMemoryBus, CircuitBreaker]:
    """The in-process bus (with a test queue on the scored exchange) and the model's breaker."""
    schedule = RetrySchedule(min_delay=0.02, base_delay=0.05, max_delay=0.1, window=120.0)
    topo = Topology(bus_prefix, delivery_limit=1000, retry_ttls_ms=schedule.level_ttls_ms(100))
    bus = InMemoryBus(topo)
    bus.declare_topology()
    bus.declare_queue(QueueSpec(TEST_QUEUE, {}, ((topo.scored_exchange, "#"),)))
    breaker = CircuitBreaker("scorer:fraud", scorer_breaker_policy(BreakerPolicy(
        window_size=4, minimum_calls=4, failure_rate_threshold=50, wait_in_open=wait_in_open, half_open_permits=2,
        slow_call_duration=60.0,
    )))
    return schedule, topo, bus, breaker


def _sender(bus: InMemoryBus, topo: Topology) -> Callable[[list[Event]], None]:
    """Publish events to the events exchange, as the relay does."""
    publisher = bus.publisher()

    def send(batch: list[Event]) -> None:
        publisher.publish(topo.events_exchange, [Message(e.to_json(), e.type, e.id) for e in batch]).result(5)

    return send


def test_remote_scoring_opens_the_breaker_on_failure_and_slowness_and_recovers(
    bus_prefix: str, sqlite_store: EventStore
) -> None:
    schedule, topo, bus, breaker = _rig(bus_prefix, wait_in_open=0.2)
    opened = threading.Semaphore(0)
    transitions: list[str] = []

    def on_transition(name: str, old: object, new: object) -> None:
        transitions.append(getattr(new, "value", str(new)))
        if transitions[-1] == "open":
            opened.release()

    breaker.add_listener(on_transition)
    events = make_events(60)
    send = _sender(bus, topo)

    def dead() -> int:
        return len(sqlite_store.list_dead_letters()) + bus.queue_depth(topo.dead_letter_queue)

    with OipServer() as srv:
        scorer = create("fraud", {"url": srv.url, "model": "fraud", "features": FEATURES, "timeout": 0.3,
                                  "max_batch": 8}, ScoringSettings())
        consumer = bus.consumer(topo.scoring_queue, prefetch=16)
        worker = ScoringWorker(
            consumer, bus.publisher(), sqlite_store, scorer, topo, batch_max=16, batch_linger_ms=0,
            max_attempts=100, publish_timeout=2.0, retry=schedule, breaker=breaker, score_timeout=2.0, prefetch=16,
        )
        stop = threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop,), name="oip-worker")
        thread.start()
        try:
            # (1) The server works: scoring goes through it.
            send(events[:20])
            wait_for(lambda: sqlite_store.count_scores() == 20, "the first 20 scores")
            assert transitions == [] and worker.pauses == 0
            assert len(srv.infer_requests()) >= 2  # batches of at most 8 events

            # (2) HTTP 500: the breaker opens, intake pauses, nothing is dead-lettered.
            srv.fail(500)
            send(events[20:40])
            assert opened.acquire(timeout=WAIT), "the breaker did not open on HTTP 500"
            wait_for(lambda: worker.pauses >= 1, "intake to pause")
            assert sqlite_store.count_scores() == 20 and dead() == 0
            srv.recover()
            wait_for(lambda: sqlite_store.count_scores() == 40, "recovery after the 500s")
            wait_for(lambda: transitions[-1] == "closed", "the breaker to close")

            # (3) Slower than the 0.3 s timeout: the same.
            pauses = worker.pauses
            srv.slow(10.0)
            send(events[40:])
            assert opened.acquire(timeout=WAIT), "the breaker did not open on a slow server"
            wait_for(lambda: worker.pauses > pauses, "intake to pause again")
            assert sqlite_store.count_scores() == 40 and dead() == 0
            srv.recover()
            wait_for(lambda: sqlite_store.count_scores() == 60, "recovery after the slow spell")
        finally:
            stop.set()
            thread.join(10)
            srv.recover()
        assert not thread.is_alive()

    # Every event scored exactly once, with the server's score, and published once.
    assert dead() == 0 and worker.dead_lettered == 0
    stored = sqlite_store.get_scores([e.id for e in events], "fraud", "3")
    assert sorted(stored) == sorted(e.id for e in events)
    for ev in events:
        assert stored[ev.id].score == pytest.approx(expected(ev))
        assert stored[ev.id].explanation["features"]["amount"] == float(ev.data["amount"])
    out = bus.consumer(TEST_QUEUE, prefetch=1000)
    got = out.get_batch(1000, 0.5, 0.05)
    originals = [loads(d.body)["data"]["event"]["id"] for d in got]
    assert sorted(originals) == sorted(e.id for e in events)  # 60 scored events, one per event
    assert transitions.count("open") >= 2 and transitions[-1] == "closed"
    assert worker.retried > 0  # failed attempts went through the delayed retry, not in-process loops


def test_a_failing_or_slow_server_opens_the_breaker_the_fallback_scores_and_the_primary_returns(
    bus_prefix: str, sqlite_store: EventStore
) -> None:
    """The acceptance with a fallback: HTTP 500, then a server slower than the timeout, each open the
    breaker and a local rules model scores meanwhile (scored events say degraded); after each
    spell a half-open trial finds the server back and it scores again. No event waits, none is lost."""
    from gateway.scoring.routing import build_fallback

    schedule, topo, bus, breaker = _rig(bus_prefix, wait_in_open=0.5)
    transitions: list[str] = []
    breaker.add_listener(lambda _n, _o, new: transitions.append(new.value))
    fallback = build_fallback(ScoringSettings(
        model="fraud", fallback="guard",
        models={"guard": {"kind": "rules", "options": {"rules": [
            {"when": "data.amount > 12", "score": 0.7, "reason": "over 12"}], "default": 0.1}}},
    ))
    assert fallback is not None
    events = make_events(94)
    send = _sender(bus, topo)

    def scored(model: str, version: str, batch: list[Event]) -> int:
        return len(sqlite_store.get_scores([e.id for e in batch], model, version))

    with OipServer() as srv:
        scorer = create("fraud", {"url": srv.url, "model": "fraud", "features": FEATURES, "timeout": 0.3,
                                  "max_batch": 8}, ScoringSettings())
        worker = ScoringWorker(
            bus.consumer(topo.scoring_queue, prefetch=16), bus.publisher(), sqlite_store, scorer, topo, batch_max=16,
            batch_linger_ms=0, max_attempts=100, publish_timeout=2.0, retry=schedule, breaker=breaker,
            score_timeout=2.0, prefetch=16, fallback=fallback,
        )
        stop = threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop,), name="oip-fallback-worker")
        thread.start()
        try:
            send(events[:20])
            wait_for(lambda: scored("fraud", "3", events[:20]) == 20, "the primary's first scores")
            spells = ((lambda: srv.fail(500), events[20:50], events[80:82]),
                      (lambda: srv.slow(10.0), events[50:80], events[82:84]))
            for fault, batch, probe in spells:
                opened = transitions.count("open")
                fault()
                send(batch)
                wait_for(lambda: transitions.count("open") > opened, "the breaker to open")
                # Meanwhile the fallback scores: every event of the spell gets a score, none waits.
                wait_for(lambda: scored("guard", fallback.version, batch) + scored("fraud", "3", batch) == len(batch),
                         "every event of the spell scored")
                assert scored("guard", fallback.version, batch) > 0 and worker.pauses == 0
                srv.recover()
                wait_for(lambda: transitions[-1] == "half_open", "the wait in open to end")
                send(probe)  # traffic for the trial (without events the breaker just waits half-open)
                wait_for(lambda: transitions[-1] == "closed", "a half-open trial to close the breaker")
            send(events[84:])
            wait_for(lambda: scored("fraud", "3", events[84:]) == 10, "the primary after recovery")
        finally:
            stop.set()
            thread.join(10)
            srv.recover()
        assert not thread.is_alive()

    # One score per event (primary or fallback), one scored event per event; the degraded ones say so.
    assert worker.dead_lettered == 0 and sqlite_store.list_dead_letters() == []
    primary = sqlite_store.get_scores([e.id for e in events], "fraud", "3")
    degraded = sqlite_store.get_scores([e.id for e in events], "guard", fallback.version)
    assert not set(primary) & set(degraded) and len(primary) + len(degraded) == 94
    got = bus.consumer(TEST_QUEUE, prefetch=1000).get_batch(1000, 0.5, 0.05)
    published = [loads(d.body) for d in got]
    assert sorted(p["data"]["event"]["id"] for p in published) == sorted(e.id for e in events)
    assert {p["data"]["event"]["id"] for p in published if p.get("degraded") is True} == set(degraded)
