"""The rules scorer: its expression language (parser and semantics), scores, explanations, version."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import ScoringSettings
from gateway.errors import ConfigurationError
from gateway.events import Event
from gateway.scoring import build_scorer
from gateway.scoring.rules import (
    RulesScorer,
    RuleSyntaxError,
    compile_condition,
    create,
)
from tests.unit.test_scoring_worker import make_events

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def event(data: Any = None, *, type_: str = "com.acme.payment", subject: str | None = "pay/1", **ext: Any) -> Event:
    return Event(
        id="evt-1", source="/legacy-gateway/sources/pay", type=type_, time=T0, subject=subject,
        data=data if data is not None else {}, extensions=ext,
    )


def holds(expr: str, ev: Event) -> bool:
    return compile_condition(expr).matches(ev)


def rules(*specs: tuple[str, float, str], default: float = 0.0, name: str = "r") -> RulesScorer:
    opts = {"rules": [{"when": w, "score": s, "reason": r} for w, s, r in specs], "default": default}
    return create(name, opts, ScoringSettings())


# --- parser --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "canonical"),
    [
        ("data.a > 1 or data.b > 2 and data.c > 3", "(data.a > 1 or (data.b > 2 and data.c > 3))"),
        ("(data.a > 1 or data.b > 2) and data.c > 3", "((data.a > 1 or data.b > 2) and data.c > 3)"),
        ("not data.a > 1 and data.b exists", "(not (data.a > 1) and data.b exists)"),
        ("not (data.a > 1 and data.b exists)", "not ((data.a > 1 and data.b exists))"),
        ("data.x not in ['a', \"b\", 1.50, true,]", 'data.x not in ["a", "b", 1.50, true]'),
        ("type=='t'  and   subject !=  \"s\"", '(type == "t" and subject != "s")'),
        ("extensions.sourcename == 'pay' or time >= '2024'", '(extensions.sourcename == "pay" or time >= "2024")'),
        ("data.items.0.sku == -2.5e3", "data.items.0.sku == -2.5E+3"),
        ("true", "true"),
    ],
)
def test_parser_precedence_and_canonical_form(expr: str, canonical: str) -> None:
    assert compile_condition(expr).canonical == canonical


def test_precedence_decides_results_not_only_the_shape() -> None:
    ev = event()
    assert holds("true or false and false", ev)  # and binds tighter than or
    assert not holds("(true or false) and false", ev)
    assert not holds("not true and false", ev) and holds("not (true and false)", ev)  # not binds tightest
    assert holds("not not true", ev)


@pytest.mark.parametrize(
    ("expr", "column", "fragment"),
    [
        ("data.amount >", 14, "expected a field, number, string or boolean, found end of the condition"),
        ("data.amount = 5", 13, "use == to compare"),
        ("data.a > 1 && data.b > 2", 12, "use and"),
        ("(data.a > 1", 12, "expected ')'"),
        ("data.a > 1)", 11, "unexpected ')'"),
        ("amount > 1", 1, "unknown field 'amount'"),
        ("data.a > 1 data.b", 12, "unexpected 'data.b'"),
        ("data.s == 'abc", 11, "unterminated string"),
        ("data.x in 5", 11, "expected '[' after in"),
        ("data.x in [1, data.y]", 15, "expected a number, string or boolean"),
        ("data.x in [1 2]", 14, "expected ',' or ']'"),
        ("5 exists", 1, "exists needs a field"),
        ("data.flag", 10, "expected an operator"),
        ("type.x == 1", 1, "type has no sub-fields"),
        ("extensions == 1", 1, "write extensions.<name>"),
        ("data.a > [1]", 10, "a list is only allowed after in"),
        ("", 1, "empty condition"),
        ("   ", 4, "empty condition"),
        ("not", 4, "expected a field"),
        ("(" * 40 + "true" + ")" * 40, 33, "nested deeper than 32"),
    ],
)
def test_syntax_errors_give_the_column_and_the_expression(expr: str, column: int, fragment: str) -> None:
    with pytest.raises(RuleSyntaxError) as info:
        compile_condition(expr)
    assert info.value.column == column
    assert fragment in str(info.value)
    assert str(info.value).startswith(f"column {column} of {expr!r}: ")


def test_invalid_condition_in_config_is_a_configuration_error_with_path_and_column() -> None:
    settings = ScoringSettings(
        models={"guard": {"kind": "rules", "options": {"rules": [
            {"when": "data.amount > 1", "score": 0.5, "reason": "ok"},
            {"when": "data.amount >> 1", "score": 0.5, "reason": "typo"},
        ]}}}
    )
    with pytest.raises(ConfigurationError) as info:
        build_scorer("guard", settings)
    assert str(info.value) == (
        "scoring.models.guard.options.rules.1.when: column 14 of 'data.amount >> 1': "
        "expected a field, number, string or boolean, found '>'"
    )


@pytest.mark.parametrize(
    ("options", "path", "fragment"),
    [
        ({"rules": [{"when": "true", "score": 1.5, "reason": "x"}]}, "options.rules.0.score", "less than or equal to 1"),
        ({"rules": [{"when": "true", "score": 0.5}]}, "options.rules.0.reason", "Field required"),
        ({"rules": [{"when": "true", "score": 0.5, "reason": "x", "weight": 1}]}, "options.rules.0.weight", "Extra"),
        ({"rules": []}, "options.rules", "at least 1 item"),
        ({"rules": [{"when": "true", "score": 0.5, "reason": "x"}], "default": -1}, "options.default", "greater than"),
        ({}, "options.rules", "Field required"),
    ],
)
def test_bad_options_name_their_path(options: dict[str, Any], path: str, fragment: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        create("guard", options, ScoringSettings())
    assert f"scoring.models.guard.{path}: " in str(info.value) and fragment in str(info.value)


# --- semantics -----------------------------------------------------------------------------------

DATA = {
    "amount": "12.50", "n": 7, "f": 0.1, "big": 10**30, "flag": True, "none": None, "name": "Zoë",
    "customer": {"country": "DE", "tier": 2}, "items": [{"sku": "A-1"}, {"sku": "B-2"}], "code": "007",
}


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("data.amount > 12", True),  # decimal string coerced when the other side is a number
        ("data.amount == 12.5", True),
        ("data.amount >= 12.51", False),
        ("data.amount < 100", True),
        ("data.amount > '100'", True),  # two strings compare as strings ("12.50" > "100")
        ("data.n == 7.0", True),
        ("data.n != 7", False),
        ("data.n <= 6.99", False),
        ("data.f == 0.1", True),  # exact decimal, not binary float noise
        ("data.big > 999999999999999999999999999", True),
        ("data.code == 7", True),
        ("data.code == '7'", False),
        ("data.flag == true", True),
        ("data.flag != false", True),
        ("data.flag == 1", False),  # booleans are not numbers
        ("data.flag > false", False),
        ("data.name == 'Zoë'", True),
        ("data.name > 5", False),  # type mismatch: false
        ("data.name != 5", False),  # ... also for !=
        ("data.customer.country == 'DE'", True),
        ("data.customer.tier in [1, 2]", True),
        ("data.customer.country in ['AT', 'CH']", False),
        ("data.customer.country not in ['AT', 'CH']", True),
        ("data.customer.country not in ['DE']", False),
        ("data.items.1.sku == 'B-2'", True),
        ("data.items.2.sku exists", False),
        ("data.items.x exists", False),
        ("data.customer exists", True),
        ("data.none exists", False),  # null counts as missing
        ("data.missing > 0", False),  # missing fields make comparisons false
        ("data.missing != 0", False),
        ("data.missing in [1]", False),
        ("data.missing not in [1]", False),
        ("not data.missing == 0", True),
        ("data.customer > 1", False),  # an object is comparable with nothing
        ("data.customer.country.x == 1", False),
        ("type == 'com.acme.payment' and source == '/legacy-gateway/sources/pay'", True),
        ("subject == 'pay/1' and id == 'evt-1'", True),
        ("time >= '2024-01-01' and time < '2024-01-02'", True),
        ("extensions.sourcename == 'pay'", True),
        ("extensions.other exists", False),
        ("data.n > data.customer.tier", True),  # fields on both sides
    ],
)
def test_condition_semantics(expr: str, expected: bool) -> None:
    assert holds(expr, event(DATA, sourcename="pay")) is expected


def test_non_object_data_and_missing_subject_are_just_missing_fields() -> None:
    assert not holds("data.amount > 1", event([1, 2]))
    assert holds("data.0 == 1", event([1, 2]))
    assert not holds("subject exists", event({}, subject=None))


# --- scores, explanations, version --------------------------------------------------------------


def test_first_matching_rule_wins_else_default_and_explanations_say_why() -> None:
    scorer = rules(
        ("data.status == 'paid' and data.amount >= 14", 0.9, "large paid order"),
        ("data.amount >= 12", 0.6, "large order"),
        ("data.amount >= 12 and data.status == 'new'", 0.99, "never reached"),
        default=0.05,
        name="fallback",
    )
    results = scorer.score_batch(make_events(6))  # amounts 10.50 .. 15.50, status new/paid alternating
    assert [r.score for r in results] == [0.05, 0.05, 0.6, 0.6, 0.6, 0.9]
    assert results[0].explanation == {"rule": None, "reason": "no rule matched", "matched": {}}
    assert results[4].explanation == {"rule": 1, "reason": "large order", "matched": {"data.amount": "14.50"}}
    assert results[5].explanation == {
        "rule": 0, "reason": "large paid order", "matched": {"data.status": "paid", "data.amount": "15.50"},
    }
    assert scorer.name == "fallback"
    assert scorer.score_batch(make_events(6)) == results  # stateless and deterministic


def test_matched_values_are_short_and_json_safe() -> None:
    scorer = rules(("data.note exists or data.customer exists or data.x == 1", 1.0, "any"))
    [result] = scorer.score_batch([event({"note": "x" * 500, "customer": {"a": 1, "b": 2}, "x": math.inf})])
    matched = result.explanation["matched"]  # type: ignore[index]
    assert matched == {"data.note": "x" * 199 + "\u2026", "data.customer": "<object with 2 keys>", "data.x": "inf"}
    json.dumps(result.explanation, allow_nan=False)


def test_version_follows_the_rules() -> None:
    base = rules(("data.amount > 10", 0.9, "big"))
    assert base.version.startswith("rules-") and len(base.version) == len("rules-") + 12
    assert rules(("data.amount > 10", 0.9, "big")).version == base.version
    assert rules(("data.amount>10", 0.9, "big"), name="other").version == base.version  # layout and name don't count
    changed = [
        rules(("data.amount > 11", 0.9, "big")),
        rules(("data.amount >= 10", 0.9, "big")),
        rules(("data.amount > 10", 0.8, "big")),
        rules(("data.amount > 10", 0.9, "large")),
        rules(("data.amount > 10", 0.9, "big"), default=0.1),
        rules(("data.amount > 10", 0.9, "big"), ("true", 0.1, "rest")),
    ]
    versions = {s.version for s in changed}
    assert base.version not in versions and len(versions) == len(changed)


# --- properties ----------------------------------------------------------------------------------

_KEYS = st.sampled_from(["amount", "customer", "country", "items", "0", "1", "flag", "status", "x"])
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.decimals(allow_nan=False).map(str), st.text(max_size=30),
    st.sampled_from(["12.50", "-0", "1e4", "1e99999", ".5", "DE", "paid", ""]),
)
_JSON = st.recursive(
    _SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=5), max_leaves=25
)
_PROPERTY_RULES = rules(
    ("data.amount > 1000 and data.customer.country not in ['DE', 'AT']", 0.95, "large foreign"),
    ("data.amount <= -1 or data.amount == '0'", 0.7, "odd amount"),
    ("data.items.0.amount >= data.amount", 0.6, "item above total"),
    ("not (data.flag == true) and data.status in ['new', 1, true, 2.5]", 0.5, "unflagged new"),
    ("data.customer.country exists and data.customer.country != 'DE'", 0.4, "foreign"),
    ("subject < 'm' or type > 'a' and extensions.sourcename == 'x'", 0.3, "envelope"),
    default=0.01,
)


_NUMBERISH = _SCALARS | st.integers(-5000, 5000) | st.decimals(-5000, 5000, places=2).map(str)
_SHAPED = st.fixed_dictionaries(
    {},
    optional={
        "amount": _NUMBERISH,
        "customer": st.fixed_dictionaries({}, optional={"country": _SCALARS | st.sampled_from(["DE", "AT", "FR"])})
        | _JSON,
        "items": st.lists(st.fixed_dictionaries({}, optional={"amount": _NUMBERISH}) | _JSON, max_size=3) | _JSON,
        "flag": _SCALARS,
        "status": _SCALARS | st.sampled_from(["new", "paid"]),
    },
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(_JSON, st.dictionaries(_KEYS, _JSON, max_size=6), _SHAPED),
    subject=st.none() | st.text(max_size=10),
    type_=st.text(min_size=1, max_size=20),
    source_name=st.sampled_from(["x", "y"]),
)
def test_any_event_gets_a_score_in_range_and_a_json_explanation(
    data: Any, subject: str | None, type_: str, source_name: str
) -> None:
    ev = event(data, subject=subject, type_=type_, sourcename=source_name)
    [result] = _PROPERTY_RULES.score_batch([ev])
    assert 0.0 <= result.score <= 1.0
    assert result.score in {0.95, 0.7, 0.6, 0.5, 0.4, 0.3, 0.01}
    json.dumps(result.explanation, allow_nan=False)
    for rule in _PROPERTY_RULES.rules:  # every condition, not only those before the first match
        assert rule.condition.matches(ev) in (True, False)
        json.dumps(rule.condition.matched_values(ev), allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("data.x y<>=!()[],'\"0123456789 andornotinexists-_")), max_size=40))
def test_the_parser_only_ever_raises_syntax_errors(text: str) -> None:
    try:
        compile_condition(text)
    except RuleSyntaxError as exc:
        assert 1 <= exc.column <= len(text) + 1
