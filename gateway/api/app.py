"""The FastAPI application factory. Nothing is created at import time."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from gateway import __version__
from gateway.api.deps import ApiMetrics
from gateway.api.limits import BacklogGuard, BodySizeLimitMiddleware
from gateway.api.problems import install_problem_handlers
from gateway.api.routers import dead_letters, events, health, scoring
from gateway.bus.protocols import Bus
from gateway.config import Settings
from gateway.store import EventStore

__all__ = ["create_app", "API_TITLE"]

API_TITLE = "legacy-gateway API"

_DESCRIPTION = """\
Accept CloudEvents 1.0 (structured JSON mode) into the gateway's outbox and read stored events with
their lineage, delivery state and scores; inspect, replay and delete dead letters. Errors are RFC 9457 problem details
(`application/problem+json`). Operational endpoints (`/healthz`, `/readyz`, `/metrics`) live
outside `/v1`.
"""


def create_app(
    settings: Settings,
    store: EventStore,
    bus: Bus | None = None,
    *,
    on_accept: Callable[[], None] | None = None,
    registry: CollectorRegistry | None = None,
) -> FastAPI:
    """Build the REST API.

    Args:
        settings: gateway settings; ``settings.api`` sets body, page and backlog limits.
        store: the event store (migrated).
        bus: the message bus, checked by ``/readyz`` when given.
        on_accept: called after a request's events were committed (wakes the in-process relay);
            its failures are logged, never reported to the client.
        registry: Prometheus registry for this app's metrics; a fresh one when omitted (never the
            process-global default, so several apps can live in one process).

    Returns:
        The FastAPI application. Collaborators are on ``app.state`` and reached through the
        dependency functions of :mod:`gateway.api.deps`.
    """
    app = FastAPI(
        title=API_TITLE,
        version=__version__,
        description=_DESCRIPTION,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.store = store
    app.state.bus = bus
    app.state.on_accept = on_accept
    app.state.metrics = ApiMetrics(registry if registry is not None else CollectorRegistry(), store)
    app.state.backlog_guard = BacklogGuard(settings.api.backlog_threshold)

    install_problem_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.api.max_body_bytes)
    app.include_router(events.router, prefix="/v1")
    app.include_router(dead_letters.router, prefix="/v1")
    app.include_router(scoring.router, prefix="/v1")
    app.include_router(health.router)
    return app
