"""The REST API: ``create_app`` builds a FastAPI app over an event store (and optionally a bus)."""

from gateway.api.app import create_app

__all__ = ["create_app"]
