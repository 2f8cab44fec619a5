"""Message bus: RabbitMQ through pika, or the in-process bus; one Protocol over both."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.bus.memory import InMemoryBus
from gateway.bus.protocols import Bus, BusHealth, Consumer, Delivery, Message, Outcome, Publisher
from gateway.bus.topology import QueueSpec, Topology, topic_matches

if TYPE_CHECKING:
    from gateway.config import BusSettings

__all__ = [
    "Bus",
    "BusHealth",
    "Consumer",
    "Delivery",
    "InMemoryBus",
    "Message",
    "Outcome",
    "Publisher",
    "QueueSpec",
    "Topology",
    "bus_from_settings",
    "topic_matches",
]


def bus_from_settings(settings: BusSettings, topology: Topology | None = None) -> Bus:
    """RabbitMQ when ``settings.url`` is set, else the in-process bus (``topology``: default from settings)."""
    topology = topology or Topology.from_settings(settings)
    if settings.url is None:
        return InMemoryBus(topology)
    from gateway.bus.rabbitmq import RabbitBus

    return RabbitBus(settings, topology)
