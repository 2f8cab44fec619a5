"""REL-01: the relay marks a row published only after the broker's ack."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future

import pytest

from gateway.bus import InMemoryBus, Message, Outcome, Topology
from gateway.bus.topology import QueueSpec
from gateway.config import RelaySettings
from gateway.events import Event, event_id, utcnow
from gateway.relay import Relay
from gateway.store import EventStore


def _events(n: int, type_: str = "com.acme.order.changed") -> list[Event]:
    return [
        Event(id=event_id("s", "e", i, 1), source="/s", type=type_, time=utcnow(), data={"i": i}, extensions={"sourcename": "s"})
        for i in range(n)
    ]


class ScriptedPublisher:
    """Resolves each publish with scripted outcomes (a fake channel's nack/return/loss)."""

    def __init__(self, outcome: Outcome | None = None, raise_exc: Exception | None = None, never: bool = False) -> None:
        self.outcome, self.raise_exc, self.never = outcome, raise_exc, never
        self.sent: list[Message] = []

    def publish(self, exchange: str, messages: Sequence[Message]) -> Future[list[Outcome]]:
        self.sent.extend(messages)
        fut: Future[list[Outcome]] = Future()
        if self.raise_exc is not None:
            fut.set_exception(self.raise_exc)
        elif not self.never:
            fut.set_result([self.outcome or Outcome.ACK] * len(messages))
        return fut

    def close(self) -> None:
        pass


TOPO = Topology("t")


def _run_until_published(relay: Relay, store: EventStore, n: int, polls: int = 400) -> threading.Thread:
    """Run the relay in a thread until ``n`` rows are published (or ``polls`` run out); stop it."""
    stop = threading.Event()
    t = threading.Thread(target=relay.run, args=(stop,))
    t.start()
    try:
        for _ in range(polls):
            if store.stats()["published"] == n:
                break
            stop.wait(0.01)
    finally:
        stop.set()
        t.join(5)
    return t


@pytest.mark.parametrize(
    "publisher",
    [
        ScriptedPublisher(Outcome.NACK),
        ScriptedPublisher(Outcome.RETURNED),
        ScriptedPublisher(Outcome.LOST),
        ScriptedPublisher(Outcome.TIMEOUT),
        ScriptedPublisher(raise_exc=ConnectionError("stream lost")),
        ScriptedPublisher(never=True),
    ],
    ids=["nack", "returned", "lost", "timeout", "exception", "no-confirm"],
)
def test_unconfirmed_rows_stay_pending_with_attempts(sqlite_store: EventStore, publisher: ScriptedPublisher) -> None:
    sqlite_store.accept(_events(5), source_name="s")
    relay = Relay(sqlite_store, publisher, TOPO, RelaySettings(retry_base_delay=0.01), publish_timeout=0.05)
    assert relay.run_once() == 5
    stats = sqlite_store.stats()
    assert stats["pending"] == 5 and stats["published"] == 0
    assert all(sqlite_store.get_event(e.id).attempts == 1 for e in _events(5))  # type: ignore[union-attr]
    assert relay.stats.failed == 5
    if publisher.outcome is Outcome.RETURNED:
        assert relay.stats.returned == 5  # the alert counter


def test_ack_marks_published_with_message_properties(sqlite_store: EventStore) -> None:
    pub = ScriptedPublisher(Outcome.ACK)
    evs = _events(3)
    sqlite_store.accept(evs, source_name="s")
    relay = Relay(sqlite_store, pub, TOPO, RelaySettings())
    relay.run_once()
    assert sqlite_store.stats()["published"] == 3
    assert [m.message_id for m in pub.sent] == [e.id for e in evs]
    assert pub.sent[0].routing_key == "com.acme.order.changed"
    assert Event.from_json(pub.sent[0].body) == evs[0]


def test_backoff_is_full_jitter_and_capped() -> None:
    import random

    relay = Relay(None, ScriptedPublisher(), TOPO, RelaySettings(retry_base_delay=0.5, retry_max_delay=8), rng=random.Random(1))  # type: ignore[arg-type]
    for attempts in range(1, 12):
        cap = min(8.0, 0.5 * 2 ** (attempts - 1))
        delays = [relay.delay_for(attempts) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > cap * 0.8  # spread over the whole range, not a fixed delay


def test_relay_thread_delivers_and_unroutable_then_routable(sqlite_store: EventStore) -> None:
    bus = InMemoryBus(TOPO)
    bus.declare_topology()
    sqlite_store.accept(_events(50), source_name="s")
    relay = Relay(sqlite_store, bus.publisher(), TOPO, RelaySettings(batch_size=7, idle_wait=0.01))
    _run_until_published(relay, sqlite_store, 50)
    assert sqlite_store.stats()["published"] == 50
    assert bus.queue_depth(TOPO.scoring_queue) == 50


def test_unroutable_stays_pending_until_a_queue_is_bound(sqlite_store: EventStore) -> None:
    bus = InMemoryBus(TOPO)
    bus.declare_exchange(TOPO.events_exchange, "topic")  # no queue bound yet
    sqlite_store.accept(_events(3), source_name="s")
    relay = Relay(sqlite_store, bus.publisher(), TOPO, RelaySettings(retry_base_delay=0.001, retry_max_delay=0.001))
    relay.run_once()
    assert sqlite_store.stats()["pending"] == 3 and relay.stats.returned == 3
    bus.declare_queue(QueueSpec("late", {}, ((TOPO.events_exchange, "#"),)))
    threading.Event().wait(0.01)
    relay.run_once()
    assert sqlite_store.stats()["published"] == 3


def test_relay_outlives_store_outages(sqlite_store: EventStore) -> None:
    from gateway.errors import StoreUnavailableError

    class FlakyStore:
        def __init__(self, inner: EventStore) -> None:
            self.inner, self.failures = inner, 2

        def claim_pending(self, *a, **kw):  # type: ignore[no-untyped-def]
            if self.failures:
                self.failures -= 1
                raise StoreUnavailableError("claim_pending failed: OperationalError")
            return self.inner.claim_pending(*a, **kw)

        def __getattr__(self, name):  # type: ignore[no-untyped-def]
            return getattr(self.inner, name)

    bus = InMemoryBus(TOPO)
    bus.declare_topology()
    sqlite_store.accept(_events(20), source_name="s")
    flaky = FlakyStore(sqlite_store)
    relay = Relay(flaky, bus.publisher(), TOPO, RelaySettings(idle_wait=0.01))  # type: ignore[arg-type]
    t = _run_until_published(relay, sqlite_store, 20)
    assert not t.is_alive()
    assert relay.stats.errors == 2 and flaky.failures == 0
    assert sqlite_store.stats()["published"] == 20
