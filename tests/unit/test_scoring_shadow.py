"""Shadow scoring: deterministic sampling, failure isolation and the comparison report (issue 7)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from gateway.config import ScoringSettings
from gateway.events import Event
from gateway.scoring import ScoreResult
from gateway.scoring.routing import Shadow, build_shadow, in_sample, sample_point
from gateway.store import EventStore, ScoreRecord
from tests.unit.test_scoring_worker import T0, TEST_QUEUE, Rig, make_events


class Const:
    def __init__(self, name: str, score: float, *, broken: bool = False) -> None:
        self.name, self.version, self.score, self.broken = name, "1", score, broken
        self.calls: list[list[str]] = []

    def score_batch(self, events: Sequence[Event]) -> list[ScoreResult]:
        self.calls.append([e.id for e in events])
        if self.broken:
            raise RuntimeError("shadow model exploded")
        return [ScoreResult(self.score) for _ in events]


def test_sampling_is_deterministic_and_near_the_fraction() -> None:
    ids = [f"evt-{i}" for i in range(2000)]
    for fraction in (0.1, 0.25, 0.5):
        picked = [i for i in ids if in_sample(i, fraction)]
        assert abs(len(picked) / len(ids) - fraction) < 0.03, (fraction, len(picked))
        assert picked == [i for i in ids if in_sample(i, fraction)]  # the same decision every time
    assert {i for i in ids if in_sample(i, 0.1)} <= {i for i in ids if in_sample(i, 0.25)}  # nested samples
    assert not any(in_sample(i, 0.0) for i in ids) and all(in_sample(i, 1.0) for i in ids)
    assert all(0.0 <= sample_point(i) < 1.0 for i in ids)
    assert sample_point("evt-1") == sample_point("evt-1")


def test_shadow_scores_the_sample_stores_it_and_does_not_publish(bus_prefix: str, sqlite_store: EventStore) -> None:
    shadow = Const("challenger", 0.8)
    rig = Rig(bus_prefix, sqlite_store, scorer=Const("champion", 0.2), shadow=Shadow(shadow, 0.5))  # type: ignore[arg-type]
    events = make_events(40)
    rig.send(events)
    rig.drain()

    ids = [e.id for e in events]
    expected = {i for i in ids if in_sample(i, 0.5)}
    assert 5 < len(expected) < 35
    assert len(sqlite_store.get_scores(ids, "champion", "1")) == 40
    assert set(sqlite_store.get_scores(ids, "challenger", "1")) == expected
    assert {i for c in shadow.calls for i in c} == expected
    assert rig.worker.shadow_scored == len(expected) and rig.worker.shadow_failures == 0
    assert rig.depth(TEST_QUEUE) == 40  # only the primary's scored events are published

    # A redelivery is not scored again, by either model.
    rig.send(events[:10])
    rig.drain()
    assert rig.worker.shadow_scored == len(expected)

    report = sqlite_store.compare_scores("champion", "challenger")
    assert report.count == len(expected) and report.agreement == 0.0
    assert report.mean_abs_diff == pytest.approx(0.6)


def test_a_failing_shadow_never_touches_the_primary_path(bus_prefix: str, sqlite_store: EventStore) -> None:
    shadow = Const("challenger", 0.8, broken=True)
    rig = Rig(bus_prefix, sqlite_store, scorer=Const("champion", 0.2), shadow=Shadow(shadow, 1.0))  # type: ignore[arg-type]
    events = make_events(25)
    rig.send(events)
    rig.drain()

    assert rig.worker.scored == 25 and rig.worker.dead_lettered == 0 and rig.worker.retried == 0
    assert rig.depth(TEST_QUEUE) == 25 and rig.depth(rig.topo.scoring_queue) == 0
    assert rig.worker.shadow_failures + rig.worker.shadow_skipped > 0 and rig.worker.shadow_scored == 0
    assert sqlite_store.get_scores([e.id for e in events], "challenger", "1") == {}
    assert sqlite_store.list_dead_letters() == []


def _rec(event_id: str, model: str, score: float) -> ScoreRecord:
    return ScoreRecord(event_id, model, "1", score, None, "t", "s", T0, T0)


def test_comparison_report_numbers(sqlite_store: EventStore) -> None:
    primary = [0.05, 0.15, 0.55, 0.95, 1.0, 0.3]
    shadow = [0.10, 0.60, 0.45, 0.90, 1.0]  # the last primary event has no shadow score
    sqlite_store.save_scores([_rec(f"e{i}", "champion", s) for i, s in enumerate(primary)])
    sqlite_store.save_scores([_rec(f"e{i}", "challenger", s) for i, s in enumerate(shadow)])
    sqlite_store.save_scores([_rec("x", "other", 0.5)])

    r = sqlite_store.compare_scores("champion", "challenger")
    assert r.count == 5
    # same side of 0.5: e0 yes, e1 no, e2 no, e3 yes, e4 yes
    assert r.agreement == pytest.approx(3 / 5)
    assert r.mean_abs_diff == pytest.approx((0.05 + 0.45 + 0.10 + 0.05 + 0.0) / 5)
    assert r.primary_histogram == [1, 1, 0, 0, 0, 1, 0, 0, 0, 2]
    assert r.shadow_histogram == [0, 1, 0, 0, 1, 0, 1, 0, 0, 2]
    assert sqlite_store.compare_scores("champion", "challenger", threshold=0.1).agreement == pytest.approx(4 / 5)

    empty = sqlite_store.compare_scores("champion", "nobody")
    assert empty.count == 0 and empty.agreement is None and empty.mean_abs_diff is None
    assert empty.primary_histogram == [0] * 10
    assert r.to_dict()["count"] == 5


def test_shadow_from_settings() -> None:
    sc = ScoringSettings.model_validate({"shadow": {"model": "online-anomaly-2", "fraction": 0.2},
                                         "models": {"online-anomaly-2": {"kind": "online-anomaly"}}})
    sh = build_shadow(sc)
    assert sh is not None and sh.scorer.name == "online-anomaly-2" and sh.fraction == 0.2
    assert build_shadow(ScoringSettings()) is None
    with pytest.raises(ValueError):
        ScoringSettings.model_validate({"shadow": {"model": "online-anomaly"}})


def _seed_pairs(store: EventStore) -> None:
    store.save_scores([_rec(f"e{i}", "champion", s) for i, s in enumerate([0.1, 0.9, 0.6])])
    store.save_scores([_rec(f"e{i}", "challenger", s) for i, s in enumerate([0.2, 0.8, 0.3])])


def test_compare_over_rest(sqlite_store: EventStore) -> None:
    from fastapi.testclient import TestClient

    from gateway.api import create_app
    from gateway.config import Settings

    _seed_pairs(sqlite_store)
    settings = Settings.model_validate({"api": {"auth": False}, "scoring": {"model": "champion", "shadow": {"model": "challenger"},
                                                    "models": {"champion": {"kind": "online-anomaly"},
                                                               "challenger": {"kind": "online-anomaly"}}}})
    client = TestClient(create_app(settings, sqlite_store), raise_server_exceptions=False)
    body = client.get("/v1/scoring/compare").json()
    assert body["count"] == 3 and body["agreement"] == pytest.approx(2 / 3) and len(body["shadow_histogram"]) == 10
    body = client.get("/v1/scoring/compare", params={"primary": "champion", "shadow": "challenger",
                                                     "threshold": 0.25}).json()
    assert body["threshold"] == 0.25 and body["agreement"] == 1.0  # 0.6 and 0.3 both >= 0.25
    assert client.get("/v1/scoring/compare", params={"threshold": 2}).status_code == 422
    plain = TestClient(create_app(Settings(api={"auth": False}), sqlite_store), raise_server_exceptions=False)
    assert plain.get("/v1/scoring/compare").status_code == 400


def test_compare_cli(tmp_path: Path) -> None:
    import json

    import yaml
    from typer.testing import CliRunner

    from gateway.cli import app
    from gateway.store import make_engine
    from gateway.store.migrate import upgrade

    engine = make_engine(f"sqlite:///{tmp_path / 'g.db'}")
    upgrade(engine)
    _seed_pairs(EventStore(engine))
    engine.dispose()
    cfg = tmp_path / "g.yaml"
    cfg.write_text(yaml.safe_dump({"store": {"url": f"sqlite:///{tmp_path / 'g.db'}"},
                                   "scoring": {"model": "champion", "shadow": {"model": "challenger", "fraction": 0.1},
                                               "models": {"champion": {"kind": "online-anomaly"},
                                                          "challenger": {"kind": "online-anomaly"}}}}))
    runner = CliRunner()
    result = runner.invoke(app, ["scoring", "compare", "-c", str(cfg)])
    assert result.exit_code == 0, result.output
    assert "3 events scored by both" in result.output and "agreement at 0.5: 66.7%" in result.output
    result = runner.invoke(app, ["scoring", "compare", "-c", str(cfg), "--threshold", "0.9", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["agreement"] == pytest.approx(2 / 3)  # 0.9 vs 0.8 disagree at 0.9
