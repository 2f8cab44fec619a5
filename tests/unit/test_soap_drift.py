"""WSDL drift of a running SOAP source, end to end: a vendored WSDL/XSD changes on disk.

The runner's drift bookkeeping is tested with a fake adapter in test_source_status.py; here the
real SOAP adapter fingerprints real files while its runner polls the simulator over HTTP, and the
drift is read back the way operators see it: `gateway sources list --json`, the detail of
`/readyz` and the log.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from adapters.soap.simulator import WSDL_PATH, XSD_PATH, SoapSimulator
from gateway.api import create_app
from gateway.cli import app
from tests.unit.test_soap_resilience import RunningSoapSource, eventually, ids
from tests.unit.test_soap_source import soap_config

CHECK_INTERVAL = 0.2  # seconds between drift checks while running


def vendor(folder: Path) -> Path:
    """A vendored copy of the simulator's WSDL with its XSD next to it; returns the WSDL path."""
    folder.mkdir(exist_ok=True)
    for f in (WSDL_PATH, XSD_PATH):
        shutil.copy(f, folder / f.name)
    return folder / WSDL_PATH.name


def change_xsd(wsdl: Path) -> Path:
    """A compatible change, as a vendor ships it: a new optional element."""
    xsd = wsdl.with_name(XSD_PATH.name)
    text = xsd.read_text()
    anchor = '<xs:element name="note"'
    assert anchor in text
    xsd.write_text(text.replace(anchor, '<xs:element name="remark" type="xs:string" minOccurs="0"/>\n      ' + anchor, 1))
    return xsd


class Gateway(RunningSoapSource):
    """One gateway process's view: a SOAP source's runner in a thread, its YAML and its store."""

    def __init__(self, tmp_path: Path, sim: SoapSimulator, wsdl: Path, on_drift: str) -> None:
        cfg = soap_config(
            sim, wsdl=str(wsdl), endpoint=sim.endpoint, page_size=10,
            timeouts={"connect": 1, "read": 2, "operation": 2},
            drift={"check_interval": CHECK_INTERVAL, "on_drift": on_drift},
        )
        super().__init__(tmp_path, sim, cfg, status_interval=0.1)

    def cli(self, *args: str) -> str:
        out = CliRunner().invoke(app, [*args, "-c", str(self.config)])
        assert out.exit_code == 0, out.output
        return out.output

    def listed(self) -> dict[str, Any]:
        (item,) = json.loads(self.cli("sources", "list", "--json"))
        return item  # type: ignore[no-any-return]

    def ready_detail(self) -> dict[str, Any]:
        body = TestClient(create_app(self.settings, self.store)).get("/readyz").json()
        return body["sources"]["legacy-orders"]  # type: ignore[no-any-return]


def test_drift_while_running_shows_in_sources_list_readyz_and_the_log_and_polling_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wsdl = vendor(tmp_path / "wsdl")
    caplog.set_level(logging.INFO, logger="gateway.sources")
    with SoapSimulator() as sim:
        sim.add_orders(15)
        with Gateway(tmp_path, sim, wsdl, on_drift="warn") as gw:
            eventually(lambda: gw.store.stats()["events"] == 15)
            # The fingerprint taken at start is the baseline: no drift.
            item = gw.listed()
            assert item["fingerprint"] and item["drift_detected"] is False and item["drift"] is None
            assert gw.ready_detail()["drift"] is False
            baseline = item["fingerprint"]

            xsd = change_xsd(wsdl)  # the scheduled check finds it
            item = eventually(lambda: (i := gw.listed())["drift_detected"] and i)
            assert item["drift"]["changed"] == [str(xsd)] and item["drift"]["baseline"] == baseline
            assert item["fingerprint"] == baseline  # the baseline stays until an operator accepts
            assert gw.ready_detail()["drift"] is True
            assert "yes" in gw.cli("sources", "list").splitlines()[1].split()  # the DRIFT column

            # on_drift: warn -- the source keeps polling.
            sim.add_orders(5, start=16)
            eventually(lambda: gw.store.stats()["events"] == 20)
            assert gw.listed()["state"] != "drift-stopped"
    warnings = [r.getMessage() for r in caplog.records if "schema drift" in r.getMessage()]
    assert len(warnings) == 1, warnings  # checked many times, logged once per new fingerprint
    assert str(xsd) in warnings[0] and r"polling stops" not in warnings[0]
    assert ids(gw.store) == list(range(1, 21))


def test_stop_on_drift_found_at_start_calls_nothing_until_the_drift_is_accepted(tmp_path: Path) -> None:
    wsdl = vendor(tmp_path / "wsdl")
    with SoapSimulator() as sim:
        sim.add_orders(10)
        with Gateway(tmp_path, sim, wsdl, on_drift="stop") as gw:  # the first run stores the baseline
            eventually(lambda: gw.store.stats()["events"] == 10 and gw.listed()["state"] == "idle")
            baseline = gw.listed()["fingerprint"]

        xsd = change_xsd(wsdl)  # changed while the gateway was down
        sim.add_orders(5, start=11)
        calls = sim.calls
        with Gateway(tmp_path, sim, wsdl, on_drift="stop") as gw:
            item = eventually(lambda: (i := gw.listed())["state"] == "drift-stopped" and i)
            assert item["drift"]["changed"] == [str(xsd)] and item["fingerprint"] == baseline
            assert gw.ready_detail()["state"] == "drift-stopped" and gw.ready_detail()["drift"] is True
            eventually(lambda: gw.runner.status.state == "drift-stopped")
            threading.Event().wait(5 * CHECK_INTERVAL)  # several drift checks and status periods
            assert sim.calls == calls  # never called with the drifted schema
            assert gw.store.stats()["events"] == 10

            out = gw.cli("sources", "accept-drift", "legacy-orders")
            assert "is the new baseline" in out and "source resumed" in out
            eventually(lambda: gw.store.stats()["events"] == 15)
            item = eventually(lambda: (i := gw.listed())["drift_detected"] is False and i)
            assert item["fingerprint"] != baseline and gw.ready_detail()["drift"] is False
        assert ids(gw.store) == list(range(1, 16))


def test_stop_on_drift_while_running_stops_polling(tmp_path: Path) -> None:
    wsdl = vendor(tmp_path / "wsdl")
    with SoapSimulator() as sim:
        sim.add_orders(10)
        with Gateway(tmp_path, sim, wsdl, on_drift="stop") as gw:
            eventually(lambda: gw.store.stats()["events"] == 10)
            change_xsd(wsdl)
            eventually(lambda: gw.listed()["state"] == "drift-stopped")
            calls = sim.calls
            sim.add_orders(5, start=11)
            threading.Event().wait(5 * CHECK_INTERVAL)
            assert sim.calls == calls and gw.store.stats()["events"] == 10
