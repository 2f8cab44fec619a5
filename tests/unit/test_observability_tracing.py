"""W3C traceparent end to end, and OpenTelemetry spans with the SDK's in-memory exporter (issue 8)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.bus import QueueSpec
from gateway.observability.tracing import (
    parse_traceparent,
    setup_tracing,
    tracing_wanted,
)
from tests.unit.test_observability_metrics import events, gateway_settings, wait_for

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736


def test_traceparent_parsing_and_when_tracing_is_wanted() -> None:
    assert parse_traceparent(TP) == (TRACE_ID, 0x00F067AA0BA902B7, 1)
    for bad in (None, "", "00-" + "0" * 32 + "-00f067aa0ba902b7-01", "ff-" + TP[3:], TP.upper()):
        assert parse_traceparent(bad) is None
    assert not tracing_wanted("auto", {}) and tracing_wanted("auto", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert tracing_wanted("on", {}) and not tracing_wanted("off", {"OTEL_EXPORTER_OTLP_ENDPOINT": "x"})
    assert setup_tracing("auto", environ={}) is None and setup_tracing("off", environ={}) is None


def test_a_poll_without_trace_context_gets_one_traceparent_and_events_keep_their_own() -> None:
    from gateway.observability.tracing import new_traceparent, with_traceparent

    tp = new_traceparent()
    assert parse_traceparent(tp) is not None and tp != new_traceparent()
    mixed = events(3, age=0.0) + events(1, age=0.0, source="api", traceparent=TP)
    out = with_traceparent(mixed, tp)
    assert [e.extensions["traceparent"] for e in out] == [tp, tp, tp, TP]
    assert [e.id for e in out] == [e.id for e in mixed]  # ids do not depend on trace context


def test_without_tracing_no_opentelemetry_module_is_imported(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from gateway.config import Settings\nfrom gateway.runtime import Gateway\n"
        f"gw = Gateway(Settings(profile='test', store={{'url': 'sqlite:///{tmp_path / 'g.db'}'}}), roles=['relay'])\n"
        "gw.start(); gw.stop()\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_traceparent_survives_source_outbox_relay_scorer_scored_event(tmp_path: Path, monkeypatch: Any) -> None:
    """Events with a traceparent keep it in the scored event; with the SDK installed, the relay's and
    scorer's batch spans link to it."""
    otel = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")
    import gateway.observability.tracing as tracing_mod
    from gateway.runtime import Gateway

    exporter = otel.InMemorySpanExporter()
    tracing = setup_tracing("on", exporter=exporter)
    monkeypatch.setattr(tracing_mod, "process_tracing", lambda _settings: tracing)
    gw = Gateway(gateway_settings(tmp_path), roles=["relay", "scorer"])
    out = f"{gw.topology.prefix}.test-scored"
    gw.bus.declare_queue(QueueSpec(out, {}, ((gw.topology.scored_exchange, "#"),)))  # type: ignore[attr-defined]
    gw.start()
    try:
        gw.store.accept(events(5, age=1.0, traceparent=TP), source_name="orders")
        gw.wake_relay()
        consumer = gw.bus.consumer(out, 100)
        got: list[Any] = []
        wait_for(lambda: bool(got.extend(consumer.get_batch(10, 0.1, 0.05))) or len(got) >= 5, "5 scored events")
    finally:
        gw.stop()
    scored = [json.loads(d.body) for d in got]
    assert {s["traceparent"] for s in scored} == {TP}
    assert {s["data"]["event"]["traceparent"] for s in scored} == {TP}
    spans = exporter.get_finished_spans()
    by_name = {s.name: s for s in spans}
    relay_span = by_name[f"publish {gw.topology.events_exchange}"]
    score_span = by_name[f"score {gw.topology.scoring_queue}"]
    for span in (relay_span, score_span, by_name[f"publish {gw.topology.scored_exchange}"]):
        assert [link.context.trace_id for link in span.links] == [TRACE_ID]
    assert relay_span.attributes["gateway.outcome.ack"] == 5
    assert relay_span.kind.name == "PRODUCER" and score_span.kind.name == "CONSUMER"


def test_api_request_spans_continue_the_callers_trace(tmp_path: Path) -> None:
    otel = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")
    from fastapi.testclient import TestClient

    from gateway.api import create_app
    from gateway.config import Settings
    from gateway.store import EventStore, engine_from_settings
    from gateway.store.migrate import upgrade

    exporter = otel.InMemorySpanExporter()
    tracing = setup_tracing("on", exporter=exporter)
    settings = Settings(profile="test", store={"url": f"sqlite:///{tmp_path / 'g.db'}"})
    engine = engine_from_settings(settings.store)
    upgrade(engine)
    app = create_app(settings, EventStore(engine), tracing=tracing)
    seen: list[str | None] = []

    @app.get("/_tp")
    def _tp() -> dict[str, str]:
        seen.append(tracing.current_traceparent())
        return {}

    client = TestClient(app)  # create_app installs the RequestContextMiddleware with the process's tracing
    r = client.get("/_tp", headers={"traceparent": TP})
    assert r.headers["x-request-id"] == format(TRACE_ID, "032x")
    (span,) = exporter.get_finished_spans()
    assert span.name == "HTTP GET /_tp" and span.kind.name == "SERVER"
    assert span.context.trace_id == TRACE_ID and span.parent.span_id == 0x00F067AA0BA902B7
    assert span.attributes["http.response.status_code"] == 200
    assert seen == [f"00-{TRACE_ID:032x}-{span.context.span_id:016x}-01"]  # what events of the request would carry
    exporter.clear()
    client.get("/healthz")
    (fresh,) = exporter.get_finished_spans()
    assert fresh.parent is None and fresh.context.trace_id != TRACE_ID
