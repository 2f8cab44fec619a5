"""SOAP source resilience against the simulator over real HTTP: the endpoint breaker and business faults."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, Self

import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from adapters.soap import SoapSource
from adapters.soap.simulator import SoapSimulator
from gateway.api import create_app
from gateway.cli import app
from gateway.config import BreakerSettings, load_settings
from gateway.errors import CircuitOpenError, TransientError
from gateway.resilience import BreakerState, RetryPolicy
from gateway.sources.runner import SourceRunner
from gateway.store import EventFilter, EventStore, make_engine
from gateway.store.migrate import upgrade
from tests.fakes import FakeClock
from tests.unit.test_soap_source import drain, settings, soap_config

BREAKER = {"window_size": 4, "minimum_calls": 4, "failure_rate_threshold": 50, "wait_in_open": 30, "half_open_permits": 2}
RETRY = RetryPolicy(attempts=2, base_delay=0.001, max_delay=0.001, deadline=5.0)


def soap_runner(store: EventStore, cfg: dict[str, Any], **kw: Any) -> SourceRunner:
    """A runner of the SOAP source with the test's breaker settings."""
    s = settings(cfg).model_copy(update={"breaker": BreakerSettings.model_validate(BREAKER)})
    adapter = SoapSource(SoapSource.parse_config(s.config), source_name=s.name)  # type: ignore[arg-type]
    return SourceRunner(s, store, adapter=adapter, sleep=lambda _: None, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ids(store: EventStore) -> list[int]:
    return sorted(e.event["data"]["id"] for e in store.list_events(EventFilter(), limit=10_000))


def test_an_endpoint_down_opens_the_breaker_which_half_opens_and_closes_when_it_returns(sqlite_store: EventStore) -> None:
    port = free_port()
    clock = FakeClock()
    sim = SoapSimulator(port=port).start()
    sim.add_orders(30)
    cfg: dict[str, Any] = soap_config(sim, page_size=10, timeouts={"connect": 1, "read": 2, "operation": 2})
    runner = soap_runner(sqlite_store, cfg, retry=RETRY, clock=clock)
    transitions: list[tuple[BreakerState, BreakerState]] = []
    runner.breaker.add_listener(lambda _n, old, new: transitions.append((old, new)))
    runner.run_once()  # page 1 committed: the WSDL is loaded and the endpoint known
    sim.close()  # the endpoint goes down: connections are refused

    requests_before = len(sim.requests)
    with pytest.raises(TransientError):
        runner.run_once()  # 2 attempts fail
    with pytest.raises(TransientError):
        runner.run_once()  # 2 more: 4 failures of 5 recorded calls -> open
    assert runner.breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpenError):
        runner.run_once()  # refused without calling the endpoint
    assert runner.status.breaker["state"] == "open"

    back = SoapSimulator(port=port).start()  # the endpoint returns, same address, same data
    try:
        back.add_orders(30)
        with pytest.raises(CircuitOpenError):
            runner.run_once()  # still open until the wait is over
        assert back.calls == 0
        clock.advance(30)
        runner.run_once()  # trial 1
        assert runner.breaker.state is BreakerState.HALF_OPEN
        runner.run_once()  # trial 2: both good -> closed
        assert runner.breaker.state is BreakerState.CLOSED
        drain(runner)
        assert transitions == [
            (BreakerState.CLOSED, BreakerState.OPEN),
            (BreakerState.OPEN, BreakerState.HALF_OPEN),
            (BreakerState.HALF_OPEN, BreakerState.CLOSED),
        ]
        assert ids(sqlite_store) == list(range(1, 31))  # nothing lost, nothing twice
        assert len(sim.requests) == requests_before  # the dead server saw nothing after it went down
    finally:
        back.close()
        runner.adapter.close()


# ------------------------------------------------------------------ the running source, as operators see it
class RunningSoapSource:
    """A SOAP source's runner in its own thread (real waits), its YAML config and its store.

    Args:
        tmp_path: folder for the config and the SQLite store.
        sim: the simulator the source polls.
        cfg: the source's adapter config (default: 10 records per page, short timeouts).
        **source: more keys of the source block (default: a breaker that opens quickly).
    """

    def __init__(self, tmp_path: Path, sim: SoapSimulator, cfg: dict[str, Any] | None = None, **source: Any) -> None:
        if cfg is None:
            cfg = soap_config(sim, page_size=10, timeouts={"connect": 1, "read": 2, "operation": 2})
        src = settings(cfg).model_dump(mode="json")
        src.update(interval=0.05, status_interval=0.1)
        src.update(source or {"breaker": {**BREAKER, "wait_in_open": 1.0, "half_open_permits": 1}})
        self.config = tmp_path / "gateway.yaml"
        self.config.write_text(yaml.safe_dump({"store": {"url": f"sqlite:///{tmp_path / 'g.db'}"}, "sources": [src]}))
        self.settings = load_settings(self.config)
        self.engine = make_engine(f"sqlite:///{tmp_path / 'g.db'}")
        upgrade(self.engine)
        self.store = EventStore(self.engine)
        self.runner = SourceRunner(self.settings.sources[0], self.store, retry=RETRY)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.runner.run, args=(self.stop,), daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.engine.dispose()

    def listed(self) -> dict[str, Any]:
        out = CliRunner().invoke(app, ["sources", "list", "-c", str(self.config), "--json"])
        assert out.exit_code == 0, out.output
        (item,) = json.loads(out.output)
        return item  # type: ignore[no-any-return]

    def ready_detail(self) -> dict[str, Any]:
        body = TestClient(create_app(self.settings, self.store)).get("/readyz").json()
        return body["sources"]["legacy-orders"]  # type: ignore[no-any-return]


def eventually(check: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            assert value, "condition not reached in time"
            return value
        time.sleep(0.05)


def test_the_endpoint_breaker_shows_in_sources_list_and_readyz(tmp_path: Path) -> None:
    port = free_port()
    sim = SoapSimulator(port=port).start()
    sim.add_orders(25)
    with RunningSoapSource(tmp_path, sim) as src:
        eventually(lambda: src.store.stats()["events"] == 25)
        item = src.listed()
        assert item["breaker"]["name"] == f"soap:{sim.endpoint}" and item["breaker"]["state"] == "closed"
        sim.close()  # the endpoint goes down
        item = eventually(lambda: (i := src.listed())["breaker"]["state"] == "open" and i)
        assert item["state"] == "paused" and "TransientError" in (item["last_error"] or "")
        ready = src.ready_detail()
        assert ready["breaker"]["state"] == "open" and ready["breaker"]["name"] == f"soap:{sim.endpoint}"

        back = SoapSimulator(port=port).start()  # it returns, with one more order
        try:
            back.add_orders(26)
            eventually(lambda: src.store.stats()["events"] == 26)
            item = eventually(lambda: (i := src.listed())["breaker"]["state"] == "closed" and i)
            assert item["last_error"] is None and src.ready_detail()["breaker"]["state"] == "closed"
        finally:
            back.close()
    assert ids(src.store) == list(range(1, 27))


def test_a_business_fault_lands_in_dead_letters_with_its_details_and_is_not_retried(tmp_path: Path) -> None:
    with SoapSimulator() as sim:
        sim.add_orders(5)
        with RunningSoapSource(tmp_path, sim) as src:
            eventually(lambda: src.store.stats()["events"] == 5)
            sim.business_fault("ORD-410", "order archived: ask the archive service")
            sim.add_orders(3, start=6)
            item = eventually(lambda: (i := src.listed())["state"] == "failed" and i)
            calls = sim.calls
            time.sleep(0.5)  # five status periods: a failed source does not call the service
            assert sim.calls == calls
            assert "SOAP fault soap:Client [ORD-410]" in item["last_error"]
            (dead,) = src.store.list_dead_letters()
            assert (dead.stage, dead.source_name, dead.error_class) == ("source", "legacy-orders", "SoapFaultError")
            payload = json.loads(dead.payload or "")
            assert payload["error"]["details"] == {
                "fault_code": "soap:Client", "fault_string": "order archived: ask the archive service", "detail_code": "ORD-410",
            }
            assert payload["cursor"]["key"] == 5  # where the source stopped: its committed cursor
            assert src.ready_detail()["state"] == "failed"

            sim.business_fault(None)  # fixed at the source; the operator resumes
            out = CliRunner().invoke(app, ["sources", "resume", "legacy-orders", "-c", str(src.config)])
            assert out.exit_code == 0, out.output
            eventually(lambda: src.store.stats()["events"] == 8)
            eventually(lambda: src.listed()["state"] == "idle")
        assert ids(src.store) == list(range(1, 9)) and len(src.store.list_dead_letters()) == 1
