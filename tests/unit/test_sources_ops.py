"""Operating sources from another process: `gateway sources list|pause|resume|accept-drift` and /readyz."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from gateway.api import create_app
from gateway.cli import app
from gateway.config import Settings, load_settings
from gateway.sources.runner import SourceRunner
from gateway.store import EventStore, make_engine
from gateway.store.migrate import upgrade
from tests.legacy import make_orders, source_settings

cli = CliRunner()

DRIFT = {
    "baseline": "old-digest",
    "current": "new-digest",
    "current_parts": {"orders.wsdl": "w2", "types.xsd": "x1"},
    "changed": ["orders.wsdl"],
    "detected_at": "2024-05-01T12:00:00.000000Z",
}


@pytest.fixture
def ops(tmp_path: Path) -> Iterator[tuple[Path, EventStore]]:
    """A config with one SQL source ``orders`` (5 legacy rows, polled once) and its SQLite store."""
    legacy = f"sqlite:///{tmp_path / 'legacy.db'}"
    make_orders(legacy, 5).dispose()
    cfg = tmp_path / "g.yaml"
    cfg.write_text(yaml.safe_dump({"store": {"url": f"sqlite:///{tmp_path / 'g.db'}"}, "sources": [source_settings(legacy)]}))
    engine = make_engine(f"sqlite:///{tmp_path / 'g.db'}")
    upgrade(engine)
    store = EventStore(engine)
    runner = SourceRunner(load_settings(cfg).sources[0], store)
    runner.run_once()
    runner.adapter.close()
    yield cfg, store
    engine.dispose()


def invoke(*args: str) -> Any:
    return cli.invoke(app, list(args))


def test_sources_list_shows_state_breaker_events_and_errors(ops: tuple[Path, EventStore]) -> None:
    cfg, store = ops
    result = invoke("sources", "list", "-c", str(cfg))
    assert result.exit_code == 0, result.output
    header, line = result.output.splitlines()[:2]
    assert header.split() == [
        "NAME", "ADAPTER", "ENABLED", "STATE", "BREAKER", "EVENTS", "LAST-POLL", "DRIFT", "LEASE", "STANDBY", "LAST-ERROR",
    ]
    assert line.split()[:6] == ["orders", "sql", "true", "idle", "closed", "5"]
    # No fingerprint (the SQL adapter has none); the runner still holds its lease, no standby; no error.
    assert line.split()[-4:] == ["-", "live", "0", "-"]
    # A failed source with drift, as another process wrote it.
    st = store.get_source_status("orders")
    assert st is not None
    store.set_fingerprint_baseline("orders", "old-digest", {"orders.wsdl": "w1"})
    store.save_source_status(
        "orders", state="failed", owner=st.owner, epoch=st.epoch, breaker={"state": "open"},
        last_error="SoapFaultError: order 42\nnot found " + "x" * 200, drift=DRIFT,
    )
    line = invoke("sources", "list", "-c", str(cfg)).output.splitlines()[1]
    cols = line.split()
    assert cols[3:5] == ["failed", "open"] and "yes" in cols and "SoapFaultError: order 42 not found" in line
    assert len(line) < 220 and line.endswith("~")  # one shortened line


def test_sources_list_json_has_the_full_status_and_the_cursor(ops: tuple[Path, EventStore]) -> None:
    cfg, _ = ops
    result = invoke("sources", "list", "-c", str(cfg), "--json")
    assert result.exit_code == 0, result.output
    (item,) = json.loads(result.output)
    assert item["name"] == "orders" and item["adapter"] == "sql" and item["enabled"] is True
    assert item["state"] == "idle" and item["desired_state"] == "running" and item["drift_detected"] is False
    assert item["breaker"]["name"] == "source:orders" and item["breaker"]["state"] == "closed"
    assert item["breaker"]["failure_rate"] == 0.0 and "retry_after" in item["breaker"]
    assert item["cursor"]["key"] == 5 and item["events_total"] == 5 and item["events_accepted"] == 5
    assert item["polls"] == 1 and item["owner"].count(":") == 2 and item["updated_at"].endswith("Z")


def test_pause_and_resume(ops: tuple[Path, EventStore]) -> None:
    cfg, store = ops
    result = invoke("sources", "pause", "orders", "-c", str(cfg))
    assert result.exit_code == 0, result.output
    assert "pause requested" in result.output and "within 5 s" in result.output
    st = store.get_source_status("orders")
    assert st is not None and st.desired_state == "paused" and st.desired_generation == 1
    assert invoke("sources", "list", "-c", str(cfg)).output.splitlines()[1].split()[3] == "idle*"  # not yet seen
    result = invoke("sources", "resume", "orders", "-c", str(cfg))
    assert result.exit_code == 0 and "resume requested (was idle)" in result.output
    st = store.get_source_status("orders")
    assert st is not None and st.desired_state == "running" and st.desired_generation == 2


def test_unknown_source_names_are_a_clear_error(ops: tuple[Path, EventStore]) -> None:
    cfg, store = ops
    for command in ("pause", "resume", "accept-drift"):
        result = invoke("sources", command, "nope", "-c", str(cfg))
        assert result.exit_code == 2 and "unknown source 'nope' (known: orders)" in result.output
    assert store.get_source_status("nope") is None


def test_accept_drift(ops: tuple[Path, EventStore]) -> None:
    cfg, store = ops
    result = invoke("sources", "accept-drift", "orders", "-c", str(cfg))
    assert result.exit_code == 0 and "no drift recorded" in result.output
    st = store.get_source_status("orders")
    assert st is not None
    store.set_fingerprint_baseline("orders", "old-digest", {"orders.wsdl": "w1", "types.xsd": "x1"})
    store.save_source_status("orders", state="drift-stopped", owner=st.owner, epoch=st.epoch, drift=DRIFT)
    result = invoke("sources", "accept-drift", "orders", "-c", str(cfg))
    assert result.exit_code == 0, result.output
    assert "new-digest is the new baseline (changed: orders.wsdl)" in result.output and "source resumed" in result.output
    st = store.get_source_status("orders")
    assert st is not None and st.fingerprint == "new-digest" and st.fingerprint_parts == DRIFT["current_parts"]
    assert st.drift is None and st.desired_state == "running" and st.desired_generation == 1
    # Accepting never lifts an operator's pause.
    store.set_source_desired_state("orders", "paused")
    store.save_source_status("orders", state="paused-by-operator", owner=st.owner, epoch=st.epoch, drift=DRIFT)
    result = invoke("sources", "accept-drift", "orders", "-c", str(cfg))
    assert result.exit_code == 0 and "source resumed" not in result.output
    st = store.get_source_status("orders")
    assert st is not None and st.drift is None and st.desired_state == "paused"


# ---------------------------------------------------------------------------- /readyz


def test_readyz_shows_sources_as_detail_only(ops: tuple[Path, EventStore]) -> None:
    cfg, store = ops
    settings = load_settings(cfg).model_copy()
    settings.sources = [*settings.sources, settings.sources[0].model_copy(update={"name": "never-ran"})]
    st = store.get_source_status("orders")
    assert st is not None
    store.save_source_status(
        "orders", state="failed", owner=st.owner, epoch=st.epoch, drift=DRIFT,
        breaker={"name": "soap:erp", "state": "open", "failure_rate": 100.0, "retry_after": 12.5, "opened_at": 5.0},
        last_error="TransientError: http://gw:hunter2@erp.example/orders refused",
    )
    store.set_source_desired_state("orders", "paused")
    client = TestClient(create_app(settings, store), raise_server_exceptions=False)
    resp = client.get("/readyz")
    assert resp.status_code == 200, resp.text  # a failed legacy source does not make the gateway unready
    body = resp.json()
    assert body["status"] == "ready" and body["checks"]["store"]["ok"]
    orders = body["sources"]["orders"]
    assert orders["state"] == "failed" and orders["desired_state"] == "paused" and orders["drift"] is True
    assert orders["breaker"] == {"name": "soap:erp", "state": "open", "failure_rate": 100.0, "retry_after": 12.5}
    assert "hunter2" not in resp.text and orders["last_error"].startswith("TransientError: <redacted-url>")
    assert orders["updated_at"].endswith("Z")
    assert body["sources"]["never-ran"] == {
        "state": "unknown", "desired_state": "running", "breaker": None, "last_error": None, "updated_at": None,
        "drift": False,
    }


def test_readyz_without_sources_and_its_openapi_schema(sqlite_store: EventStore) -> None:
    client = TestClient(create_app(Settings(), sqlite_store))
    body = client.get("/readyz").json()
    assert body["sources"] == {}
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert "sources" in schemas["Readiness"]["properties"]
    assert {"state", "breaker", "last_error", "updated_at", "drift"} <= set(schemas["SourceReadiness"]["properties"])
    assert {"state", "retry_after"} <= set(schemas["SourceBreaker"]["properties"])
