"""Scorer plugins: discovery by entry points (gateway.scorers), named model instances, error messages."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

import gateway.plugins as discovery
from gateway.config import ScoringSettings, load_settings
from gateway.errors import ConfigurationError
from gateway.events import Event
from gateway.scoring import (
    SCORER_GROUP,
    OnlineAnomalyScorer,
    Scorer,
    ScoreResult,
    build_scorer,
    known_scorers,
    parse_options,
    registry,
    scorer_from_settings,
)
from gateway.scoring.rules import RulesScorer
from tests.plugins import install_fake_plugins
from tests.unit.test_scoring_worker import make_events


class ConstantOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    score: float = Field(ge=0, le=1)


class ConstantScorer:
    """A third-party scorer as a plugin author would write it."""

    def __init__(self, name: str, score: float) -> None:
        self.name, self.version, self.score = name, f"const-{score}", score

    def score_batch(self, events: Sequence[Event]) -> list[ScoreResult]:
        return [ScoreResult(self.score) for _ in events]


def create_constant(name: str, options: dict[str, Any], settings: ScoringSettings) -> ConstantScorer:
    return ConstantScorer(name, parse_options(ConstantOptions, name, options).score)


def create_not_a_scorer(name: str, options: dict[str, Any], settings: ScoringSettings) -> object:
    return object()


def _installed(message: str) -> list[str]:
    """The kinds listed after 'installed: ' in an error message."""
    return message.split("installed: ", 1)[1].rstrip(")").split(", ")


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    fakes = [
        EntryPoint("constant", f"{__name__}:create_constant", SCORER_GROUP),
        EntryPoint("broken", "tests.unit.no_such_scorer_module:create", SCORER_GROUP),
        EntryPoint("notascorer", f"{__name__}:create_not_a_scorer", SCORER_GROUP),
    ]
    hijackers = [
        EntryPoint("rules", f"{__name__}:create_constant", SCORER_GROUP),  # may not hijack a built-in
    ]
    yield from install_fake_plugins(monkeypatch, SCORER_GROUP, fakes, hijackers, registry._clear_cache)


def test_builtins_are_registered_by_entry_points() -> None:
    registry._clear_cache()
    eps = {ep.name: ep.value for ep in discovery.entry_points(group=SCORER_GROUP)}
    assert eps["online-anomaly"] == "gateway.scoring.registry:create_online"
    assert eps["rules"] == "gateway.scoring.rules:create"
    assert {"online-anomaly", "rules"} <= set(known_scorers())


def test_default_settings_still_build_the_online_model() -> None:
    scorer = scorer_from_settings(ScoringSettings(warmup=7, exclude_fields=["ref"]))
    assert isinstance(scorer, OnlineAnomalyScorer)
    assert (scorer.name, scorer.warmup, scorer.exclude_fields) == ("online-anomaly", 7, frozenset({"ref"}))


def test_named_online_model_takes_its_options_and_name() -> None:
    settings = ScoringSettings(
        model="fraud",
        warmup=7,
        models={"fraud": {"kind": "online-anomaly", "options": {"horizon": 500, "top_k": 5}}},
    )
    scorer = scorer_from_settings(settings)
    assert isinstance(scorer, OnlineAnomalyScorer)
    assert (scorer.name, scorer.horizon, scorer.top_k, scorer.warmup) == ("fraud", 500.0, 5, 7)
    assert OnlineAnomalyScorer.name == "online-anomaly"  # the class default is untouched


def test_build_scorer_builds_any_named_model() -> None:
    settings = ScoringSettings(
        models={
            "safety-net": {"kind": "rules", "options": {"rules": [{"when": "true", "score": 0.25, "reason": "all"}]}},
        }
    )
    net = build_scorer("safety-net", settings)
    assert isinstance(net, RulesScorer) and isinstance(net, Scorer) and net.name == "safety-net"
    assert [r.score for r in net.score_batch(make_events(3))] == [0.25] * 3
    assert isinstance(build_scorer("online-anomaly", settings), OnlineAnomalyScorer)  # a bare kind still works


def test_unknown_model_name_lists_configured_models_and_installed_kinds() -> None:
    settings = ScoringSettings(model="nope", models={"a": {"kind": "online-anomaly"}})
    with pytest.raises(ConfigurationError) as info:
        scorer_from_settings(settings)
    msg = str(info.value)
    assert msg.startswith("scoring.model: 'nope' is neither a configured model (scoring.models: a) ")
    assert _installed(msg) == known_scorers() and {"online-anomaly", "rules"} <= set(_installed(msg))


def test_unknown_kind_names_the_kind_path_and_lists_installed() -> None:
    settings = ScoringSettings(model="m", models={"m": {"kind": "xgboost"}})
    with pytest.raises(ConfigurationError) as info:
        scorer_from_settings(settings)
    msg = str(info.value)
    assert msg.startswith("scoring.models.m.kind: unknown scorer kind 'xgboost'; installed: ")
    assert _installed(msg) == known_scorers() and {"online-anomaly", "rules"} <= set(_installed(msg))


def test_bad_options_name_the_option_path() -> None:
    settings = ScoringSettings(
        model="m", models={"m": {"kind": "online-anomaly", "options": {"top_k": 0, "horison": 9}}}
    )
    with pytest.raises(ConfigurationError) as info:
        scorer_from_settings(settings)
    msg = str(info.value)
    assert "scoring.models.m.options.top_k: Input should be greater than or equal to 1 (got 0)" in msg
    assert "scoring.models.m.options.horison: Extra inputs are not permitted" in msg


def test_model_settings_refuse_unknown_keys_and_odd_names() -> None:
    with pytest.raises(ValueError, match="models.m.option"):
        ScoringSettings(models={"m": {"kind": "rules", "option": {}}})
    with pytest.raises(ValueError, match="model names must be"):
        ScoringSettings(models={"bad name": {"kind": "rules"}})
    with pytest.raises(ValueError, match="models.m.kind"):
        ScoringSettings(models={"m": {"options": {}}})


def test_models_load_from_yaml(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        "scoring:\n"
        "  model: guard\n"
        "  models:\n"
        "    guard:\n"
        "      kind: rules\n"
        "      options:\n"
        "        default: 0.1\n"
        "        rules:\n"
        "          - {when: 'data.amount >= 13', score: 0.8, reason: large}\n"
    )
    scorer = scorer_from_settings(load_settings(cfg).scoring)
    assert scorer.name == "guard"
    assert [r.score for r in scorer.score_batch(make_events(4))] == [0.1, 0.1, 0.1, 0.8]  # amounts 10.50..13.50


def test_third_party_plugin_is_discovered_and_validates_its_options(plugins: None) -> None:
    assert {"constant", "broken", "notascorer", "online-anomaly", "rules"} <= set(known_scorers())
    settings = ScoringSettings(model="c", models={"c": {"kind": "constant", "options": {"score": 0.5}}})
    scorer = scorer_from_settings(settings)
    assert isinstance(scorer, ConstantScorer) and scorer.name == "c"
    assert [r.score for r in scorer.score_batch(make_events(2))] == [0.5, 0.5]
    bad = ScoringSettings(model="c", models={"c": {"kind": "constant", "options": {"score": 2}}})
    with pytest.raises(ConfigurationError, match=r"scoring\.models\.c\.options\.score: .*less than or equal to 1"):
        scorer_from_settings(bad)
    missing = ScoringSettings(model="constant")  # a kind used by name gets empty options
    with pytest.raises(ConfigurationError, match=r"scoring\.models\.constant\.options\.score: Field required$"):
        scorer_from_settings(missing)


def test_a_plugin_cannot_take_over_a_builtin_name(plugins: None) -> None:
    settings = ScoringSettings(
        model="r", models={"r": {"kind": "rules", "options": {"rules": [{"when": "true", "score": 1, "reason": "x"}]}}}
    )
    assert isinstance(scorer_from_settings(settings), RulesScorer)


def test_import_failure_names_the_plugin_and_the_error(plugins: None) -> None:
    settings = ScoringSettings(model="b", models={"b": {"kind": "broken"}})
    with pytest.raises(ConfigurationError) as info:
        scorer_from_settings(settings)
    msg = str(info.value)
    assert "scoring.models.b.kind" in msg and "scorer plugin 'broken'" in msg
    assert "tests.unit.no_such_scorer_module:create" in msg and "ModuleNotFoundError" in msg


def test_a_factory_must_return_a_scorer(plugins: None) -> None:
    with pytest.raises(ConfigurationError, match="'notascorer' returned object, which is not a Scorer"):
        build_scorer("notascorer", ScoringSettings())


def test_option_errors_never_echo_values_of_secret_looking_fields() -> None:
    from pydantic import BaseModel, ConfigDict

    from gateway.errors import ConfigurationError
    from gateway.scoring.registry import parse_options

    class Opts(BaseModel):
        model_config = ConfigDict(extra="forbid")
        url: int
        headers: dict[str, int]
        size: int

    with pytest.raises(ConfigurationError) as info:
        parse_options(Opts, "remote", {"url": "https://u:hunter2@x", "headers": {"Authorization": "Bearer s3cr3t"},
                                       "size": "big"})
    text = str(info.value)
    assert "hunter2" not in text and "s3cr3t" not in text
    assert "scoring.models.remote.options.url" in text and "(got 'big')" in text
