"""SOAP adapter: page-number paging, scans over unsorted pages, lenient parsing and WSDL drift.

Everything runs against the SOAP simulator over real HTTP on loopback.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from adapters.soap import SoapSource
from adapters.soap.simulator import T0, WSDL_PATH, XSD_PATH, Order, SoapSimulator
from adapters.soap.simulator import server as simserver
from gateway.errors import ConfigurationError, PermanentError
from gateway.store import EventFilter, EventStore
from tests.unit.test_soap_source import drain, make_runner, soap_config


@pytest.fixture
def sim() -> Iterator[SoapSimulator]:
    with SoapSimulator() as s:
        yield s


def page_config(sim: SoapSimulator, **over: Any) -> dict[str, Any]:
    return soap_config(
        sim,
        operation="ListOrders",
        arguments={"since": "{cursor.time}", "pageNumber": "{page_number}", "pageSize": "{page_size}"},
        next_page_token_path=None,
        paging="page_number",
        **over,
    )


def source(cfg: dict[str, Any]) -> SoapSource:
    return SoapSource(SoapSource.parse_config(cfg), source_name="legacy-orders")  # type: ignore[arg-type]


def event_keys(store: EventStore) -> list[tuple[int, str]]:
    out = []
    for ev in store.list_events(EventFilter(), limit=100_000):
        data = ev.event["data"]
        out.append((data["id"], data["updatedAt"]))
    return out


# ------------------------------------------------------------------ page-number paging
def test_page_number_paging_reads_every_record_once_and_ends_on_an_empty_page(
    sqlite_store: EventStore, sim: SoapSimulator
) -> None:
    sim.add_orders(250)
    runner = make_runner(sqlite_store, page_config(sim))
    polls = drain(runner)
    keys = event_keys(sqlite_store)
    assert sorted(k for k, _ in keys) == list(range(1, 251))
    assert polls == 26  # 25 full pages, then the empty page that ends the scan
    assert runner._cursor == {"time": "2024-01-01T12:04:10.000000Z", "key": 250}

    # An updated record becomes exactly one new event; the next scan starts after the cursor.
    sim.update(7, status="SHIPPED")
    calls = sim.calls
    drain(runner)
    assert sim.calls - calls == 2  # one page with the update, one empty page
    keys = event_keys(sqlite_store)
    assert len(keys) == 251 and sum(1 for k, _ in keys if k == 7) == 2


def test_page_number_paging_resumes_mid_scan_after_a_restart(sqlite_store: EventStore, sim: SoapSimulator) -> None:
    sim.add_orders(120)
    first = make_runner(sqlite_store, page_config(sim))
    for _ in range(5):
        first.run_once()
    stored = sqlite_store.get_cursor("legacy-orders")
    assert stored is not None and stored.cursor["page"] == 6
    first.close()  # the process stops (and releases the source's lease)

    second = make_runner(sqlite_store, page_config(sim))  # a new process: starts from the stored cursor
    drain(second)
    ids = [k for k, _ in event_keys(sqlite_store)]
    assert sorted(ids) == list(range(1, 121)) and len(ids) == len(set(ids))


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"paging": "page_number", "arguments": {"since": "{cursor.time}"}}, "needs a {page_number} placeholder"),
        ({"paging": "token", "next_page_token_path": None}, "paging token needs next_page_token_path"),
        ({"paging": "cursor", "arguments": {"pageNumber": "{page_number}"}}, "needs paging page_number"),
        ({"paging": "page_number", "next_page_token_path": "nextPageToken"}, "only used with paging token"),
        ({"paging": "pages"}, "token', 'page_number' or 'cursor'"),
    ],
)
def test_paging_configuration_errors_say_what_is_wrong(sim: SoapSimulator, over: dict[str, Any], message: str) -> None:
    cfg = page_config(sim)
    cfg.update(over)
    with pytest.raises(ValidationError) as info:
        SoapSource.parse_config(cfg)
    assert message in str(info.value)


def test_paging_defaults_to_token_with_a_token_path_and_to_cursor_without() -> None:
    base = {"wsdl": str(WSDL_PATH), "operation": "X", "records_path": "r", "key_field": "id", "time_field": "t"}
    assert SoapSource.parse_config({**base, "next_page_token_path": "n"}).paging == "token"  # type: ignore[attr-defined]
    assert SoapSource.parse_config(base).paging == "cursor"  # type: ignore[attr-defined]


# ------------------------------------------------------------------ scans over unsorted pages
def _response(orders: list[Order], *, token: str | None = None) -> bytes:
    body = "".join(simserver._order_xml(o) for o in orders)
    if token:
        body += f"<tns:nextPageToken>{token}</tns:nextPageToken>"
    return simserver._envelope(simserver.SOAP11, f"<tns:GetOrdersSinceResponse>{body}</tns:GetOrdersSinceResponse>")


def test_a_later_page_with_older_records_loses_nothing(sim: SoapSimulator) -> None:
    """Records are filtered against the scan's start, not against the newest record of earlier pages."""
    src = source(soap_config(sim))
    newest, older = Order(1, "A", 1, updated_at=T0 + timedelta(hours=2)), Order(2, "B", 2, updated_at=T0 + timedelta(hours=1))
    before_scan = Order(3, "C", 3, updated_at=T0)  # at the scan's start: read by the previous scan
    sim.serve_raw(_response([newest], token="p2"))
    first = src.fetch({"time": "2024-01-01T12:00:00Z", "key": 3}, 10)
    assert [r.data["id"] for r in first.records] == [1]
    assert first.cursor["page_token"] == "p2" and first.cursor["time"] == "2024-01-01T14:00:00.000000Z"

    sim.serve_raw(_response([older, before_scan]))  # page 2 is older than page 1's newest record
    second = src.fetch(first.cursor, 10)
    assert [r.data["id"] for r in second.records] == [2]
    assert second.cursor == {"time": "2024-01-01T14:00:00.000000Z", "key": 1}  # the newest seen, scan over
    src.close()


# ------------------------------------------------------------------ strict and lenient parsing
@pytest.fixture
def nonconformant(sim: SoapSimulator) -> SoapSimulator:
    sim.add_orders(3)
    sim.nonconformant = True  # every order carries an element the schema does not declare
    return sim


def test_strict_parsing_refuses_a_nonconformant_response_and_names_the_fix(nonconformant: SoapSimulator) -> None:
    src = source(soap_config(nonconformant))
    with pytest.raises(PermanentError, match=r"does not match the WSDL's schema: Unexpected element .*legacyFlag.*strict_then_lenient"):
        src.fetch(None, 10)
    src.close()


def test_strict_then_lenient_parses_the_same_response_again_and_flags_the_records(
    sqlite_store: EventStore, nonconformant: SoapSimulator
) -> None:
    runner = make_runner(sqlite_store, soap_config(nonconformant, parsing="strict_then_lenient"))
    calls = nonconformant.calls
    batch = runner.run_once()
    assert nonconformant.calls - calls == 1  # parsed twice, called once
    assert [r.lenient for r in batch.records] == [True, True, True]
    assert batch.records[0].data["_raw_elements"] == [{"tag": "legacyFlag", "text": "Y"}]
    envelopes = [e.event for e in sqlite_store.list_events(EventFilter(), limit=10)]
    assert len(envelopes) == 3 and all(e["lenient"] is True for e in envelopes)

    # A conformant response from the same source is strict again: no flag.
    nonconformant.nonconformant = False
    nonconformant.update(2, status="SHIPPED")
    batch = runner.run_once()
    assert [r.lenient for r in batch.records] == [False]
    newest = sqlite_store.list_events(EventFilter(), limit=10)[-1].event
    assert "lenient" not in newest


def test_strict_then_lenient_never_reparses_hostile_xml(sim: SoapSimulator) -> None:
    src = source(soap_config(sim, parsing="strict_then_lenient"))
    src.open()
    sim.serve_raw(b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>')
    with pytest.raises(PermanentError, match="DTD is forbidden"):
        src.fetch(None, 10)
    sim.serve_raw(b"<a>" * 100_000)
    with pytest.raises(PermanentError, match="invalid XML, or beyond the depth/size limits"):
        src.fetch(None, 10)
    src.close()


def test_lenient_parsing_flags_every_record(nonconformant: SoapSimulator) -> None:
    src = source(soap_config(nonconformant, parsing="lenient"))
    batch = src.fetch(None, 10)
    assert len(batch.records) == 3 and all(r.lenient for r in batch.records)
    src.close()


# ------------------------------------------------------------------ WSDL drift fingerprint
@pytest.fixture
def vendored(tmp_path: Path) -> Path:
    """A vendored WSDL with its XSD next to it, as operators are told to keep them."""
    for f in (WSDL_PATH, XSD_PATH):
        shutil.copy(f, tmp_path / f.name)
    return tmp_path / WSDL_PATH.name


def test_fingerprint_covers_the_wsdl_and_its_imported_xsd(vendored: Path, sim: SoapSimulator) -> None:
    src = source(soap_config(sim, wsdl=str(vendored), endpoint=sim.endpoint))
    first = src.fingerprint()
    assert set(first.parts) == {str(vendored), str(vendored.with_name(XSD_PATH.name))}
    assert src.fingerprint() == first  # stable while nothing changes

    xsd = vendored.with_name(XSD_PATH.name)
    xsd.write_text(xsd.read_text().replace('<xs:element name="note"', '<xs:element name="remark" type="xs:string" minOccurs="0"/>\n      <xs:element name="note"'))
    changed = src.fingerprint()
    assert changed.digest != first.digest
    assert changed.parts[str(vendored)] == first.parts[str(vendored)]
    assert changed.parts[str(xsd)] != first.parts[str(xsd)]
    src.close()


def test_fingerprint_follows_a_new_import_and_refuses_one_outside_the_wsdl_folder(vendored: Path, sim: SoapSimulator) -> None:
    src = source(soap_config(sim, wsdl=str(vendored), endpoint=sim.endpoint))
    src.open()
    (vendored.parent / "extra.xsd").write_text(
        '<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema" targetNamespace="urn:extra"/>'
    )
    text = vendored.read_text()
    vendored.write_text(text.replace("</wsdl:types>", '<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema" targetNamespace="urn:x"><xs:import namespace="urn:extra" schemaLocation="extra.xsd"/></xs:schema></wsdl:types>'))
    assert str(vendored.parent / "extra.xsd") in src.fingerprint().parts

    vendored.write_text(text.replace("</wsdl:types>", '<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema" targetNamespace="urn:x"><xs:import namespace="urn:evil" schemaLocation="../../etc/evil.xsd"/></xs:schema></wsdl:types>'))
    with pytest.raises(Exception, match="refused to load"):
        src.fingerprint()
    src.close()


def test_fingerprint_over_http_and_the_drift_settings(sim: SoapSimulator) -> None:
    src = source(soap_config(sim, drift={"check_interval": 60, "on_drift": "stop"}))
    fp = src.fingerprint()
    assert list(fp.parts) == [sim.base_url + "/"] and len(fp.digest) == 64
    assert src.drift_check_interval == 60 and src.stop_on_drift is True
    assert source(soap_config(sim)).stop_on_drift is False
    src.close()


def test_breaker_key_is_the_endpoint(sim: SoapSimulator) -> None:
    a, b = source(soap_config(sim)), source(soap_config(sim, page_size=5))
    a.open(), b.open()
    assert a.breaker_key() == b.breaker_key() == f"soap:{sim.endpoint}"
    a.close(), b.close()


def test_a_missing_wsdl_file_is_a_configuration_error(tmp_path: Path, sim: SoapSimulator) -> None:
    with pytest.raises(ConfigurationError, match="no such file"):
        source(soap_config(sim, wsdl=str(tmp_path / "gone.wsdl"))).open()
