"""mapping.parse: legacy field values (YYYYMMDD dates, implied decimals, flags) parsed before mapping."""

from __future__ import annotations

from datetime import date, datetime, timezone
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from adapters.base import Batch, Record
from gateway.config import MappingSettings, SourceSettings
from gateway.errors import ContractError
from gateway.sources.mapping import Mapper
from gateway.sources.runner import SourceRunner
from gateway.store import EventStore
from tests.unit.test_source_breaker import MemorySource


def mapper(parse: dict[str, Any], **over: Any) -> Mapper:
    m = MappingSettings.model_validate(
        {"type": "com.acme.booking.changed", "entity": "booking", "key": ["id"], "parse": parse, **over}
    )
    return Mapper(m, "ledger", "sql")


def test_dates_datetimes_decimals_ints_flags_and_strings() -> None:
    m = mapper(
        {
            "posting_date": {"type": "date", "nulls": ["00000000"]},
            "value_date": {"type": "date", "format": "%d.%m.%Y"},
            "booked_at": {"type": "datetime", "format": "%Y%m%d%H%M%S", "timezone": "Europe/Berlin"},
            "amount": {"type": "decimal", "scale": 2},
            "rate": {"type": "decimal", "decimal_separator": ",", "thousands_separator": "."},
            "branch": {"type": "int"},
            "active": {"type": "bool", "true": ["J"], "false": ["N", ""]},
            "name": {"type": "string"},
        },
        time="booked_at",
    )
    ev = m.to_event(
        Record(
            data={
                "id": 7, "posting_date": "20240229", "value_date": "01.03.2024", "booked_at": "20240331033000",
                "amount": "000123456", "rate": "1.234,5678", "branch": "0042", "active": "J", "name": "  MUELLER   ",
            }
        )
    )
    assert ev.data == {
        "id": 7, "posting_date": "2024-02-29", "value_date": "2024-03-01", "booked_at": "2024-03-31T01:30:00.000000Z",
        "amount": "1234.56", "rate": "1234.5678", "branch": 42, "active": True, "name": "MUELLER",
    }
    # The event time comes from the parsed field: 03:30 CEST on the DST day is 01:30 UTC.
    assert ev.time == datetime(2024, 3, 31, 1, 30, tzinfo=timezone.utc)
    before = m.to_event(Record(data={**ev.data, "booked_at": "20240331013000", "amount": "1", "rate": "1",
                                     "posting_date": "20240101", "value_date": "01.01.2024", "active": "N",
                                     "branch": "1", "name": "x"}))
    assert before.time == datetime(2024, 3, 31, 0, 30, tzinfo=timezone.utc)  # 01:30 CET, before the change


def test_nulls_and_values_already_of_the_target_type_pass() -> None:
    m = mapper({"d": {"type": "date", "nulls": ["00000000", "99999999"]}, "n": {"type": "decimal", "scale": 2},
                "b": {"type": "bool"}, "i": {"type": "int", "nulls": [""]}})
    ev = m.to_event(Record(data={"id": 1, "d": "99999999", "n": Decimal("12.5"), "b": False, "i": "   "}))
    assert ev.data == {"id": 1, "d": None, "n": "0.125", "b": False, "i": None}
    ev = m.to_event(Record(data={"id": 2, "d": date(2024, 1, 2), "n": None, "b": None, "i": 5}))
    assert ev.data == {"id": 2, "d": "2024-01-02", "n": None, "b": None, "i": 5}


@pytest.mark.parametrize(
    ("rule", "value", "message"),
    [
        ({"type": "date"}, "20240230", "field 'v': '20240230' does not parse as date with format '%Y%m%d'"),
        ({"type": "decimal"}, "12x", "field 'v': '12x' does not parse as decimal"),
        ({"type": "decimal"}, "NaN", "field 'v': 'NaN' does not parse as decimal"),
        ({"type": "int"}, "4.5", "field 'v': '4.5' does not parse as int"),
        ({"type": "bool"}, "maybe", "does not parse as bool (expected one of ['Y', '1', 'J', 'T'] (true)"),
        ({"type": "datetime"}, "2024" + "0" * 60, "... does not parse as datetime with format '%Y%m%d%H%M%S'"),
    ],
)
def test_a_value_that_does_not_fit_is_a_contract_error_naming_field_rule_and_value(
    rule: dict[str, Any], value: str, message: str
) -> None:
    with pytest.raises(ContractError) as info:
        mapper({"v": rule}).to_event(Record(data={"id": 1, "v": value}))
    assert message in str(info.value) and str(info.value).startswith("source 'ledger': ")


@pytest.mark.parametrize(
    ("parse", "message"),
    [
        ({"d": {"type": "dates"}}, "expected tags: 'date', 'datetime', 'decimal', 'int', 'bool', 'string'"),
        ({"d": {"type": "date", "fmt": "%Y"}}, "Extra inputs are not permitted"),
        ({"d": {"type": "datetime", "timezone": "Mars/Olympus"}}, "unknown time zone 'Mars/Olympus'"),
        ({"d": {"type": "decimal", "scale": -1}}, "greater than or equal to 0"),
    ],
)
def test_bad_rules_are_configuration_errors(parse: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        MappingSettings.model_validate({"type": "t.x", "entity": "e", "key": ["id"], "parse": parse})
    assert message in str(info.value)


def test_an_unparseable_record_goes_to_dead_letters_and_the_batch_flows(sqlite_store: EventStore) -> None:
    settings = SourceSettings.model_validate(
        {
            "name": "mem", "adapter": "memory",
            "mapping": {"type": "com.acme.booking.changed", "entity": "booking", "key": ["id"],
                        "parse": {"amount": {"type": "decimal", "scale": 2}}},
        }
    )
    rows = [{"id": 1, "amount": "000000100"}, {"id": 2, "amount": "00000x100"}, {"id": 3, "amount": "000000300"}]
    runner = SourceRunner(settings, sqlite_store, adapter=MemorySource(rows), sleep=lambda _: None)
    batch: Batch = runner.run_once()
    assert len(batch.records) == 3
    stats = sqlite_store.stats()
    assert stats["events"] == 2 and stats["dead_letters"] == 1
    (dead,) = sqlite_store.list_dead_letters()
    assert "field 'amount': '00000x100' does not parse as decimal" in dead.reason
    assert '"00000x100"' in (dead.payload or "")  # the raw record is kept for replay
