"""The SOAP adapter against the legacy SOAP simulator over real HTTP (no external services)."""

from __future__ import annotations

import enum
import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from datetime import time as clock_time
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from adapters.soap import SoapFaultError, SoapSource, to_plain
from adapters.soap.simulator import WSDL_PATH, Order, SoapSimulator
from gateway.config import SourceSettings
from gateway.errors import ConfigurationError, PermanentError, TransientError
from gateway.resilience import RetryPolicy
from gateway.sources.runner import SourceRunner
from gateway.store import EventStore


@pytest.fixture
def sim() -> Iterator[SoapSimulator]:
    before = set(threading.enumerate())
    with SoapSimulator() as s:
        yield s
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not leaked, f"simulator leaked threads: {leaked}"


def soap_config(sim: SoapSimulator, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "wsdl": sim.wsdl_url,
        "operation": "GetOrdersSince",
        "arguments": {"since": "{cursor.time}", "pageToken": "{page_token}", "pageSize": "{page_size}"},
        "records_path": "orders",
        "next_page_token_path": "nextPageToken",
        "key_field": "id",
        "time_field": "updatedAt",
        "page_size": 10,
        "timeouts": {"connect": 2, "read": 5, "operation": 5},
    }
    cfg.update(over)
    return cfg


def settings(cfg: dict[str, Any]) -> SourceSettings:
    return SourceSettings.model_validate(
        {
            "name": "legacy-orders",
            "adapter": "soap",  # not registered in this session: the adapter is passed explicitly
            "config": cfg,
            "mapping": {
                "type": "com.acme.order.changed",
                "entity": "order",
                "key": ["id"],
                "version": "updatedAt",
                "time": "updatedAt",
                "subject": "order/{id}",
            },
        }
    )


def make_runner(store: EventStore, cfg: dict[str, Any], **kw: Any) -> SourceRunner:
    s = settings(cfg)
    adapter = SoapSource(SoapSource.parse_config(s.config), source_name=s.name)  # type: ignore[arg-type]
    return SourceRunner(s, store, adapter=adapter, sleep=lambda _: None, **kw)


def drain(runner: SourceRunner, most: int = 1000) -> int:
    for polls in range(1, most + 1):
        if not runner.run_once().has_more:
            return polls
    raise AssertionError("source never ran dry")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest) -> EventStore:
    """The gateway store of the acceptance tests: SQLite, and PostgreSQL (a real server) as integration."""
    return request.getfixturevalue("sqlite_store" if request.param == "sqlite" else "pg_store")  # type: ignore[no-any-return]


def test_5000_records_over_50_pages_become_5000_events(store: EventStore, sim: SoapSimulator) -> None:
    sim.add_orders(5000)
    r = make_runner(store, soap_config(sim, page_size=100))
    assert drain(r) == 50
    assert sim.calls == 50
    assert store.stats()["events"] == 5000
    assert r.status.events_accepted == 5000 and r.status.duplicates == 0
    cursor = store.get_cursor("legacy-orders").cursor  # type: ignore[union-attr]
    assert cursor == {"time": "2024-01-01T13:23:20.000000Z", "key": 5000}
    # Polling again: the inclusive "since" returns the last record; the adapter filters it out.
    drain(r)
    assert store.stats()["events"] == 5000 and r.status.duplicates == 0
    r.adapter.close()


def test_updated_record_becomes_exactly_one_new_event(store: EventStore, sim: SoapSimulator) -> None:
    sim.add_orders(25)
    r = make_runner(store, soap_config(sim))
    drain(r)
    sim.update(7, status="SHIPPED")
    drain(r)
    assert store.stats()["events"] == 26
    assert r.status.events_accepted == 26 and r.status.duplicates == 0
    drain(r)
    assert store.stats()["events"] == 26
    r.adapter.close()


def test_restart_in_the_middle_of_paging_loses_and_repeats_nothing(store: EventStore, sim: SoapSimulator) -> None:
    sim.add_orders(95)
    cfg = soap_config(sim)
    first = make_runner(store, cfg)
    for _ in range(4):
        assert first.run_once().has_more
    cursor = store.get_cursor("legacy-orders").cursor  # type: ignore[union-attr]
    assert cursor["page_token"] and cursor["key"] == 40
    # The runner is gone, the committed cursor stays. (A stop that releases the source's lease: after a
    # real crash the restarted runner would wait as standby until the dead one's lease expired.)
    first.close()
    sim.update(3, status="CANCELLED")  # updated behind the scan: comes once more at the end
    second = make_runner(store, cfg)
    drain(second)
    assert second.status.duplicates == 0
    assert second.status.events_accepted == 56
    assert store.stats()["events"] == 96
    second.adapter.close()


def test_soap_12_binding_and_vendored_wsdl_file(sqlite_store: EventStore, sim: SoapSimulator) -> None:
    sim.add_orders(12)
    cfg = soap_config(sim, wsdl=str(WSDL_PATH), endpoint=sim.endpoint, port="LegacyOrdersSoap12Port")
    r = make_runner(sqlite_store, cfg)
    drain(r)
    assert sqlite_store.stats()["events"] == 12
    transport = r.adapter.transport  # type: ignore[attr-defined]
    # zeep loads the WSDL and its XSD; the drift fingerprint (at start) reads the same two again.
    assert {p.rsplit("/", 1)[-1] for p in transport.loads} == {"legacy_orders.wsdl", "legacy_orders.xsd"}
    assert transport.refused == []
    r.adapter.close()


def test_basic_auth(sqlite_store: EventStore, sim: SoapSimulator) -> None:
    sim.add_orders(3)
    sim.require_auth("gateway", "s3cret-pw")
    ok = make_runner(sqlite_store, soap_config(sim, auth={"type": "basic", "username": "gateway", "password": "s3cret-pw"}))
    drain(ok)
    assert sqlite_store.stats()["events"] == 3
    ok.adapter.close()
    # Wrong password: a ConfigurationError (not retried, not dead-lettered), password not shown.
    bad_cfg = soap_config(sim, auth={"type": "basic", "username": "gateway", "password": "wrong-pw-123"})
    bad = SoapSource(SoapSource.parse_config(bad_cfg), source_name="legacy-orders")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="rejected the credentials") as ei:
        bad.open()
    assert "wrong-pw-123" not in str(ei.value)
    # Credentials revoked after start: fetch fails the same way.
    sim.require_auth(None)
    bad.open()
    sim.require_auth("gateway", "another")
    with pytest.raises(ConfigurationError, match=r"HTTP 401"):
        bad.fetch(None, 10)
    bad.close()


@pytest.mark.parametrize("kind", ["http502", "http503", "http504", "soap_server"])
def test_transient_faults_are_retried_and_recover(sqlite_store: EventStore, sim: SoapSimulator, kind: str) -> None:
    sim.add_orders(5)
    r = make_runner(sqlite_store, soap_config(sim), retry=RetryPolicy(attempts=5, base_delay=0.01, max_delay=0.01))
    r.start()
    sim.fail_next(3, kind)
    calls_before = sim.calls
    drain(r)
    assert sim.calls - calls_before == 4  # three faults, then the answer
    assert sqlite_store.stats()["events"] == 5
    assert isinstance(r.adapter.classify_error(_raised(r.adapter, sim, kind)), TransientError)
    r.adapter.close()


@pytest.mark.parametrize("port", ["LegacyOrdersSoap11Port", "LegacyOrdersSoap12Port"])
def test_faults_configured_as_transient_are_retried_and_recover(sqlite_store: EventStore, sim: SoapSimulator, port: str) -> None:
    # A soap:Client (1.1) / soap:Sender (1.2) fault is a business answer, unless its code is listed.
    sim.add_orders(5)
    cfg = soap_config(sim, port=port, transient_fault_codes=["ORD-BUSY"])
    r = make_runner(sqlite_store, cfg, retry=RetryPolicy(attempts=5, base_delay=0.01, max_delay=0.01))
    r.start()
    sim.fail_next(3, "soap_client", code="ORD-BUSY")
    calls_before = sim.calls
    drain(r)
    assert sim.calls - calls_before == 4  # three busy faults, then the answer
    assert sqlite_store.stats()["events"] == 5
    err = r.adapter.classify_error(_raised(r.adapter, sim, "soap_client", code="ORD-BUSY"))
    assert isinstance(err, TransientError) and "ORD-BUSY" in str(err)
    r.close()  # releases the source's lease for the next runner
    # The same fault with a code the source does not list stays permanent: one call, no retry.
    other = make_runner(sqlite_store, soap_config(sim, port=port, transient_fault_codes=["SOMETHING-ELSE"]),
                        retry=RetryPolicy(attempts=5, base_delay=0.01, max_delay=0.01))
    other.start()
    sim.update(2, status="SHIPPED")
    sim.fail_next(1, "soap_client", code="ORD-BUSY")
    calls_before = sim.calls
    with pytest.raises(SoapFaultError) as ei:
        other.run_once()
    assert sim.calls - calls_before == 1 and ei.value.detail_code == "ORD-BUSY"
    other.adapter.close()


def _raised(adapter: Any, sim: SoapSimulator, kind: str, **kw: Any) -> BaseException:
    sim.fail_next(1, kind, **kw)
    try:
        adapter.fetch(None, 10)
    except BaseException as exc:  # noqa: BLE001
        return exc
    raise AssertionError("no fault")


def test_business_fault_is_permanent_with_code_and_not_retried(sqlite_store: EventStore, sim: SoapSimulator) -> None:
    sim.add_orders(5)
    sim.business_fault("ORD-042", "since is before the archive horizon")
    r = make_runner(sqlite_store, soap_config(sim))
    r.start()
    calls_before = sim.calls
    with pytest.raises(SoapFaultError) as ei:
        r.run_once()
    assert sim.calls - calls_before == 1  # never retried
    err = ei.value
    assert isinstance(err, PermanentError)
    assert err.detail_code == "ORD-042" and err.fault_code is not None and err.fault_code.endswith("Client")
    assert "ORD-042" in str(err) and "archive horizon" in str(err)
    assert sqlite_store.get_cursor("legacy-orders") is None or sqlite_store.get_cursor("legacy-orders").cursor is None  # type: ignore[union-attr]
    r.adapter.close()


def _timed_failed_fetch(src: SoapSource) -> tuple[float, Exception]:
    """Seconds until ``fetch`` failed, and how the adapter classifies the failure."""
    t0 = time.monotonic()
    with pytest.raises(Exception) as ei:
        src.fetch(None, 10)
    return time.monotonic() - t0, src.classify_error(ei.value)


@pytest.mark.parametrize("mode", ["hang", "delay", "trickle"])
def test_hung_endpoint_is_bounded_by_the_operation_timeout(sim: SoapSimulator, mode: str) -> None:
    sim.add_orders(3)
    cfg = soap_config(sim, timeouts={"connect": 1, "read": 30, "operation": 1.0})
    src = SoapSource(SoapSource.parse_config(cfg), source_name="legacy-orders")  # type: ignore[arg-type]
    src.open()  # the WSDL loads normally
    if mode == "hang":
        sim.hang = True
    elif mode == "delay":
        sim.delay = 5.0
    else:
        sim.trickle = 0.05  # a byte every 50 ms: the read timeout never trips
    elapsed, err = _timed_failed_fetch(src)
    assert elapsed < 1.0 + 1.0, elapsed
    assert isinstance(err, TransientError)
    src.close()


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A loopback port whose accept queue is full: new connections are never established."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = int(srv.getsockname()[1])
    fillers = []
    for _ in range(3):  # fill the (tiny) backlog; later SYNs are dropped, so connect() waits
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        fillers.append(c)
    time.sleep(0.1)
    yield port
    for c in fillers:
        c.close()
    srv.close()


def test_connect_timeout_bounds_an_endpoint_that_never_accepts(sim: SoapSimulator, blackhole: int) -> None:
    cfg = soap_config(sim, endpoint=f"http://127.0.0.1:{blackhole}/soap", timeouts={"connect": 0.5, "read": 30, "operation": 30})
    src = SoapSource(SoapSource.parse_config(cfg), source_name="legacy-orders")  # type: ignore[arg-type]
    src.open()  # the WSDL comes from the simulator; the calls go to the port that never accepts
    elapsed, err = _timed_failed_fetch(src)
    assert 0.4 < elapsed < 1.5, elapsed
    assert isinstance(err, TransientError) and "ConnectTimeout" in str(err)
    src.close()


def test_read_timeout_bounds_a_silent_answer_before_the_operation_timeout(sim: SoapSimulator) -> None:
    sim.add_orders(3)
    cfg = soap_config(sim, timeouts={"connect": 1, "read": 0.5, "operation": 30})
    src = SoapSource(SoapSource.parse_config(cfg), source_name="legacy-orders")  # type: ignore[arg-type]
    src.open()
    sim.hang = True  # the request is read, no byte of an answer follows
    elapsed, err = _timed_failed_fetch(src)
    assert 0.4 < elapsed < 1.5, elapsed
    assert isinstance(err, TransientError) and "ReadTimeout" in str(err)
    src.close()


def test_to_plain_converts_every_kind_of_value_to_json_safe_data() -> None:
    class Colour(enum.Enum):
        RED = "red"

    value = {
        "date": date(2024, 2, 29),
        "time": clock_time(23, 59, 1),
        "offset": datetime(2024, 3, 1, 1, 30, tzinfo=timezone(timedelta(hours=2))),  # read as UTC
        "naive": datetime(2024, 1, 1, 12, 0),  # no offset: taken as UTC
        "duration": timedelta(days=1, hours=2),
        "decimal": Decimal("12345678901234567.8901"),
        "enum": Colour.RED,
        "nested": [[1, None], {"deep": [Decimal("0.10")]}],
        "bytes": b"ab",
        "nil": None,
    }
    plain = to_plain(value)
    assert plain == {
        "date": "2024-02-29",
        "time": "23:59:01",
        "offset": "2024-02-29T23:30:00.000000Z",
        "naive": "2024-01-01T12:00:00.000000Z",
        "duration": "P1DT2H",
        "decimal": "12345678901234567.8901",
        "enum": "red",
        "nested": [[1, None], {"deep": ["0.10"]}],
        "bytes": "YWI=",
        "nil": None,
    }
    json.dumps(plain)  # JSON-safe as it is


def test_conversion_decimals_datetimes_nil_enum_attribute_nested(sim: SoapSimulator) -> None:
    sim.upsert(
        Order(
            id=1, customer="Müller & Söhne <GmbH>", amount=Decimal("12345678901234567.8901"), status="CANCELLED",
            updated_at=datetime(2024, 2, 29, 23, 59, 59, 123456, tzinfo=UTC),
            note=None, note_present=True, currency="CHF", lines=(("A-1", 2), ("B-2", 1)),
        )
    )
    sim.upsert(Order(id=2, customer="x", amount=Decimal("0.10"), updated_at=datetime(2024, 3, 1, tzinfo=UTC),
                     note="fragile", currency=None))
    src = SoapSource(SoapSource.parse_config(soap_config(sim)), source_name="legacy-orders")  # type: ignore[arg-type]
    batch = src.fetch(None, 100)
    first, second = (dict(r.data) for r in batch.records)
    assert first == {
        "id": 1,
        "customer": "Müller & Söhne <GmbH>",
        "amount": "12345678901234567.8901",
        "status": "CANCELLED",
        "updatedAt": "2024-02-29T23:59:59.123456Z",
        "note": None,
        "lines": [{"sku": "A-1", "qty": 2}, {"sku": "B-2", "qty": 1}],
        "currency": "CHF",
    }
    assert second["amount"] == "0.10" and second["note"] == "fragile" and second["currency"] is None
    assert second["updatedAt"] == "2024-03-01T00:00:00.000000Z"
    assert batch.cursor == {"time": "2024-03-01T00:00:00.000000Z", "key": 2} and not batch.has_more
    assert not batch.records[0].lenient
    src.close()


def test_config_validation() -> None:
    base = {"wsdl": "x.wsdl", "operation": "Op", "records_path": "r", "key_field": "id", "time_field": "t"}
    with pytest.raises(Exception, match="unknown placeholder"):
        SoapSource.parse_config({**base, "arguments": {"since": "{__import__('os')}"}})
    with pytest.raises(Exception, match="needs username and password"):
        SoapSource.parse_config({**base, "auth": {"type": "basic"}})
    with pytest.raises(ValidationError, match=r"timeouts\.operation"):
        SoapSource.parse_config({**base, "timeouts": {"operation": None}})
    cfg = SoapSource.parse_config(base)
    assert cfg.timeouts.operation == 60.0  # type: ignore[attr-defined]
    src = SoapSource(cfg, source_name="s")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="no such file"):
        src.open()


def test_unknown_operation_is_a_configuration_error(sim: SoapSimulator) -> None:
    src = SoapSource(SoapSource.parse_config(soap_config(sim, operation="DropTables")), source_name="s")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="no operation 'DropTables'.*GetOrdersSince"):
        src.open()


def test_service_and_port_selection(sim: SoapSimulator) -> None:
    sim.add_orders(2)
    chosen = SoapSource(SoapSource.parse_config(soap_config(sim, service="LegacyOrdersService", port="LegacyOrdersSoap12Port")), source_name="s")  # type: ignore[arg-type]
    assert len(chosen.fetch(None, 10).records) == 2
    assert chosen._binding.name.localname == "LegacyOrdersSoap12"  # the SOAP 1.2 binding was used
    chosen.close()
    bad_service = SoapSource(SoapSource.parse_config(soap_config(sim, service="Nope")), source_name="s")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"config.service: no service 'Nope' \(services: LegacyOrdersService\)"):
        bad_service.open()
    bad_port = SoapSource(SoapSource.parse_config(soap_config(sim, port="Nope")), source_name="s")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"config.port: no port 'Nope' in service 'LegacyOrdersService' \(ports: LegacyOrdersSoap11Port, LegacyOrdersSoap12Port\)"):
        bad_port.open()
