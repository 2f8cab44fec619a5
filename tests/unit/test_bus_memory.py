"""The bus contract against the in-process bus."""

from __future__ import annotations

from gateway.bus import Bus, InMemoryBus, Topology
from tests.bus_contract import BusContract


class TestInMemoryBusContract(BusContract):
    def make_bus(self, prefix: str, *, delivery_limit: int = 5, max_queue_length: int | None = None) -> Bus:
        return InMemoryBus(Topology(prefix, delivery_limit, max_queue_length))
