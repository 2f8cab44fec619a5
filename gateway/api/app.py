"""The FastAPI application factory. Nothing is created at import time."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from gateway import __version__
from gateway.api.auth import AuthGateMiddleware, Authenticator
from gateway.api.deps import ApiMetrics
from gateway.api.limits import BacklogGuard, BodySizeLimitMiddleware
from gateway.api.problems import install_problem_handlers
from gateway.api.routers import audit, dead_letters, events, health, keys, scoring, sources, stream
from gateway.bus.protocols import Bus
from gateway.config import Settings
from gateway.store import EventStore

__all__ = ["create_app", "API_TITLE"]

API_TITLE = "legacy-gateway API"

_DESCRIPTION = """\
Accept CloudEvents 1.0 (structured JSON mode) into the gateway's outbox and read stored events with
their lineage, delivery state and scores; stream new scored events (Server-Sent Events); manage
sources (status, pause, resume, run now, cursor with a preview); inspect, replay and delete dead letters. Errors are RFC 9457 problem details
(`application/problem+json`). Operational endpoints (`/healthz`, `/readyz`, `/metrics`) live
outside `/v1` and need no key.

Every `/v1` route needs an API key (unless `api.auth` is off): `Authorization: Bearer gw_...`, from
`gateway keys create` or `POST /v1/keys`. 401: no, a malformed, an unknown or a revoked key;
403: the key lacks the route's scope (`events:write`, `events:read`, `sources:admin`, `admin`);
404: also for another source's event when the key is limited to some sources; 429 with
`Retry-After`: the key is over its rate limit.
"""


def create_app(
    settings: Settings,
    store: EventStore,
    bus: Bus | None = None,
    *,
    on_accept: Callable[[], None] | None = None,
    registry: CollectorRegistry | None = None,
    tracing: Any | None = None,
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
        tracing: the :class:`~gateway.observability.tracing.Tracing` for request spans; default: the
            process's, from ``settings.observability`` (None when tracing is off).

    Returns:
        The FastAPI application. Collaborators are on ``app.state`` and reached through the
        dependency functions of :mod:`gateway.api.deps`.
    
    Raises:
        ConfigurationError: ``api.auth`` is on, the profile is prod and ``api.key_secret`` is unset.
    """
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        stream.close_stream_hub(app)  # ends open /v1/events/stream responses

    app = FastAPI(
        lifespan=lifespan,
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
    app.state.authenticator = Authenticator(settings, store)
    from gateway.governance import Governance

    app.state.governance = Governance.from_settings(settings, store)  # PII and contracts on REST ingest

    install_problem_handlers(app)
    # Inner to the body limit: 401 before any route reads (and validates) its body.
    app.add_middleware(AuthGateMiddleware)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.api.max_body_bytes)
    # Outermost: every answer (a 413 too) gets the request's correlation id (and a span with the otel extra).
    from gateway.observability.http import RequestContextMiddleware
    from gateway.observability.tracing import process_tracing

    app.add_middleware(
        RequestContextMiddleware, tracing=tracing if tracing is not None else process_tracing(settings.observability)
    )
    app.include_router(stream.router, prefix="/v1")  # before events: /events/stream is not an /{event_id}
    app.include_router(events.router, prefix="/v1")
    app.include_router(sources.router, prefix="/v1")
    app.include_router(dead_letters.router, prefix="/v1")
    app.include_router(scoring.router, prefix="/v1")
    app.include_router(keys.router, prefix="/v1")
    app.include_router(audit.router, prefix="/v1")
    app.include_router(health.router)
    return app
