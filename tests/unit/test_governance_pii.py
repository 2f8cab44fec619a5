"""PII policies (issue 8, decision 0011): drop, mask, keyed hash, tokenize; applied before acceptance."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import Settings
from gateway.events import Event
from gateway.governance import (
    Governance,
    PiiPolicy,
    PiiPolicySet,
    apply_pii,
    compile_path,
)
from gateway.store import EventFilter, EventStore
from gateway.store.contracts import ContractRepository

SECRET = "s" * 32
T0 = datetime(2026, 1, 1, tzinfo=UTC)
SSN = "123-45-6789"


def _ev(data: Any, subject: str | None = None, type_: str = "com.acme.customer.changed") -> Event:
    return Event(id="e1", source="/legacy-gateway/sources/crm", type=type_, time=T0, data=data, subject=subject)


def _set(*policies: PiiPolicy, secret: str | None = SECRET) -> PiiPolicySet:
    return PiiPolicySet(policies, secret)


def test_each_action_on_nested_and_array_paths_without_touching_the_input() -> None:
    data = {"customer": {"ssn": SSN, "email": "jo@example.com", "name": "Jo"},
            "cards": [{"number": "4111-1111-1111-1111"}, {"number": 5500000000000004}, {"other": 1}],
            "note": "call me", "amount": 5}
    pol = _set(PiiPolicy("data.customer.ssn", "hash"), PiiPolicy("data.customer.email", "mask", keep_last=4),
               PiiPolicy("data.cards[*].number", "tokenize"), PiiPolicy("data.note", "drop"),
               PiiPolicy("subject", "mask"))
    ev = _ev(data, subject=f"customer/{SSN}")
    out = apply_pii(ev, pol)
    assert ev.data["customer"]["ssn"] == SSN and ev.data["note"] == "call me"  # input unchanged
    alone = apply_pii(_ev({"customer": {"ssn": SSN}}), _set(PiiPolicy("data.customer.ssn", "hash")))
    assert out.data["customer"]["ssn"] == alone.data["customer"]["ssn"]  # same secret, same hash
    assert re.fullmatch(r"[0-9a-f]{64}", out.data["customer"]["ssn"])
    assert out.data["customer"]["email"] == "****.com" and out.data["customer"]["name"] == "Jo"
    tok = out.data["cards"][0]["number"]
    assert re.fullmatch(r"\d{4}-\d{4}-\d{4}-\d{4}", tok) and tok != "4111-1111-1111-1111"
    assert isinstance(out.data["cards"][1]["number"], int) and len(str(out.data["cards"][1]["number"])) == 16
    assert out.data["cards"][2] is data["cards"][2]  # untouched parts are shared
    assert "note" not in out.data and out.data["amount"] == 5
    assert out.subject == "****"
    # envelopes (API responses) work the same
    env = apply_pii(ev.to_dict(), pol)
    assert env["data"] == out.data and env["subject"] == "****"


def test_missing_paths_and_nulls_are_left_alone() -> None:
    pol = _set(PiiPolicy("data.customer.ssn", "hash"), PiiPolicy("data.cards[*].number", "tokenize"))
    ev = _ev({"customer": None, "cards": "n/a"})
    assert apply_pii(ev, pol) is ev
    ev2 = _ev({"customer": {"ssn": None}})
    assert apply_pii(ev2, pol).data == {"customer": {"ssn": None}}


def test_policies_apply_only_to_matching_types() -> None:
    pol = _set(PiiPolicy("data.ssn", "drop", types=("com.acme.customer.*",)))
    assert "ssn" not in apply_pii(_ev({"ssn": SSN}), pol).data
    other = _ev({"ssn": SSN}, type_="com.acme.order.created")
    assert apply_pii(other, pol) is other


@pytest.mark.parametrize("bad", ["", "id", "type.x", "data..x", "data.a[x]", "subject.x", "data.a*"])
def test_bad_paths_say_what_is_expected(bad: str) -> None:
    with pytest.raises(ValueError, match="field path|non-empty"):
        compile_path(bad)


def test_settings_refuse_hash_without_secret_and_never_show_it() -> None:
    with pytest.raises(Exception, match="needs governance.pii.secret"):
        Settings(governance={"pii": {"policies": [{"path": "data.ssn", "action": "hash"}]}})
    s = Settings(governance={"pii": {"secret": SECRET, "policies": [{"path": "data.ssn", "action": "hash"}]}})
    assert SECRET not in repr(s) and SECRET not in str(s.model_dump())
    assert SECRET not in repr(Governance.from_settings(s, None).pii)


def test_redacted_before_the_store_keeps_anything(any_store: EventStore) -> None:
    store = any_store if isinstance(any_store, ContractRepository) else type(
        "GovStore", (EventStore, ContractRepository), {})(any_store.engine)
    s = Settings(governance={
        "pii": {"secret": SECRET, "policies": [{"path": "data.ssn", "action": "hash"}]},
        "contracts": [{"types": ["#"], "mode": "freeze",
                       "schema": {"type": "object", "properties": {"ssn": {"type": "string", "maxLength": 3}}}}],
    })
    gov = Governance.from_settings(s, store)
    ev = Event(id="e2", source="/legacy-gateway/sources/crm", type="com.acme.customer.changed", time=T0,
               data={"ssn": SSN})
    _, out = gov.accept(store, [ev], source_name="crm")  # the hash violates maxLength: a dead letter
    assert len(out.rejects) == 1
    stored = store.list_events(EventFilter(), limit=10)
    dead = store.list_dead_letters(limit=10)
    text = repr([s.event for s in stored]) + repr([(d.payload, d.reason, d.headers) for d in dead])
    assert SSN not in text and "6789" not in text
    assert dead and dead[0].payload is not None and '"ssn":"' in dead[0].payload.replace(" ", "")


# ------------------------------------------------------------------ properties
_secret = st.text(min_size=32, max_size=40)
_pii = st.one_of(st.text(min_size=1, max_size=30), st.integers(min_value=-(10**12), max_value=10**12))


@settings(max_examples=300, deadline=None)
@given(_pii, _secret)
def test_mask_and_hash_never_leak_the_original(value: Any, secret: str) -> None:
    pol = _set(PiiPolicy("data.a", "mask"), PiiPolicy("data.b", "hash"), secret=secret)
    out = apply_pii(_ev({"a": value, "b": value}), pol).data
    assert out["a"] == "****"
    text = str(value)
    assert re.fullmatch(r"[0-9a-f]{64}", out["b"])
    if len(text) >= 4:  # shorter strings can occur in any hex digest by chance
        assert text not in out["b"]


@settings(max_examples=200, deadline=None)
@given(_pii, _secret, _secret)
def test_keyed_hash_and_token_are_deterministic_per_secret(value: Any, s1: str, s2: str) -> None:
    p1, p1b, p2 = (_set(PiiPolicy("data.v", "hash"), PiiPolicy("data.t", "tokenize"), secret=s) for s in (s1, s1, s2))
    a, b = (apply_pii(_ev({"v": value, "t": value}), p).data for p in (p1, p1b))
    assert a == b
    if s1 != s2:
        assert apply_pii(_ev({"v": value}), p2).data["v"] != a["v"]


@settings(max_examples=200, deadline=None)
@given(st.from_regex(r"\A[0-9]{3}-[0-9]{2}-[0-9]{4}\Z"))
def test_tokenize_preserves_format(ssn: str) -> None:
    tok = apply_pii(_ev({"ssn": ssn}), _set(PiiPolicy("data.ssn", "tokenize"))).data["ssn"]
    assert re.fullmatch(r"[0-9]{3}-[0-9]{2}-[0-9]{4}", tok)


def test_speed_per_event() -> None:
    """Report µs/event for a typical policy set; a loose bound keeps the hot path honest."""
    import time

    pol = _set(PiiPolicy("data.customer.ssn", "hash"), PiiPolicy("data.customer.email", "mask"),
               PiiPolicy("data.cards[*].number", "tokenize"), PiiPolicy("data.note", "drop"))
    ev = _ev({"customer": {"ssn": SSN, "email": "a@b.c", "name": "x"}, "cards": [{"number": "4111111111111111"}],
              "note": "n", **{f"f{i}": i for i in range(20)}})
    n = 5000
    t = time.perf_counter()
    for _ in range(n):
        apply_pii(ev, pol)
    per = (time.perf_counter() - t) / n * 1e6
    print(f"apply_pii: {per:.1f} us/event")
    assert per < 500
