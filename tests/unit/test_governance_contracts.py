"""Contracts per event type (issue 8): evolve / freeze / discard, schema-change events, persistence."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import Settings
from gateway.events import Event
from gateway.governance import (
    Contract,
    ContractEnforcer,
    Governance,
    evolve,
    infer,
    violations,
)
from gateway.store import EventStore
from gateway.store.contracts import ContractConflictError, ContractRepository

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _ev(i: int, data: Any, type_: str = "com.acme.order.created", source: str = "/legacy-gateway/sources/orders") -> Event:
    return Event(id=f"id-{type_}-{i}", source=source, type=type_, time=T0, data=data,
                 extensions={"sourcename": "orders"})


def _store(store: EventStore) -> Any:
    """The store with the contract mixin (the lead adds it to EventStore's bases)."""
    if isinstance(store, ContractRepository):
        return store
    cls = type("GovStore", (EventStore, ContractRepository), {})
    return cls(store.engine)


def _gov(store: Any, mode: str, schema: Any = None, types: tuple[str, ...] = ("com.acme.order.*",)) -> Governance:
    from gateway.governance.pii import PiiPolicySet

    return Governance(PiiPolicySet([]), ContractEnforcer([Contract(types, mode, schema)], store))


def _stored_types(store: Any) -> list[str]:
    from gateway.store import EventFilter

    return [s.event["type"] for s in store.list_events(EventFilter(), limit=100)]


# ------------------------------------------------------------------ evolve
def test_evolve_infers_then_widens_once_per_change(any_store: EventStore) -> None:
    store = _store(any_store)
    gov = _gov(store, "evolve")
    res, out = gov.accept(store, [_ev(1, {"id": 1, "amount": 5}), _ev(2, {"id": 2, "amount": 7})], source_name="orders")
    assert len(res.inserted) == 2 and len(out.extra_events) == 1
    (state,) = store.list_contract_states()
    assert state.version == 1 and state.schema["required"] == ["amount", "id"]

    # additive: a new optional field and integer -> number: accepted, version 2, one change event
    res, out = gov.accept(store, [_ev(3, {"id": 3, "amount": 7.5, "note": "x"}), _ev(4, {"id": 4, "amount": 1})],
                          source_name="orders")
    assert len(res.inserted) == 2 and not out.rejects
    (change,) = out.extra_events
    assert change.type == "com.acme.order.created.schema-changed"
    assert change.data["version"] == 2 and change.data["previousversion"] == 1
    assert change.data["source"] == "/legacy-gateway/sources/orders" and change.data["sourcename"] == "orders"
    assert "added optional field data.note (string)" in change.data["changes"]
    assert change.data["previousschema"]["properties"]["amount"] == {"type": "integer"}
    assert change.data["schema"]["properties"]["amount"] == {"type": "number"}
    assert store.list_contract_states()[0].version == 2
    # the change event is in the outbox, before the events that show the change
    types = _stored_types(store)
    assert types.count("com.acme.order.created.schema-changed") == 2
    assert types.index("com.acme.order.created.schema-changed", 1) < types.index("com.acme.order.created", 3)

    # the same shape again: no change, no event
    _, out = gov.accept(store, [_ev(5, {"id": 5, "amount": 2.5, "note": "y"})], source_name="orders")
    assert out.extra_events == [] and out.updates == []


def test_evolve_rejects_incompatible_change_and_accepts_the_rest(any_store: EventStore) -> None:
    store = _store(any_store)
    gov = _gov(store, "evolve")
    gov.accept(store, [_ev(1, {"id": 1, "customer": {"name": "a"}})], source_name="orders")
    res, out = gov.accept(store, [_ev(2, {"id": "two", "customer": {"name": "b"}}), _ev(3, {"id": 3, "customer": {"name": "c"}}),
                                  _ev(4, {"customer": {"name": "d"}})], source_name="orders")
    assert res.inserted == ["id-com.acme.order.created-3"]
    reasons = {r["event_id"]: r["reason"] for r in out.rejects}
    assert "data.id: expected type integer, got string" in reasons["id-com.acme.order.created-2"]
    assert "data.id: expected a required field, got absent" in reasons["id-com.acme.order.created-4"]
    assert "two" not in reasons["id-com.acme.order.created-2"].split(": ", 1)[1].replace("id-com", "")
    dead = store.list_dead_letters(stage="contract", limit=10)
    assert sorted(d.event_id for d in dead) == ["id-com.acme.order.created-2", "id-com.acme.order.created-4"]
    assert dead[0].headers["violations"][0]["path"].startswith("data.")


def test_freeze_rejects_with_clear_reason_and_accepts_the_rest(any_store: EventStore) -> None:
    store = _store(any_store)
    schema = {"type": "object", "required": ["id", "email"],
              "properties": {"id": {"type": "integer"}, "email": {"type": "string", "format": "email"},
                             "age": {"type": "integer", "minimum": 0}}}
    gov = _gov(store, "freeze", schema)
    res, out = gov.accept(store, [
        _ev(1, {"id": 1, "email": "a@example.com"}),
        _ev(2, {"id": 2, "email": "a@example.com", "age": "old"}),
        _ev(3, {"id": 3}),
        _ev(4, {"id": 4, "email": "a@example.com", "age": 3, "extra": True}),
    ], source_name="orders")
    assert res.inserted == ["id-com.acme.order.created-1", "id-com.acme.order.created-4"]
    by_id = {r["event_id"]: r for r in out.rejects}
    assert "data.age: expected type integer, got string" in by_id["id-com.acme.order.created-2"]["reason"]
    assert "data.email: expected a required field, got absent" in by_id["id-com.acme.order.created-3"]["reason"]
    assert by_id["id-com.acme.order.created-2"]["headers"]["mode"] == "freeze"
    assert store.count_dead_letters(stage="contract") == 2
    # the conforming new field is a new shape: tracked, one change event (creation + extra field, one batch)
    assert len(out.extra_events) == 1 and out.extra_events[0].data["enforced"] == schema
    # a retried batch (crash before the source acked) makes no second dead letter and no second change event
    res, out2 = gov.accept(store, [_ev(2, {"id": 2, "email": "a@example.com", "age": "old"})], source_name="orders")
    assert store.count_dead_letters(stage="contract") == 2 and out2.extra_events == []


def test_freeze_without_schema_freezes_the_first_batch(any_store: EventStore) -> None:
    store = _store(any_store)
    gov = _gov(store, "freeze")
    gov.accept(store, [_ev(1, {"id": 1, "name": "a"}), _ev(2, {"id": 2, "name": None})], source_name="orders")
    res, out = gov.accept(store, [_ev(3, {"id": 3.5, "name": "c"}), _ev(4, {"id": 4, "name": "d"})], source_name="orders")
    assert res.inserted == ["id-com.acme.order.created-4"]
    assert "data.id: expected type integer, got number" in out.rejects[0]["reason"]


def test_discard_drops_counts_and_logs_without_value(any_store: EventStore, caplog: pytest.LogCaptureFixture) -> None:
    store = _store(any_store)
    gov = _gov(store, "discard", {"type": "object", "properties": {"ssn": {"type": "integer"}}})
    res, out = gov.accept(store, [_ev(1, {"ssn": 1}), _ev(2, {"ssn": "123-45-6789"})], source_name="orders")
    assert res.inserted == ["id-com.acme.order.created-1"] and out.rejects == []
    assert sum(out.discarded.values()) == 1
    assert store.count_dead_letters() == 0
    assert "discarded 1 event" in caplog.text and "123-45-6789" not in caplog.text


def test_untyped_events_pass_and_shapes_are_per_source(any_store: EventStore) -> None:
    store = _store(any_store)
    gov = _gov(store, "evolve")
    res, out = gov.accept(store, [_ev(1, {"a": 1}, type_="com.other.x"), _ev(2, {"a": 1}),
                                  _ev(3, {"b": "x"}, source="/rest/client-a")], source_name=None)
    assert len(res.inserted) == 3
    assert len(_stored_types(store)) == 3 + 2  # two sources -> two states, two creation events
    assert {(s.source, s.version) for s in store.list_contract_states()} == {
        ("/legacy-gateway/sources/orders", 1), ("/rest/client-a", 1)}
    assert len(out.extra_events) == 2


def test_mode_change_to_freeze_keeps_what_was_learned(any_store: EventStore) -> None:
    store = _store(any_store)
    _gov(store, "evolve").accept(store, [_ev(1, {"a": 1})], source_name="orders")
    res, out = _gov(store, "freeze").accept(store, [_ev(2, {"a": "x"}), _ev(3, {"a": 2})], source_name="orders")
    assert res.inserted == ["id-com.acme.order.created-3"]
    assert out.extra_events[0].data["changes"] == ["mode evolve -> freeze"]
    assert store.list_contract_states()[0].enforced == {"type": "object", "properties": {"a": {"type": "integer"}},
                                                        "required": ["a"]}


def test_concurrent_writer_conflict_is_detected(sqlite_store: EventStore) -> None:
    store = _store(sqlite_store)
    gov = _gov(store, "evolve")
    gov.accept(store, [_ev(1, {"a": 1})], source_name="orders")
    stale = gov.prepare([_ev(2, {"a": 1, "b": 1})], "orders")
    gov.accept(store, [_ev(3, {"a": 1, "c": 1})], source_name="orders")  # another writer wins: v2
    with pytest.raises(ContractConflictError, match="changed meanwhile"):
        store.save_contract_updates(stale.updates, stale.extra_events)
    # Governance.accept re-checks against the winner and writes v3 with both fields
    gov.accept(store, [_ev(2, {"a": 1, "b": 1})], source_name="orders")
    (state,) = store.list_contract_states()
    assert state.version == 3 and set(state.schema["properties"]) == {"a", "b", "c"}


def test_configured_contract_from_settings_with_schema_file(tmp_path: Any, sqlite_store: EventStore) -> None:
    path = tmp_path / "order.json"
    path.write_text(json.dumps({"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}))
    s = Settings(governance={"contracts": [{"types": ["com.acme.#"], "mode": "freeze", "schema": str(path)}]})
    store = _store(sqlite_store)
    res, out = Governance.from_settings(s, store).accept(store, [_ev(1, {"id": "x"}), _ev(2, {"id": 2})])
    assert res.inserted == ["id-com.acme.order.created-2"] and len(out.rejects) == 1
    assert "data.id: expected type integer, got string" in out.rejects[0]["reason"]


# ------------------------------------------------------------------ properties
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False,
                     width=32), st.text(max_size=5))
_values = st.recursive(_scalars, lambda kids: st.one_of(st.lists(kids, max_size=3),
                       st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), kids, max_size=4)), max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(st.lists(_values, min_size=1, max_size=6))
def test_an_evolved_schema_still_accepts_every_earlier_event(values: list[Any]) -> None:
    schema = infer(values[0])
    accepted = [values[0]]
    for v in values[1:]:
        try:
            new, _ = evolve(schema, v)
        except ValueError:
            continue  # incompatible: rejected, the schema stays
        if violations(new, v):
            continue
        schema = new
        accepted.append(v)
        for earlier in accepted:
            assert violations(schema, earlier) == [], (schema, earlier)
