"""The built-in online anomaly model (gateway.scoring.online)."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import ScoringSettings
from gateway.errors import ConfigurationError
from gateway.events import Event
from gateway.scoring import OnlineAnomalyScorer, Scorer, scorer_from_settings
from gateway.scoring.features import extract_features

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
TX = "com.acme.payment.created"


def ev(data: Any, type_: str = TX, i: int = 0) -> Event:
    return Event(id=f"e{i}", source="/test", type=type_, time=T0, data=data)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney U / (n_pos * n_neg), with average ranks for ties."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average rank over each run of ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = labels.astype(bool)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def transactions(n: int = 2000, anomaly_rate: float = 0.02, seed: int = 7) -> tuple[list[Event], np.ndarray]:
    """Synthetic payments.

    Normal: amount lognormal(mean log 4, sigma 0.5) sent as an exact-decimal string ("54.60"),
    one of 5 merchant categories (skewed frequencies), one of 3 countries, quantity 1-4, a unique
    customer_id (must be ignored). Anomalies (2%, never in the first 100 events): half have a 20x
    amount, half an unseen country.
    """
    rng = np.random.default_rng(seed)
    cats = ["grocery", "fuel", "travel", "electronics", "dining"]
    countries = ["DE", "FR", "NL"]
    labels = np.zeros(n, dtype=int)
    anomalous = rng.choice(np.arange(100, n), size=int(n * anomaly_rate), replace=False)
    labels[anomalous] = 1
    events = []
    for i in range(n):
        amount = rng.lognormal(4.0, 0.5)
        country = countries[rng.integers(0, 3)]
        if labels[i]:
            if i % 2:
                amount *= 20
            else:
                country = "KP"
        data = {
            "customer_id": int(rng.integers(1, 10**9)),
            "amount": f"{amount:.2f}",
            "merchant_category": cats[rng.choice(5, p=[0.4, 0.25, 0.15, 0.1, 0.1])],
            "country": country,
            "quantity": int(rng.integers(1, 5)),
        }
        events.append(ev(data, i=i))
    return events, labels


def score_stream(model: OnlineAnomalyScorer, events: list[Event], batch: int = 100) -> list[Any]:
    out = []
    for i in range(0, len(events), batch):
        out.extend(model.score_batch(events[i : i + batch]))
    return out


def test_factory_builds_the_builtin_and_rejects_unknown_names() -> None:
    scorer = scorer_from_settings(ScoringSettings(warmup=7, exclude_fields=["ref"]))
    assert isinstance(scorer, OnlineAnomalyScorer) and isinstance(scorer, Scorer)
    assert (scorer.name, scorer.warmup, "ref" in scorer.exclude_fields) == ("online-anomaly", 7, True)
    with pytest.raises(ConfigurationError, match="online-anomaly"):
        scorer_from_settings(ScoringSettings(model="nope"))


def test_feature_extraction_rules() -> None:
    f = extract_features(
        {"id": 1, "order_id": 2, "customerId": 3, "amount": "123.45", "zip": "02139", "ok": True,
         "a": {"b": {"c": 1.5, "d": {"too": "deep"}}}, "tags": ["x"], "note": "x" * 200, "none": None},
        exclude=("id",),
    )
    assert set(f.numeric) == {"amount", "a.b.c"}
    assert set(f.categorical) == {"zip", "ok"}
    assert f.numeric["amount"][1] == "123.45"
    assert math.isclose(f.numeric["amount"][0], math.log1p(123.45))


def test_warmup_scores_zero_then_real_scores() -> None:
    model = OnlineAnomalyScorer(warmup=30)
    events, _ = transactions(200, anomaly_rate=0.0)
    # One batch that straddles the warm-up boundary: the first 30 are warm-up, the rest scored.
    results = model.score_batch(events[:50])
    assert all(r.score == 0.0 and r.explanation["warmup"] is True for r in results[:30])
    assert all("warmup" not in r.explanation for r in results[30:])
    assert all(r.explanation["features_used"] == 4 for r in results[30:])  # customer_id ignored


def test_scores_in_range_and_anomalies_ranked_high() -> None:
    events, labels = transactions()
    model = OnlineAnomalyScorer(warmup=30)
    scores = np.array([r.score for r in score_stream(model, events)])
    assert ((scores >= 0) & (scores <= 1)).all()
    live = np.arange(len(events)) >= 100  # past warm-up
    auc = roc_auc(scores[live], labels[live])
    pos, neg = scores[live & (labels == 1)], scores[live & (labels == 0)]
    print(f"ROC-AUC={auc:.4f} mean anomaly={pos.mean():.3f} mean normal={neg.mean():.3f}")
    assert auc >= 0.9
    assert pos.mean() > neg.mean() + 0.4
    # Calibration: with score = 1 - Bonferroni p, at most ~alpha of normal events pass 1 - alpha.
    assert (neg >= 0.99).mean() <= 0.03


def test_explanation_names_the_anomalous_feature() -> None:
    model = OnlineAnomalyScorer(warmup=30)
    events, _ = transactions(500, anomaly_rate=0.0)
    score_stream(model, events)
    base = dict(events[0].data)
    big = model.score_batch([ev({**base, "amount": "99999.00"}, i=1)])[0]
    assert big.score > 0.99
    top = big.explanation["features"][0]
    assert (top["feature"], top["kind"], top["value"]) == ("amount", "numeric", "99999.00")
    assert top["z"] > 5
    odd = model.score_batch([ev({**base, "country": "KP"}, i=2)])[0]
    assert odd.score > 0.99
    assert odd.explanation["features"][0]["feature"] == "country"
    json.dumps(big.explanation, allow_nan=False)  # JSON-safe


def test_state_is_per_event_type() -> None:
    model = OnlineAnomalyScorer(warmup=30)
    rng = np.random.default_rng(1)
    small = [ev({"amount": float(rng.normal(10, 1))}, "type.a", i) for i in range(300)]
    large = [ev({"amount": float(rng.normal(10_000, 500))}, "type.b", i) for i in range(300)]
    score_stream(model, small + large)
    a, b = model.score_batch([ev({"amount": 10.5}, "type.a"), ev({"amount": 10.5}, "type.b")])
    assert a.score < 0.9
    assert b.score > 0.999


def test_anomaly_does_not_mask_itself_within_a_batch() -> None:
    model = OnlineAnomalyScorer(warmup=30)
    events, _ = transactions(300, anomaly_rate=0.0)
    score_stream(model, events)
    burst = [ev({**events[0].data, "amount": "50000.00"}, i=i) for i in range(50)]
    results = model.score_batch(burst)
    assert min(r.score for r in results) > 0.99  # all scored against the state before the batch


def test_state_dict_round_trip_gives_identical_scores() -> None:
    events, _ = transactions(600)
    a = OnlineAnomalyScorer(warmup=30)
    score_stream(a, events[:400])
    state = json.loads(json.dumps(a.state_dict(), allow_nan=False))  # JSON-safe
    b = OnlineAnomalyScorer(warmup=30)
    b.load_state_dict(state)
    assert score_stream(a, events[400:]) == score_stream(b, events[400:])
    with pytest.raises(ValueError):
        b.load_state_dict({**state, "model": {"name": "other", "version": "1"}})


def test_high_cardinality_strings_are_dropped_not_flagged() -> None:
    model = OnlineAnomalyScorer(warmup=30, max_categories=50)
    results = score_stream(model, [ev({"ref": f"R{i}", "amount": 10 + i % 3}, i=i) for i in range(300)])
    assert max(r.score for r in results[100:]) < 0.99
    assert model.state_dict()["types"][TX]["categorical"]["ref"]["dropped"] is True


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30) | st.decimals(
    allow_nan=False, allow_infinity=False
).map(str)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.dictionaries(st.text(max_size=8), json_values, max_size=6), json_values), min_size=1, max_size=40))
def test_any_json_data_never_raises_and_scores_in_range(payloads: list[Any]) -> None:
    model = OnlineAnomalyScorer(warmup=3)
    events = [ev(p, type_=f"t{i % 2}", i=i) for i, p in enumerate(payloads)]
    results = model.score_batch(events[: len(events) // 2]) + model.score_batch(events[len(events) // 2 :])
    assert len(results) == len(events)
    for r in results:
        assert 0.0 <= r.score <= 1.0 and math.isfinite(r.score)
        json.dumps(r.explanation, allow_nan=False)
    json.dumps(model.state_dict(), allow_nan=False)
