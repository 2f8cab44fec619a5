"""Per-request correlation id (and OpenTelemetry SERVER span) for the REST API.

A pure ASGI middleware (no per-request task or body buffering). The correlation id is, in order:
the request's ``X-Request-ID`` when it is short and log-safe, the trace id of its W3C
``traceparent``, the trace id of the request's span when tracing is on, or a new random id. It is
bound for the request (every log line of the request carries it) and echoed in the response's
``X-Request-ID`` header. Register it in ``create_app``::

    app.add_middleware(RequestContextMiddleware, tracing=process_tracing(settings.observability))
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from gateway.observability.context import (
    bind_correlation,
    new_correlation_id,
    valid_correlation_id,
)
from gateway.observability.tracing import parse_traceparent

__all__ = ["REQUEST_ID_HEADER", "RequestContextMiddleware"]

REQUEST_ID_HEADER = "X-Request-ID"
_RAW_HEADER = REQUEST_ID_HEADER.lower().encode()


class RequestContextMiddleware:
    """Bind a correlation id per HTTP request and echo it as ``X-Request-ID``.

    Args:
        app: the ASGI app.
        tracing: a :class:`~gateway.observability.tracing.Tracing`, or ``None`` (no spans).
    """

    def __init__(self, app: Any, tracing: Any = None) -> None:
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())
                   if k in (_RAW_HEADER, b"traceparent", b"tracestate")}
        asked = headers.get(REQUEST_ID_HEADER.lower())
        method = scope.get("method", "GET")
        span_cm = self.tracing.server_span(method, headers) if self.tracing is not None else nullcontext(None)
        with span_cm as span:
            if valid_correlation_id(asked):
                cid = asked
            elif (parsed := parse_traceparent(headers.get("traceparent"))) is not None:
                cid = format(parsed[0], "032x")
            elif span is not None:
                cid = format(span.get_span_context().trace_id, "032x")
            else:
                cid = new_correlation_id()
            status = 500

            async def send_with_id(message: dict[str, Any]) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    message = {**message, "headers": [*message.get("headers", ()),
                                                      (_RAW_HEADER, cid.encode("latin-1"))]}
                await send(message)

            with bind_correlation(cid):
                try:
                    await self.app(scope, receive, send_with_id)
                finally:
                    if span is not None:
                        route = getattr(scope.get("route"), "path", None)
                        if route:
                            span.update_name(f"HTTP {method} {route}")
                            span.set_attribute("http.route", route)
                        span.set_attribute("http.response.status_code", status)
                        if status >= 500:
                            from opentelemetry.trace import Status, StatusCode

                            span.set_status(Status(StatusCode.ERROR))
