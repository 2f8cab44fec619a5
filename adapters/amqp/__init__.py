"""The legacy-queue adapter (AMQP 0-9-1)."""

from adapters.amqp.source import AmqpSource, AmqpSourceConfig, Declare

__all__ = ["AmqpSource", "AmqpSourceConfig", "Declare"]
