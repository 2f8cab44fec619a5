"""The event format: deterministic ids, CloudEvents validity, strict parsing."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from cloudevents.core.formats.json import JSONFormat
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import ContractError
from gateway.events import Event, event_id, jsonable, parse_time, utcnow
from gateway.events.scored import scored_event

keys = st.one_of(st.integers(), st.text(min_size=1, max_size=20), st.lists(st.integers(), min_size=1, max_size=3))
versions = st.one_of(st.none(), st.integers(), st.datetimes(timezones=st.just(timezone.utc)))


@given(source=st.text(min_size=1, max_size=10), key=keys, version=versions)
def test_same_input_same_id(source, key, version) -> None:
    assert event_id(source, "e", key, version) == event_id(source, "e", key, version)


@given(key=keys, v=st.integers(min_value=0, max_value=10**9))
def test_new_version_new_id(key, v) -> None:
    assert event_id("s", "e", key, v) != event_id("s", "e", key, v + 1)


def test_same_instant_in_other_zone_same_id() -> None:
    utc = datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)
    berlin = utc.astimezone(timezone(timedelta(hours=1)))
    assert event_id("s", "e", 1, utc) == event_id("s", "e", 1, berlin)
    assert event_id("s", "e", 1, utc) != event_id("s", "e", 1, utc + timedelta(microseconds=1))


def test_source_and_entity_are_part_of_the_id() -> None:
    assert event_id("a", "e", 1, 1) != event_id("b", "e", 1, 1)
    assert event_id("a", "e", 1, 1) != event_id("a", "f", 1, 1)


def _event(**kw) -> Event:
    base = dict(
        id=event_id("orders", "order", 1, 1),
        source="/legacy-gateway/sources/orders",
        type="com.acme.order.changed",
        time=utcnow(),
        subject="order/1",
        data={"amount": jsonable(Decimal("12.30")), "when": jsonable(datetime(2024, 1, 1, tzinfo=timezone.utc))},
        extensions={"sourcename": "orders", "sourceposition": '{"key":1}', "sourceadapter": "sql"},
    )
    base.update(kw)
    return Event(**base)


def test_event_and_scored_event_parse_with_official_sdk() -> None:
    ev = _event()
    parsed = JSONFormat().read(None, ev.to_json())
    assert parsed.get_id() == ev.id
    assert parsed.get_extension("sourcename") == "orders"
    assert parsed.get_data()["amount"] == "12.30"
    sc = scored_event(ev, score=0.7, model_name="m", model_version="1", explanation={"amount": 3.1})
    sparsed = JSONFormat().read(None, sc.to_json())
    assert sparsed.get_type() == "com.acme.order.changed.scored"
    assert sparsed.get_data()["score"] == 0.7
    assert sparsed.get_data()["event"]["id"] == ev.id


def test_round_trip() -> None:
    ev = _event()
    back = Event.from_json(ev.to_json())
    assert back == ev


@pytest.mark.parametrize(
    ("patch", "where"),
    [
        ({"specversion": "0.3"}, "event.specversion"),
        ({"id": ""}, "event.id"),
        ({"type": 5}, "event.type"),
        ({"time": "yesterday"}, "event.time"),
        ({"Bad_Ext": "x"}, "event.Bad_Ext"),
        ({"ext": {"nested": 1}}, "event.ext"),
    ],
)
def test_invalid_events_name_the_attribute(patch, where) -> None:
    obj = _event().to_dict()
    obj.update(patch)
    with pytest.raises(ContractError, match=where.replace(".", r"\.")):
        Event.from_dict(obj)


def test_not_json() -> None:
    with pytest.raises(ContractError, match="not valid JSON"):
        Event.from_json(b"{nope")


def test_time_is_utc_with_microseconds() -> None:
    ev = _event(time=datetime(2024, 5, 1, 14, 0, 0, 1, tzinfo=timezone(timedelta(hours=2))))
    assert json.loads(ev.to_json())["time"] == "2024-05-01T12:00:00.000001Z"
    assert parse_time("2024-05-01T12:00:00.000001Z") == ev.time


def test_jsonable_keeps_decimals_exact() -> None:
    assert jsonable(Decimal("0.1000000000000000055511151231257827")) == "0.1000000000000000055511151231257827"
    assert jsonable(float("nan")) is None
    assert jsonable(b"\x00\x01") == "AAE="


@given(name=st.text(max_size=200))
def test_fast_uuid5_equals_the_standard_library(name: str) -> None:
    import uuid

    from gateway.events.ids import EVENT_NAMESPACE, uuid5

    assert uuid5(name) == str(uuid.uuid5(EVENT_NAMESPACE, name))


def test_scored_event_embeds_the_original_bytes_verbatim() -> None:
    ev = _event()
    body = ev.to_json()
    a = scored_event(ev, score=0.5, model_name="m", model_version="1", original_json=body)
    b = scored_event(ev, score=0.5, model_name="m", model_version="1", scored_at=a.time)
    assert json.loads(a.to_json()) == json.loads(b.to_json())
