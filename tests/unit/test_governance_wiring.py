"""Governance wired in (issue 8): the source runner and REST ingest apply PII policies and
contracts right before the outbox commit, so nothing downstream ever holds a raw value."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from gateway.api import create_app
from gateway.config import Settings, SourceSettings
from gateway.governance import Governance
from gateway.sources.runner import SourceRunner
from gateway.store import EventStore
from gateway.store.schema import events
from tests.legacy import T0, make_orders, source_settings, touch_orders

SECRET = "x" * 40
GOVERNANCE = {
    "pii": {"secret": SECRET, "policies": [{"path": "data.customer", "action": "hash"}]},
    "contracts": [{"types": ["com.acme.order.changed"], "mode": "freeze",
                   "schema": {"type": "object", "properties": {"status": {"enum": ["NEW"]}}, "required": ["status"]}}],
}


def stored_envelopes(store: EventStore) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        return [json.loads(e) for e in conn.execute(select(events.c.envelope)).scalars()]


def test_the_runner_hashes_pii_and_dead_letters_contract_violations(sqlite_store: EventStore, tmp_path: Path) -> None:
    legacy = f"sqlite:///{tmp_path / 'legacy.db'}"
    engine = make_orders(legacy, 20)
    touch_orders(engine, [3, 4], T0.replace(year=2024, hour=13))  # status SHIPPED: the contract says NEW only
    engine.dispose()
    settings = Settings(profile="test", governance=GOVERNANCE, sources=[source_settings(legacy)])
    runner = SourceRunner(
        SourceSettings.model_validate(source_settings(legacy)), sqlite_store, sleep=lambda s: None,
        governance=Governance.from_settings(settings, sqlite_store),
    )
    while runner.run_once().has_more:
        pass
    everything = stored_envelopes(sqlite_store)
    stored = [e for e in everything if e["type"] == "com.acme.order.changed"]
    assert len(stored) == 18 and runner.status.rejected == 2
    changes = [e for e in everything if e["type"] == "com.acme.order.changed.schema-changed"]
    assert len(changes) == 1  # the first shape seen of this type and source
    assert not any(re.search(r"C\d{4}", json.dumps(e)) for e in changes)
    assert all(re.fullmatch(r"[0-9a-f]{64}", e["data"]["customer"]) for e in stored)
    assert not any(re.search(r"C\d{4}", json.dumps(e)) for e in stored)  # no raw customer anywhere
    dead = sqlite_store.list_dead_letters()
    assert len(dead) == 2 and {d.stage for d in dead} == {"contract"}
    assert all("status" in d.reason for d in dead)
    assert not any(re.search(r"C\d{4}", (d.payload or "") + d.reason) for d in dead)  # PII before the contract


def test_rest_ingest_hashes_pii_and_refuses_a_violation_with_422(sqlite_store: EventStore) -> None:
    settings = Settings(profile="test", api={"auth": False}, governance=GOVERNANCE)
    client = TestClient(create_app(settings, sqlite_store), raise_server_exceptions=False)

    def event(i: int, status: str) -> dict[str, Any]:
        return {"specversion": "1.0", "id": f"e-{i}", "source": "/crm", "type": "com.acme.order.changed",
                "time": "2024-01-01T00:00:00Z", "data": {"customer": "alice@example.com", "status": status}}

    bad = client.post("/v1/events", json=[event(1, "NEW"), event(2, "SHIPPED")],
                      headers={"content-type": "application/cloudevents-batch+json"})
    assert bad.status_code == 422 and bad.json()["type"].endswith("contract-violation")
    assert "status" in bad.json()["detail"] and "alice" not in bad.text
    assert sqlite_store.stats()["events"] == 0  # all or nothing
    ok = client.post("/v1/events", json=event(3, "NEW"), headers={"content-type": "application/cloudevents+json"})
    assert ok.status_code == 202, ok.text
    (stored,) = [e for e in stored_envelopes(sqlite_store) if e["type"] == "com.acme.order.changed"]
    assert re.fullmatch(r"[0-9a-f]{64}", stored["data"]["customer"]) and "alice" not in json.dumps(stored)


@pytest.mark.parametrize("governance", [{}, {"pii": {"policies": []}}])
def test_without_policies_or_contracts_the_runner_takes_the_plain_path(governance: dict[str, Any]) -> None:
    settings = Settings(profile="test", governance=governance)
    assert Governance.from_settings(settings, None).active is False
