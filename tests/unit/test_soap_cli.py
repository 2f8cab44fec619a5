"""`gateway sources test NAME` on a SOAP source: one real call to the simulator, nothing committed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from adapters.soap.simulator import SoapSimulator
from gateway.cli import app
from gateway.config import load_settings
from gateway.sources.runner import SourceRunner
from gateway.store import EventStore, make_engine
from gateway.store.migrate import upgrade
from tests.unit.test_soap_source import settings, soap_config


@pytest.fixture
def sim() -> Iterator[SoapSimulator]:
    with SoapSimulator() as s:
        yield s


@pytest.fixture
def gateway(tmp_path: Path, sim: SoapSimulator) -> Iterator[tuple[Path, EventStore]]:
    """A gateway.yaml with the SOAP source and its migrated (empty) store."""
    src = settings(soap_config(sim)).model_dump(mode="json")
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(yaml.safe_dump({"store": {"url": f"sqlite:///{tmp_path / 'g.db'}"}, "sources": [src]}))
    engine = make_engine(f"sqlite:///{tmp_path / 'g.db'}")
    upgrade(engine)
    yield cfg, EventStore(engine)
    engine.dispose()


def sources_test(cfg: Path, *extra: str) -> Any:
    return CliRunner().invoke(app, ["sources", "test", "legacy-orders", "-c", str(cfg), *extra])


def events(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_sources_test_calls_once_prints_mapped_events_and_commits_nothing(
    sim: SoapSimulator, gateway: tuple[Path, EventStore]
) -> None:
    cfg, store = gateway
    sim.add_orders(8)
    result = sources_test(cfg, "--limit", "3")
    assert result.exit_code == 0, result.output
    printed = events(result.stdout)
    assert [e["subject"] for e in printed] == ["order/1", "order/2", "order/3"]
    assert all(e["type"] == "com.acme.order.changed" and e["sourceadapter"] == "soap" for e in printed), printed[0]
    assert printed[0]["data"]["amount"] == "1.25"  # converted: an exact decimal as text
    assert "Dry run: nothing was committed" in result.output and "(more waiting)" in result.output
    assert "'page_token'" in result.output  # the cursor it would move to: the next page of the scan
    assert sim.calls == 1  # one operation call (the WSDL is a GET)
    assert store.stats()["events"] == 0 and store.get_cursor("legacy-orders") is None


def test_sources_test_reads_from_the_committed_cursor_unless_from_start(
    sim: SoapSimulator, gateway: tuple[Path, EventStore]
) -> None:
    cfg, store = gateway
    sim.add_orders(15)
    runner = SourceRunner(load_settings(cfg).sources[0], store)
    runner.run_once()  # page 1 (orders 1-10) committed
    runner.close()
    cursor = store.get_cursor("legacy-orders").cursor  # type: ignore[union-attr]
    result = sources_test(cfg, "--limit", "100")
    assert result.exit_code == 0, result.output
    assert [e["data"]["id"] for e in events(result.stdout)] == [11, 12, 13, 14, 15]
    again = sources_test(cfg, "--limit", "2", "--from-start")
    assert [e["data"]["id"] for e in events(again.stdout)] == [1, 2]
    assert store.get_cursor("legacy-orders").cursor == cursor and store.stats()["events"] == 10  # type: ignore[union-attr]


def test_sources_test_shows_a_business_fault_classified(sim: SoapSimulator, gateway: tuple[Path, EventStore]) -> None:
    cfg, store = gateway
    sim.add_orders(3)
    sim.business_fault("ORD-042", "since is before the archive horizon")
    result = sources_test(cfg)
    assert result.exit_code == 1
    assert "SoapFaultError" in result.output and "ORD-042" in result.output and "archive horizon" in result.output
    assert sim.calls == 1  # a dry run is not retried
    assert store.list_dead_letters() == [] and store.get_cursor("legacy-orders") is None
