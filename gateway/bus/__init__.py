"""Message bus: RabbitMQ through pika, or the in-process bus; one Protocol over both."""

from gateway.bus.memory import InMemoryBus
from gateway.bus.protocols import Bus, BusHealth, Consumer, Delivery, Message, Outcome, Publisher
from gateway.bus.topology import QueueSpec, Topology, topic_matches

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


def bus_from_settings(settings: "BusSettings") -> Bus:  # type: ignore[name-defined]  # noqa: F821
    """RabbitMQ when ``settings.url`` is set, else the in-process bus."""
    topology = Topology.from_settings(settings)
    if settings.url is None:
        return InMemoryBus(topology)
    from gateway.bus.rabbitmq import RabbitBus

    return RabbitBus(settings, topology)
