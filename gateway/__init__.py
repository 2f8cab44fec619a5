"""legacy-gateway: legacy systems to CloudEvents, RabbitMQ and AI scoring."""

__version__ = "0.1.0"
__all__ = ["__version__"]
