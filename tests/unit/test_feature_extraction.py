"""Feature extraction from a configured spec (gateway.scoring.extract)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pytest

from gateway.errors import ConfigurationError, ContractError
from gateway.events import Event
from gateway.scoring.extract import FeatureExtractor, hash_bucket

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
WHERE = "scoring.models.fraud.options.features"

SPEC: list[dict[str, Any]] = [
    {"name": "amount", "path": "data.amount", "type": "number"},
    {"name": "country", "path": "data.customer.country", "type": "category",
     "encoding": {"one_hot": {"categories": ["DE", "FR", "US"]}}},
    {"name": "present", "path": "data.card_present", "type": "boolean", "default": False},
    {"name": "merchant", "path": "data.merchant", "type": "category", "encoding": {"hash": {"buckets": 4}}},
    {"name": "kind", "path": "type", "type": "category", "encoding": {"one_hot": {"categories": ["com.acme.pay"]}}},
]


def event(data: Any, id_: str = "evt-1", type_: str = "com.acme.pay", subject: str | None = "pay/1") -> Event:
    return Event(id=id_, source="/legacy-gateway/sources/payments", type=type_, time=T0, data=data, subject=subject)


def payment(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"amount": "12.50", "customer": {"country": "FR"}, "card_present": True, "merchant": "acme"}
    data.update(over)
    return data


def test_columns_are_in_spec_order_with_encoded_names() -> None:
    ex = FeatureExtractor.from_config(SPEC, WHERE)
    assert ex.columns == (
        "amount", "country=DE", "country=FR", "country=US", "present",
        "merchant#0", "merchant#1", "merchant#2", "merchant#3", "kind=com.acme.pay",
    )
    assert ex.width == 10


def test_matrix_values_and_dtype() -> None:
    ex = FeatureExtractor.from_config(SPEC, WHERE)
    out = ex.extract([event(payment()), event(payment(amount=3, customer={"country": "US"}, card_present=None), "evt-2")])
    assert out.matrix.dtype == np.float32
    assert out.matrix.shape == (2, 10)
    bucket = hash_bucket("acme", 4)
    first = np.zeros(10, dtype=np.float32)
    first[[0, 2, 4, 5 + bucket, 9]] = [12.5, 1, 1, 1, 1]
    np.testing.assert_array_equal(out.matrix[0], first)
    second = np.zeros(10, dtype=np.float32)
    second[[0, 3, 5 + bucket, 9]] = [3, 1, 1, 1]  # card_present null -> default False -> 0
    np.testing.assert_array_equal(out.matrix[1], second)
    assert out.values[0] == {"amount": 12.5, "country": "FR", "present": True, "merchant": "acme", "kind": "com.acme.pay"}
    assert out.values[1]["present"] is False


def test_unknown_category_encodes_as_all_zeros() -> None:
    ex = FeatureExtractor.from_config(SPEC, WHERE)
    row = ex.extract([event(payment(customer={"country": "GB"}))]).matrix[0]
    assert row[1:4].tolist() == [0.0, 0.0, 0.0]
    other_type = ex.extract([event(payment(), type_="com.acme.refund")]).matrix[0]
    assert other_type[9] == 0.0


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("12.50", 12.5), (" 12.50 ", 12.5), ("-1e3", -1000.0), (".5", 0.5), ("007", 7.0), (42, 42.0), (0.25, 0.25)],
)
def test_numbers_and_decimal_strings(raw: Any, expected: float) -> None:
    ex = FeatureExtractor.from_config([SPEC[0]], WHERE)
    assert ex.extract([event({"amount": raw})]).matrix[0, 0] == pytest.approx(expected)


@pytest.mark.parametrize("raw", ["12,50", "abc", "", "NaN", "inf", True, {"v": 1}, [1], 1e400])
def test_non_numeric_value_for_a_number_feature_is_a_contract_error(raw: Any) -> None:
    ex = FeatureExtractor.from_config([SPEC[0]], WHERE)
    with pytest.raises(ContractError) as info:
        ex.extract([event({"amount": 1}, "ok-1"), event({"amount": raw}, "evt-bad")])
    assert "evt-bad" in str(info.value) and "data.amount" in str(info.value)


@pytest.mark.parametrize("data", [{"customer": {"country": "FR"}}, {"amount": None}, {"customer": 5}, "text", None])
def test_missing_feature_without_default_names_event_and_path(data: Any) -> None:
    ex = FeatureExtractor.from_config([SPEC[0]], WHERE)
    with pytest.raises(ContractError, match=r"event evt-7: feature 'amount': data\.amount is missing and has no default"):
        ex.extract([event(data, "evt-7")])


def test_missing_nested_path_uses_default() -> None:
    spec = [{"name": "country", "path": "data.customer.country", "type": "category", "default": "DE",
             "encoding": {"one_hot": {"categories": ["DE", "FR"]}}}]
    ex = FeatureExtractor.from_config(spec, WHERE)
    m = ex.extract([event({"customer": 5}), event({}), event({"customer": {"country": None}}), event({"customer": {"country": "FR"}})])
    assert m.matrix.tolist() == [[1, 0], [1, 0], [1, 0], [0, 1]]


@pytest.mark.parametrize(
    ("raw", "expected"), [(True, 1.0), (False, 0.0), (1, 1.0), (0, 0.0), ("TRUE", 1.0), ("false", 0.0), ("1", 1.0)]
)
def test_booleans(raw: Any, expected: float) -> None:
    ex = FeatureExtractor.from_config([{"name": "b", "path": "data.b", "type": "boolean"}], WHERE)
    assert ex.extract([event({"b": raw})]).matrix[0, 0] == expected


@pytest.mark.parametrize("raw", ["yes", 2, 0.5, "maybe"])
def test_bad_boolean_is_a_contract_error(raw: Any) -> None:
    ex = FeatureExtractor.from_config([{"name": "b", "path": "data.b", "type": "boolean"}], WHERE)
    with pytest.raises(ContractError, match=r"evt-1.*data\.b"):
        ex.extract([event({"b": raw})])


def test_categories_compare_as_text() -> None:
    spec = [{"name": "code", "path": "data.code", "type": "category", "encoding": {"one_hot": {"categories": [7, "x", True]}}}]
    ex = FeatureExtractor.from_config(spec, WHERE)
    assert ex.columns == ("code=7", "code=x", "code=true")
    m = ex.extract([event({"code": "7"}), event({"code": 7.0}), event({"code": True}), event({"code": "y"})]).matrix
    assert m.tolist() == [[1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0]]
    with pytest.raises(ContractError, match="data.code"):
        ex.extract([event({"code": {"nested": 1}})])


def test_envelope_paths_and_list_indexes() -> None:
    spec = [
        {"name": "subj", "path": "subject", "type": "category", "default": "none",
         "encoding": {"one_hot": {"categories": ["pay/1", "none"]}}},
        {"name": "src", "path": "source", "type": "category", "encoding": {"hash": {"buckets": 3}}},
        {"name": "first_price", "path": "data.items.0.price", "type": "number", "default": -1},
    ]
    ex = FeatureExtractor.from_config(spec, WHERE)
    out = ex.extract([event({"items": [{"price": "2.5"}]}), event({"items": []}, subject=None)])
    assert out.values[0] == {"subj": "pay/1", "src": "/legacy-gateway/sources/payments", "first_price": 2.5}
    assert out.values[1] == {"subj": "none", "src": "/legacy-gateway/sources/payments", "first_price": -1.0}
    assert out.matrix[:, :2].tolist() == [[1, 0], [0, 1]]


def test_hash_bucket_follows_the_documented_formula() -> None:
    for text in ("acme", "Zürich", "", "merchant-123"):
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
        assert hash_bucket(text, 1000) == int.from_bytes(digest, "big") % 1000


def test_hash_encoding_is_deterministic_across_processes() -> None:
    spec = [{"name": "m", "path": "data.m", "type": "category", "encoding": {"hash": {"buckets": 64}}}]
    texts = [f"merchant-{i}" for i in range(40)]
    here = FeatureExtractor.from_config(spec, WHERE).extract([event({"m": t}) for t in texts]).matrix.argmax(axis=1).tolist()
    assert len(set(here)) > 10  # the texts spread over the buckets
    script = (
        "import json, sys; from datetime import datetime, timezone\n"
        "from gateway.events import Event; from gateway.scoring.extract import FeatureExtractor\n"
        "spec, texts = json.loads(sys.argv[1])\n"
        "ev = [Event(id='e', source='/s', type='t', time=datetime(2024, 1, 1, tzinfo=timezone.utc), data={'m': t}) for t in texts]\n"
        "print(json.dumps(FeatureExtractor.from_config(spec).extract(ev).matrix.argmax(axis=1).tolist()))\n"
    )
    for seed in ("1", "2"):  # Python's str hash differs per seed; the buckets must not
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run(
            [sys.executable, "-c", script, json.dumps([spec, texts])], capture_output=True, text=True, env=env, check=True
        )
        assert json.loads(proc.stdout) == here


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ([{"name": "a", "path": "data.a", "type": "number", "colour": 1}],
         r"features\.0\.colour: unknown option; expected one of: name, path, type, default, encoding"),
        ([{"name": "a", "path": "payload.a", "type": "number"}], r"features\.0\.path: expected type, source, subject or data"),
        ([{"name": "a", "path": "data..a", "type": "number"}], r"features\.0\.path: expected"),
        ([{"name": "a", "path": "data.a", "type": "text"}], r"features\.0\.type: Input should be 'number', 'category' or 'boolean'"),
        ([{"name": "a", "path": "data.a", "type": "category"}], r"features\.0\.encoding: a category feature needs an encoding"),
        ([{"name": "a", "path": "data.a", "type": "number", "encoding": {"hash": {"buckets": 2}}}],
         r"features\.0\.encoding: only category features take an encoding"),
        ([{"name": "a", "path": "data.a", "type": "category", "encoding": {}}],
         r"features\.0\.encoding: expected exactly one of one_hot"),
        ([{"name": "a", "path": "data.a", "type": "category", "encoding": {"hash": {"buckets": 0}}}],
         r"features\.0\.encoding\.hash\.buckets: Input should be greater than or equal to 1 \(got 0\)"),
        ([{"name": "a", "path": "data.a", "type": "category", "encoding": {"one_hot": {"categories": ["x", "x"]}}}],
         r"features\.0\.encoding\.one_hot\.categories: categories must be unique, these repeat: x"),
        ([{"name": "a", "path": "data.a", "type": "number", "default": "lots"}],
         r"features\.0\.default: default 'lots' does not fit a number feature"),
        ([{"name": "a", "path": "data.a", "type": "number"}, {"path": "data.b", "type": "number"}],
         r"features\.1\.name: required option is missing"),
        ([{"name": "a", "path": "data.a", "type": "number"}] * 2, r"features: feature names must be unique, these repeat: a"),
        ([], r"features: List should have at least 1 item"),
    ],
)
def test_bad_spec_names_the_option_path(spec: Any, expected: str) -> None:
    with pytest.raises(ConfigurationError, match=rf"^(.*; )?scoring\.models\.fraud\.options\.{expected}"):
        FeatureExtractor.from_config(spec, WHERE)
