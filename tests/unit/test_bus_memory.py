"""The bus contract against the in-process bus."""

from __future__ import annotations

from gateway.bus import Bus, InMemoryBus, Topology
from tests.bus_contract import BusContract


class TestInMemoryBusContract(BusContract):
    def make_bus(self, prefix: str, *, delivery_limit: int = 5, max_queue_length: int | None = None) -> Bus:
        return InMemoryBus(Topology(prefix, delivery_limit, max_queue_length))


def test_a_queue_with_several_matching_bindings_gets_a_message_once(bus_prefix: str) -> None:
    # As on RabbitMQ: routing is per queue, not per binding.
    from gateway.bus import Message, Outcome, QueueSpec

    topo = Topology(bus_prefix)
    bus = InMemoryBus(topo)
    bus.declare_topology()
    bus.declare_queue(QueueSpec("q.both", {}, ((topo.scored_exchange, "#"), (topo.scored_exchange, "a.#"))))
    assert bus.publisher().publish(topo.scored_exchange, [Message(b"x", "a.b", "m1")]).result() == [Outcome.ACK]
    assert bus.queue_depth("q.both") == 1
