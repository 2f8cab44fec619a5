"""OpenTelemetry tracing, optional: ``pip install legacy-gateway[otel]``.

Off unless the extra is installed *and* enabled: ``observability.tracing: on``, or ``auto`` (the
default) with ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` set.
Without the extra nothing of OpenTelemetry is imported and nothing changes.

Spans (all in the tracer ``legacy-gateway``):

* ``HTTP <method> <route>`` (SERVER) per API request, child of the request's ``traceparent``
  header (:class:`~gateway.observability.http.RequestContextMiddleware`);
* ``publish <exchange>`` (PRODUCER) per relay or scorer publish batch, from publish to the last
  confirm, with the outcome counts;
* ``score <queue>`` (CONSUMER) per scoring micro-batch, from fetch to the next fetch.

A batch span is the child of nothing (a batch mixes many traces): it carries one *link* per
distinct event ``traceparent`` (at most :data:`MAX_LINKS`), so a trace backend shows the way from
an event's origin (its source poll or API request) to its relay batch and scoring batch.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter as _Tally
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from gateway.errors import ConfigurationError

__all__ = [
    "MAX_LINKS",
    "Tracing",
    "new_traceparent",
    "otel_installed",
    "parse_traceparent",
    "process_tracing",
    "setup_tracing",
    "tracing_wanted",
    "with_traceparent",
]

log = logging.getLogger("gateway.observability")

#: Links per batch span at most (a 5000-event batch should not make a 5000-link span).
MAX_LINKS = 32

_TP_TEXT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_TP_IN_BODY = re.compile(rb'"traceparent":\s*"([0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2})"')


def parse_traceparent(value: str | None) -> tuple[int, int, int] | None:
    """``(trace_id, span_id, flags)`` of a valid W3C ``traceparent`` (version 00), else ``None``."""
    m = _TP_TEXT.match(value or "")
    if m is None or m.group(1) == "ff" or set(m.group(2)) == {"0"} or set(m.group(3)) == {"0"}:
        return None
    return int(m.group(2), 16), int(m.group(3), 16), int(m.group(4), 16)


def new_traceparent() -> str:
    """A fresh sampled W3C ``traceparent`` (random trace and parent ids), for a source poll."""
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"


def with_traceparent(events: list[Any], traceparent: str) -> list[Any]:
    """``events`` where each one without a ``traceparent`` extension gets ``traceparent``.

    The source runner gives one per poll (one trace per batch): the event id does not depend on
    it, so re-reading a record still de-duplicates.
    """
    import dataclasses

    return [e if "traceparent" in e.extensions
            else dataclasses.replace(e, extensions={**e.extensions, "traceparent": traceparent}) for e in events]


def otel_installed() -> bool:
    """Whether the ``otel`` extra (the OpenTelemetry SDK) is importable, without importing it."""
    import importlib.util

    return importlib.util.find_spec("opentelemetry.sdk") is not None


def tracing_wanted(mode: str, environ: Mapping[str, str] | None = None) -> bool:
    """``on``, ``off``, or ``auto``: on when an OTLP endpoint is configured in the environment."""
    env = os.environ if environ is None else environ
    if mode == "auto":
        return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
    return mode == "on"


class Tracing:
    """The gateway's spans on one OpenTelemetry tracer provider.

    Args:
        provider: an ``opentelemetry.sdk.trace.TracerProvider`` (tests: with an in-memory exporter).
    """

    def __init__(self, provider: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import (
            TraceContextTextMapPropagator,
        )

        self.provider = provider
        self.tracer = provider.get_tracer("legacy-gateway")
        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()
        self._kinds = {"server": trace.SpanKind.SERVER, "producer": trace.SpanKind.PRODUCER,
                       "consumer": trace.SpanKind.CONSUMER}

    def _links(self, bodies: Iterable[bytes]) -> list[Any]:
        from opentelemetry.trace import Link, SpanContext, TraceFlags

        seen: dict[str, Any] = {}
        for body in bodies:
            m = _TP_IN_BODY.search(body)
            if m is None:
                continue
            tp = m.group(1).decode()
            if tp in seen:
                continue
            parsed = parse_traceparent(tp)
            if parsed is not None:
                seen[tp] = Link(SpanContext(parsed[0], parsed[1], is_remote=True, trace_flags=TraceFlags(parsed[2])))
                if len(seen) >= MAX_LINKS:
                    break
        return list(seen.values())

    def batch_span(self, name: str, kind: str, bodies: Iterable[bytes], destination: str) -> Any:
        """Start a batch span linked to the ``traceparent`` of each event body; end it with :meth:`end_batch_span`."""
        bodies = list(bodies)
        return self.tracer.start_span(
            name, kind=self._kinds[kind], links=self._links(bodies), context=self._trace.set_span_in_context(
                self._trace.INVALID_SPAN),
            attributes={"messaging.system": "rabbitmq", "messaging.destination.name": destination,
                        "messaging.batch.message_count": len(bodies)},
        )

    def end_batch_span(self, span: Any, outcomes: Iterable[Any] | None) -> None:
        """End a batch span, recording the publish outcomes when given (an error status if any is not ack)."""
        if outcomes is not None:
            tally = _Tally(getattr(o, "value", str(o)) for o in outcomes)
            for outcome, n in tally.items():
                span.set_attribute(f"gateway.outcome.{outcome}", n)
            if set(tally) - {"ack"}:
                from opentelemetry.trace import Status, StatusCode

                span.set_status(Status(StatusCode.ERROR, "not every message was confirmed"))
        span.end()

    @contextmanager
    def server_span(self, method: str, headers: Mapping[str, str]) -> Iterator[Any]:
        """A SERVER span for one request, child of its ``traceparent`` header; current inside the block."""
        ctx = self._propagator.extract(dict(headers))
        with self.tracer.start_as_current_span(f"HTTP {method}", context=ctx, kind=self._kinds["server"],
                                               attributes={"http.request.method": method}) as span:
            yield span

    def current_traceparent(self) -> str | None:
        """The W3C ``traceparent`` of the current span (to stamp on events a request creates)."""
        ctx = self._trace.get_current_span().get_span_context()
        if not ctx.is_valid:
            return None
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"

    def shutdown(self) -> None:
        """Flush and stop the exporter."""
        self.provider.shutdown()


def setup_tracing(mode: str = "auto", service_name: str = "legacy-gateway", exporter: Any = None,
                  environ: Mapping[str, str] | None = None) -> Tracing | None:
    """A :class:`Tracing` when tracing is wanted and possible, else ``None``.

    Args:
        mode: ``observability.tracing`` (``auto``, ``on``, ``off``).
        service_name: ``service.name`` unless ``OTEL_SERVICE_NAME`` is set.
        exporter: a span exporter (tests: ``InMemorySpanExporter``, exported synchronously); default
            the OTLP/HTTP exporter, configured by the standard ``OTEL_EXPORTER_OTLP_*`` variables, in a
            batch processor.
        environ: environment (tests).

    Raises:
        ConfigurationError: ``mode`` is ``on`` but the ``otel`` extra is not installed.
    """
    if exporter is None and not tracing_wanted(mode, environ):
        return None
    if not otel_installed():
        if mode == "on":
            raise ConfigurationError(
                "observability.tracing is on but OpenTelemetry is not installed: pip install 'legacy-gateway[otel]'"
            )
        log.info("OTEL_EXPORTER_OTLP_ENDPOINT is set but the otel extra is not installed: tracing stays off")
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    env = os.environ if environ is None else environ
    attrs = {} if env.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
    provider = TracerProvider(resource=Resource.create(attrs))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter,
        )

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return Tracing(provider)


_PROCESS: dict[tuple[str, str], Tracing | None] = {}


def process_tracing(settings: Any) -> Tracing | None:
    """The process's one :class:`Tracing` for ``observability`` settings (created on first call).

    One provider per process: the API and the workers of a ``gateway run`` share it (and its
    exporter). ``None`` when tracing is off.
    """
    key = (settings.tracing, settings.service_name)
    if key not in _PROCESS:
        _PROCESS[key] = setup_tracing(settings.tracing, settings.service_name)
    return _PROCESS[key]
