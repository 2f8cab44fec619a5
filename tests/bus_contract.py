"""Behaviour every :class:`gateway.bus.Bus` must show, run against each implementation.

Subclass :class:`BusContract` and implement :meth:`BusContract.make_bus`; the subclass may add
fixtures (for example to delete broker objects after each test).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gateway.bus import Bus, Consumer, Delivery, Message, Outcome, Topology

__all__ = ["BusContract", "make_messages", "drain", "wait_for"]

BusFactory = Callable[..., Bus]


def make_messages(n: int, routing_key: str = "com.acme.order.changed", start: int = 0) -> list[Message]:
    """``n`` small messages with distinct ids ``m<start>...``."""
    return [
        Message(body=b'{"n": %d}' % i, routing_key=routing_key, message_id=f"m{i}", headers={"seq": i})
        for i in range(start, start + n)
    ]


def drain(consumer: Consumer, *, ack: bool = True, idle: float = 0.5, limit: int = 100_000) -> list[Delivery]:
    """Consume until nothing arrives for ``idle`` s; ack each batch when ``ack``."""
    out: list[Delivery] = []
    while len(out) < limit:
        batch = consumer.get_batch(200, idle, 0.01)
        if not batch:
            break
        out.extend(batch)
        if ack:
            consumer.ack(batch)
    return out


def wait_for(consumer: Consumer, n: int, timeout: float = 10.0) -> list[Delivery]:
    """Exactly-up-to ``n`` deliveries, waiting up to ``timeout`` s in total."""
    out: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out.extend(consumer.get_batch(n - len(out), min(0.5, max(0.0, deadline - time.monotonic())), 0.01))
    return out


class BusContract:
    """Shared contract tests. Subclasses implement :meth:`make_bus`."""

    def make_bus(self, prefix: str, *, delivery_limit: int = 5, max_queue_length: int | None = None) -> Bus:
        """A new, not yet declared bus whose names start with ``prefix``."""
        raise NotImplementedError

    @pytest.fixture
    def new_bus(self, bus_prefix: str) -> Iterator[BusFactory]:
        """Factory of declared buses on this test's prefix; closes them at teardown."""
        made: list[Bus] = []

        def factory(**kwargs: Any) -> Bus:
            bus = self.make_bus(bus_prefix, **kwargs)
            made.append(bus)
            bus.declare_topology()
            return bus

        yield factory
        for bus in made:
            bus.close()

    @pytest.fixture
    def bus(self, new_bus: BusFactory) -> Bus:
        return new_bus()

    @staticmethod
    def topo(bus: Bus) -> Topology:
        return bus.topology  # type: ignore[attr-defined,no-any-return]

    # -- publishing
    def test_publish_is_delivered_intact(self, bus: Bus) -> None:
        t = self.topo(bus)
        msg = Message(
            body=b'{"id": 1, "text": "h\xc3\xa9"}', routing_key="com.acme.order.changed", message_id="evt-1",
            headers={"ce-source": "legacy/erp", "attempt": 2, "ok": True},
        )
        pub = bus.publisher()
        assert pub.publish(t.events_exchange, [msg]).result(10) == [Outcome.ACK]
        con = bus.consumer(t.scoring_queue, 10)
        got = wait_for(con, 1)
        assert len(got) == 1
        d = got[0]
        assert (d.body, d.routing_key, d.message_id, d.redelivered) == (msg.body, msg.routing_key, "evt-1", False)
        assert {k: d.headers[k] for k in msg.headers} == dict(msg.headers)
        assert d.delivery_count == 0
        con.ack(got)
        assert con.get_batch(10, 0.3, 0.0) == []

    def test_unroutable_message_is_returned(self, bus: Bus) -> None:
        t = self.topo(bus)
        out = bus.publisher().publish(t.scored_exchange, make_messages(3, routing_key="no.queue.bound"))
        assert out.result(10) == [Outcome.RETURNED] * 3

    def test_mixed_batch_keeps_order_of_outcomes(self, bus: Bus) -> None:
        t = self.topo(bus)
        pub = bus.publisher()
        routed = pub.publish(t.events_exchange, make_messages(2)).result(10)
        returned = pub.publish(t.scored_exchange, make_messages(1, start=2)).result(10)
        assert routed + returned == [Outcome.ACK, Outcome.ACK, Outcome.RETURNED]

    def test_every_message_acked_and_empty_batch(self, bus: Bus) -> None:
        t = self.topo(bus)
        pub = bus.publisher()
        assert pub.publish(t.events_exchange, []).result(5) == []
        outcomes = pub.publish(t.events_exchange, make_messages(250)).result(20)
        assert outcomes.count(Outcome.ACK) == 250 == len(outcomes)

    def test_5000_messages_exactly_once(self, bus: Bus) -> None:
        t = self.topo(bus)
        pub = bus.publisher()
        futures = [pub.publish(t.events_exchange, make_messages(500, start=i)) for i in range(0, 5000, 500)]
        outcomes = [o for f in futures for o in f.result(30)]
        assert outcomes == [Outcome.ACK] * 5000
        con = bus.consumer(t.scoring_queue, 1000)
        got = drain(con)
        ids = [d.message_id for d in got]
        assert len(ids) == 5000
        assert set(ids) == {f"m{i}" for i in range(5000)}
        assert con.get_batch(100, 0.3, 0.0) == []
        con.close()
        assert bus.queue_depth(t.scoring_queue) == 0  # type: ignore[attr-defined]

    # -- rejecting and dead-lettering
    def test_reject_without_requeue_dead_letters_with_x_death(self, bus: Bus) -> None:
        t = self.topo(bus)
        bus.publisher().publish(t.events_exchange, make_messages(1)).result(10)
        con = bus.consumer(t.scoring_queue, 10)
        (d,) = wait_for(con, 1)
        con.reject(d, requeue=False)
        dead = bus.consumer(t.dead_letter_queue, 10)
        (dl,) = wait_for(dead, 1)
        assert dl.message_id == d.message_id and dl.body == d.body
        death = dl.headers["x-death"][0]
        assert death["reason"] == "rejected"
        assert death["queue"] == t.scoring_queue
        assert dl.headers["seq"] == 0  # original headers survive
        dead.ack([dl])
        assert con.get_batch(10, 0.3, 0.0) == []

    def test_requeue_beyond_delivery_limit_dead_letters(self, new_bus: BusFactory) -> None:
        limit = 2
        bus = new_bus(delivery_limit=limit)
        t = self.topo(bus)
        bus.publisher().publish(t.events_exchange, make_messages(1)).result(10)
        con = bus.consumer(t.scoring_queue, 10)
        seen: list[Delivery] = []
        for _ in range(limit + 3):
            got = con.get_batch(1, 1.5, 0.0)
            if not got:
                break
            seen.extend(got)
            con.reject(got[0], requeue=True)
        # Quorum queues (3.10) count requeues: the first delivery plus ``limit`` redeliveries.
        assert len(seen) == limit + 1
        assert [d.redelivered for d in seen] == [False] + [True] * limit
        assert seen[-1].delivery_count == limit
        dead = bus.consumer(t.dead_letter_queue, 10)
        (dl,) = wait_for(dead, 1)
        assert dl.message_id == "m0"
        assert dl.headers["x-death"][0]["reason"] == "delivery_limit"
        dead.ack([dl])

    def test_close_with_unacked_redelivers_to_next_consumer(self, bus: Bus) -> None:
        t = self.topo(bus)
        bus.publisher().publish(t.events_exchange, make_messages(3)).result(10)
        first = bus.consumer(t.scoring_queue, 10)
        got = wait_for(first, 3)
        assert sorted(d.message_id for d in got) == ["m0", "m1", "m2"]
        assert not any(d.redelivered for d in got)
        first.close()
        second = bus.consumer(t.scoring_queue, 10)
        again = wait_for(second, 3)
        assert sorted(d.message_id for d in again) == ["m0", "m1", "m2"]
        assert all(d.redelivered for d in again)
        second.ack(again)
        assert second.get_batch(10, 0.3, 0.0) == []

    def test_acks_of_a_closed_consumer_are_ignored(self, bus: Bus) -> None:
        t = self.topo(bus)
        bus.publisher().publish(t.events_exchange, make_messages(2)).result(10)
        first = bus.consumer(t.scoring_queue, 10)
        got = wait_for(first, 2)
        first.close()
        first.ack(got)  # too late: must neither raise nor ack anything
        second = bus.consumer(t.scoring_queue, 10)
        again = wait_for(second, 2)
        second.ack(again)
        assert sorted(d.message_id for d in again) == ["m0", "m1"]

    def test_partial_acks_out_of_order(self, bus: Bus) -> None:
        t = self.topo(bus)
        bus.publisher().publish(t.events_exchange, make_messages(6)).result(10)
        con = bus.consumer(t.scoring_queue, 10)
        got = wait_for(con, 6)
        con.ack([got[1], got[4]])  # not a prefix: individual acks
        con.ack([got[0]])
        con.ack(got[2:4] + got[5:])
        con.close()
        assert self.topo(bus) and bus.queue_depth(t.scoring_queue) == 0  # type: ignore[attr-defined]

    def test_prefetch_bounds_unacked_deliveries(self, bus: Bus) -> None:
        t = self.topo(bus)
        bus.publisher().publish(t.events_exchange, make_messages(20)).result(10)
        con = bus.consumer(t.scoring_queue, 5)
        first = wait_for(con, 5)
        assert len(first) == 5
        assert con.get_batch(20, 0.3, 0.0) == []  # nothing more until we ack
        con.ack(first)
        rest = drain(con)
        assert len(rest) == 15

    # -- backpressure
    def test_max_length_reject_publish_nacks(self, new_bus: BusFactory) -> None:
        bus = new_bus(max_queue_length=5)
        t = self.topo(bus)
        pub = bus.publisher()
        outcomes = [pub.publish(t.events_exchange, [m]).result(10)[0] for m in make_messages(8)]
        # Quorum queues on RabbitMQ 3.10 check the limit after enqueueing, so they accept one
        # message over x-max-length; classic queues and the in-process bus are exact.
        accepted = outcomes.count(Outcome.ACK)
        assert accepted in (5, 6)
        assert outcomes == [Outcome.ACK] * accepted + [Outcome.NACK] * (8 - accepted)
        assert bus.queue_depth(t.scoring_queue) == accepted  # type: ignore[attr-defined]

    def test_publish_after_close_is_lost(self, bus: Bus) -> None:
        t = self.topo(bus)
        pub = bus.publisher()
        pub.close()
        pub.close()  # idempotent
        assert pub.publish(t.events_exchange, make_messages(2)).result(5) == [Outcome.LOST] * 2

    def test_health(self, bus: Bus) -> None:
        h = bus.health()
        assert h.ok and h.kind == bus.kind
