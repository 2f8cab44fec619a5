"""``/v1/sources`` (issue 8): status, pause, resume, run now and the cursor with a preview.

A real SQL source on SQLite (legacy table ``legacy_orders``), a real :class:`SourceRunner`, keys
made through the store. The CLI twins call the same :mod:`gateway.sources.ops` functions.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from gateway.api import create_app
from gateway.api.auth import key_secret
from gateway.cli import app as cli_app
from gateway.config import Settings, load_settings
from gateway.sources.runner import SourceRunner
from gateway.store import EventStore, make_engine
from gateway.store.migrate import upgrade
from tests.legacy import add_orders, make_orders, source_settings
from tests.unit.test_api import assert_problem

SECRET = "s" * 40
SOURCE = "urn:legacy-gateway:problem:source-not-found"


@dataclass
class Rig:
    cfg: Path
    settings: Settings
    store: EventStore
    client: TestClient
    legacy_url: str

    def key(self, scopes: list[str], sources: list[str] | None = None) -> dict[str, str]:
        _, token = self.store.create_api_key("ops-key", scopes, sources, secret=key_secret(self.settings, self.store))
        return {"Authorization": f"Bearer {token}"}

    def runner(self, **kw: Any) -> SourceRunner:
        return SourceRunner(self.settings.sources[0], self.store, **kw)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """Sources ``orders`` (5 legacy rows, polled once; interval 1 h, status checks every 50 ms)
    and ``spare`` (never ran)."""
    legacy = f"sqlite:///{tmp_path / 'legacy.db'}"
    make_orders(legacy, 5).dispose()
    cfg = tmp_path / "g.yaml"
    sources = [
        {**source_settings(legacy), "interval": 3600, "status_interval": 0.05, "lease_ttl": 3},
        source_settings(legacy, name="spare"),
    ]
    cfg.write_text(yaml.safe_dump({
        "profile": "test", "api": {"key_secret": SECRET},
        "store": {"url": f"sqlite:///{tmp_path / 'g.db'}"}, "sources": sources,
    }))
    settings = load_settings(cfg)
    engine = make_engine(f"sqlite:///{tmp_path / 'g.db'}")
    upgrade(engine)
    store = EventStore(engine)
    first = SourceRunner(settings.sources[0], store, owner="host-a:1:r1")
    first.run_once()
    first.close()  # releases the lease: a test's runner takes it at once
    client = TestClient(create_app(settings, store), raise_server_exceptions=False)
    yield Rig(cfg, settings, store, client, legacy)
    engine.dispose()


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def running(rig: Rig) -> Iterator[SourceRunner]:
    """A live runner of ``orders`` in a thread, idle after its first poll (its next one is 1 h away)."""
    runner = rig.runner(owner="host-b:2:r2")
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    thread.start()
    wait_for(lambda: runner.status.state == "idle" and runner.status.polls >= 1, "the runner's first poll")
    try:
        yield runner
    finally:
        stop.set()
        thread.join(10)
        assert not thread.is_alive()


# ---------------------------------------------------------------------------- auth and 404
def test_no_key_401_wrong_scope_403(rig: Rig) -> None:
    c = rig.client
    for method, url in [("get", "/v1/sources"), ("get", "/v1/sources/orders"), ("post", "/v1/sources/orders/pause"),
                        ("post", "/v1/sources/orders/resume"), ("post", "/v1/sources/orders/run"),
                        ("get", "/v1/sources/orders/cursor"), ("put", "/v1/sources/orders/cursor"),
                        ("delete", "/v1/sources/orders/cursor")]:
        kwargs: dict[str, Any] = {"json": {"cursor": None}} if method == "put" else {}
        assert_problem(c.request(method, url, **kwargs), 401)
        body = assert_problem(c.request(method, url, headers=rig.key(["events:read", "events:write"]), **kwargs), 403)
        assert "sources:admin" in body["detail"]
    assert c.get("/v1/sources", headers=rig.key(["admin"])).status_code == 200  # admin implies sources:admin


def test_unknown_and_other_sources_are_the_same_404_naming_nothing_else(rig: Rig) -> None:
    c = rig.client
    orders_only = rig.key(["sources:admin"], ["orders"])
    unknown = assert_problem(c.get("/v1/sources/nope", headers=rig.key(["sources:admin"])), 404)
    hidden = assert_problem(c.get("/v1/sources/spare", headers=orders_only), 404)
    assert unknown["type"] == hidden["type"] == SOURCE
    assert "no source named 'nope' is configured" in unknown["detail"]
    assert hidden["detail"] == unknown["detail"].replace("'nope'", "'spare'")
    for body in (unknown, hidden):
        assert "orders" not in body["detail"]  # no list of the configured sources
    for method, path in [("post", "pause"), ("post", "resume"), ("post", "run"), ("get", "cursor"), ("delete", "cursor")]:
        assert_problem(c.request(method, f"/v1/sources/spare/{path}", headers=orders_only), 404)
    assert_problem(c.put("/v1/sources/spare/cursor", json={"cursor": None, "dry_run": False}, headers=orders_only), 404)
    assert rig.store.get_source_status("spare") is None and rig.store.get_run_request("spare") is None  # nothing written
    assert c.get("/v1/sources/orders", headers=orders_only).status_code == 200


# ---------------------------------------------------------------------------- status
def test_list_shows_state_cursor_lag_counts_breaker_and_lease_restricted_to_the_keys_sources(rig: Rig) -> None:
    c = rig.client
    items = c.get("/v1/sources", headers=rig.key(["sources:admin"])).json()["items"]
    assert [i["name"] for i in items] == ["orders", "spare"]
    orders, spare = items
    assert orders["adapter"] == "sql" and orders["state"] == "stopped" and orders["desired_state"] == "running"
    assert orders["cursor"] == {"ts": "2024-01-01T12:00:00.005000Z", "key": 5}
    assert orders["cursor_time"] == "2024-01-01T12:00:00.005000Z"
    assert orders["lag_seconds"] > 365 * 86400  # now minus 2024-01-01
    assert orders["events_total"] == 5 and orders["events_accepted"] == 5 and orders["polls"] == 1
    assert orders["breaker"]["state"] == "closed" and orders["last_poll_at"].endswith("Z")
    assert orders["lease"] == "free" and orders["lease_owner"] is None  # the first runner released it
    assert spare["state"] is None and spare["cursor"] is None and spare["lag_seconds"] is None and spare["lease"] == "-"
    one = c.get("/v1/sources", headers=rig.key(["sources:admin"], ["orders"])).json()["items"]
    assert [i["name"] for i in one] == ["orders"]
    assert c.get("/v1/sources", headers=rig.key(["sources:admin"], ["elsewhere"])).json() == {"items": []}
    # The CLI's --json shows the same status (one function in gateway.sources.ops).
    cli = json.loads(CliRunner().invoke(cli_app, ["sources", "list", "-c", str(rig.cfg), "--json"]).output)
    assert [i["name"] for i in cli] == ["orders", "spare"] and set(cli[0]) == set(orders)
    for mine, theirs in zip(cli, items, strict=True):  # (the API fills a never-ran source's status defaults)
        assert {k: v for k, v in mine.items() if k != "lag_seconds"} == {k: theirs[k] for k in mine if k != "lag_seconds"}


def test_get_one_shows_the_lease_holder_while_a_runner_runs(rig: Rig, running: SourceRunner) -> None:
    body = rig.client.get("/v1/sources/orders", headers=rig.key(["sources:admin"])).json()
    assert body["name"] == "orders" and body["state"] == "idle" and body["lease"] == "live"
    assert body["lease_owner"] == running.owner == body["owner"]
    assert [(r["owner"], r["live"]) for r in body["runners"]] == [(running.owner, True)]


# ---------------------------------------------------------------------------- pause, resume, run
def test_pause_and_resume_reach_a_running_runner(rig: Rig, running: SourceRunner) -> None:
    c, admin = rig.client, rig.key(["sources:admin"])
    resp = c.post("/v1/sources/orders/pause", headers=admin)
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["action"] == "pause" and body["status"]["desired_state"] == "paused" and "0.05 s" in body["detail"]
    wait_for(lambda: rig.store.get_source_status("orders").state == "paused-by-operator", "the runner to pause")  # type: ignore[union-attr]
    assert running.status.state == "paused-by-operator"
    # While paused a run now is refused (resume instead), and nothing is recorded.
    refused = assert_problem(c.post("/v1/sources/orders/run", headers=admin), 409)
    assert refused["type"].endswith("source-not-runnable") and "resume it" in refused["detail"]
    assert rig.store.get_run_request("orders") is None
    resp = c.post("/v1/sources/orders/resume", headers=admin)
    assert resp.status_code == 202 and "was paused-by-operator" in resp.json()["detail"]
    wait_for(lambda: running.status.state == "idle", "the runner to resume")
    assert c.get("/v1/sources/orders", headers=admin).json()["desired_state"] == "running"


def test_run_now_makes_an_idle_runner_poll_at_once(rig: Rig, running: SourceRunner) -> None:
    """The runner's interval is an hour: only the run-now request makes it read the new rows."""
    legacy = make_engine(rig.legacy_url)
    add_orders(legacy, 3, start=6)
    legacy.dispose()
    time.sleep(0.2)  # several status checks: nothing is polled without the request
    assert running.status.polls == 1 and running.status.events_accepted == 0  # counters since it started
    resp = rig.client.post("/v1/sources/orders/run", headers=rig.key(["sources:admin"]))
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["action"] == "run" and body["status"]["run_requested_at"].endswith("Z")
    assert "polls within 0.05 s" in body["detail"]
    wait_for(lambda: running.status.events_accepted == 3, "the run-now poll")
    assert rig.store.get_cursor("orders").cursor["key"] == 8  # type: ignore[union-attr]
    time.sleep(0.2)
    assert running.status.polls == 2  # one request, one poll


def test_run_now_from_the_cli_is_the_same_request(rig: Rig) -> None:
    result = CliRunner().invoke(cli_app, ["sources", "run", "orders", "-c", str(rig.cfg)])
    assert result.exit_code == 0, result.output
    assert "run requested" in result.output
    at = rig.store.get_run_request("orders")
    assert at is not None
    shown = rig.client.get("/v1/sources/orders", headers=rig.key(["sources:admin"])).json()["run_requested_at"]
    assert shown == at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    rig.store.set_source_desired_state("orders", "paused")
    refused = CliRunner().invoke(cli_app, ["sources", "run", "orders", "-c", str(rig.cfg)])
    assert refused.exit_code == 1 and "paused by an operator" in refused.output


# ---------------------------------------------------------------------------- cursor
def test_get_cursor_shows_the_committed_cursor_epoch_and_lease(rig: Rig) -> None:
    c, admin = rig.client, rig.key(["sources:admin"])
    body = c.get("/v1/sources/orders/cursor", headers=admin).json()
    assert body["cursor"] == {"ts": "2024-01-01T12:00:00.005000Z", "key": 5} and body["committed"] is True
    assert body["epoch"] == 1 and body["events_total"] == 5 and body["lease"] == "free"
    never = c.get("/v1/sources/spare/cursor", headers=admin).json()
    assert never == {"source": "spare", "cursor": None, "committed": False, "committed_at": None, "events_total": 0,
                     "epoch": None, "lease": "-", "lease_owner": None, "lease_until": None}


def test_put_previews_by_default_with_the_sql_sources_exact_counts(rig: Rig) -> None:
    c, admin = rig.client, rig.key(["sources:admin"])
    before = rig.store.get_cursor("orders")
    legacy = make_engine(rig.legacy_url)
    add_orders(legacy, 4, start=6)  # rows 6..9, not read yet
    legacy.dispose()
    back = c.put("/v1/sources/orders/cursor", json={"cursor": {"ts": "2024-01-01T12:00:00.002000Z", "key": 2}}, headers=admin)
    assert back.status_code == 200, back.text
    assert back.json() == {
        "source": "orders", "dry_run": True, "reset": False, "before": before.cursor,  # type: ignore[union-attr]
        "after": {"ts": "2024-01-01T12:00:00.002000Z", "key": 2}, "epoch": 1, "new_epoch": None,
        "rows_read_again": 3, "rows_skipped": 0, "unknown_reason": None,
    }
    ahead = c.put("/v1/sources/orders/cursor", json={"cursor": {"ts": "2024-01-01T12:00:00.008000Z", "key": 8}}, headers=admin).json()
    assert (ahead["rows_read_again"], ahead["rows_skipped"]) == (0, 3)  # rows 6, 7, 8
    reset = c.delete("/v1/sources/orders/cursor", headers=admin).json()
    assert reset["dry_run"] and reset["reset"] and reset["after"] is None and reset["rows_read_again"] == 5
    assert rig.store.get_cursor("orders") == before and rig.store.list_audit(action="source.cursor.set") == []


def test_put_and_delete_with_dry_run_false_apply_and_audit_like_the_cli(rig: Rig) -> None:
    c, admin = rig.client, rig.key(["sources:admin"])
    target = {"ts": "2024-01-01T12:00:00.002000Z", "key": 2}
    resp = c.put("/v1/sources/orders/cursor", json={"cursor": target, "dry_run": False}, headers=admin)
    assert resp.status_code == 200, resp.text
    assert resp.json()["new_epoch"] == 2 and resp.json()["rows_read_again"] == 3 and not resp.json()["dry_run"]
    moved = rig.store.get_cursor("orders")
    assert moved is not None and moved.cursor == target and moved.epoch == 2
    (entry,) = rig.store.list_audit(action="source.cursor.set")
    assert entry.actor_name == "ops-key" and entry.target == "orders"
    assert entry.details == {"before": {"ts": "2024-01-01T12:00:00.005000Z", "key": 5}, "after": target, "epoch": 2}
    resp = c.delete("/v1/sources/orders/cursor", params={"dry_run": "false"}, headers=admin)
    assert resp.status_code == 200 and resp.json()["new_epoch"] == 3 and resp.json()["rows_read_again"] == 2
    assert rig.store.get_cursor("orders").cursor is None  # type: ignore[union-attr]
    assert [a.action for a in rig.store.list_audit()][-2:] == ["source.cursor.set", "source.cursor.reset"]


def test_a_running_runner_follows_a_cursor_moved_through_the_api(rig: Rig, running: SourceRunner) -> None:
    resp = rig.client.delete("/v1/sources/orders/cursor", params={"dry_run": "false"}, headers=rig.key(["sources:admin"]))
    assert resp.status_code == 200, resp.text
    wait_for(lambda: running.status.duplicates == 5, "the runner to read the 5 rows again")  # fenced, reloaded


@pytest.mark.parametrize(("body", "loc"), [
    ({"cursor": 1, "dry_run": False, "extra": 1}, ["body", "extra"]),
    ({"dry_run": False}, ["body", "cursor"]),
    ({"cursor": 1, "dry_run": "maybe"}, ["body", "dry_run"]),
])
def test_bad_cursor_bodies_are_422_naming_the_member(rig: Rig, body: dict[str, Any], loc: list[str]) -> None:
    before = rig.store.get_cursor("orders")
    resp = rig.client.put("/v1/sources/orders/cursor", json=body, headers=rig.key(["sources:admin"]))
    problem = assert_problem(resp, 422)
    assert loc in [e["loc"] for e in problem["errors"]]
    assert rig.store.get_cursor("orders") == before


def test_a_source_that_cannot_open_previews_unknown_counts_saying_why(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    from adapters.base import Batch, PollingSource, SourceConfig

    class Down(PollingSource[SourceConfig]):
        kind = "down"

        def open(self) -> None:
            raise ConnectionError("legacy host unreachable")

        def fetch(self, cursor: Any, limit: int) -> Batch:
            raise AssertionError("never")

    monkeypatch.setattr("gateway.sources.runner.build_adapter", lambda s: Down(SourceConfig(), source_name="orders"))
    body = rig.client.put("/v1/sources/orders/cursor", json={"cursor": {"key": 9}}, headers=rig.key(["sources:admin"])).json()
    assert body["rows_read_again"] is None and body["rows_skipped"] is None
    assert "legacy host unreachable" in body["unknown_reason"]
