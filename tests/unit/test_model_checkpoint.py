"""Model state checkpoints (issue 7): the built-in model's learning survives a restart.

Real SQLite stores migrated by Alembic; the checkpointer's thread runs for real with short
intervals (polling is bounded).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from alembic import command
from sqlalchemy import inspect, update

from gateway.events import Event
from gateway.scoring import LockedScorer, OnlineAnomalyScorer
from gateway.scoring.checkpoint import (
    ModelCheckpointer,
    events_seen_of,
    stateful_scorers,
)
from gateway.scoring.rules import RulesScorer
from gateway.store import EventStore, make_engine
from gateway.store.migrate import alembic_config, current_revision, upgrade
from gateway.store.schema import model_checkpoints

T0 = datetime(2024, 1, 1, tzinfo=UTC)
PAY, LOGIN = "com.acme.payment.created", "com.acme.login.succeeded"
NAME = "online-anomaly"


def stream(n: int, seed: int, start: int = 0) -> list[Event]:
    """``n`` events of two types (payments: numeric + categorical; logins: categorical + numeric)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(start, start + n):
        if i % 3:
            data = {"amount": f"{rng.lognormal(4.0, 0.5):.2f}", "country": ["DE", "FR", "NL"][int(rng.integers(0, 3))],
                    "quantity": int(rng.integers(1, 5))}
            out.append(Event(id=f"p{i}", source="/test", type=PAY, time=T0, data=data))
        else:
            data = {"method": ["password", "sso", "token"][int(rng.integers(0, 3))],
                    "latency_ms": int(rng.integers(50, 400))}
            out.append(Event(id=f"l{i}", source="/test", type=LOGIN, time=T0, data=data))
    return out


def learn(model: Any, events: list[Event], batch: int = 50) -> list[Any]:
    out = []
    for i in range(0, len(events), batch):
        out.extend(model.score_batch(events[i : i + batch]))
    return out


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


class StepClock:
    """The store's clock, advanced by hand (saved_at order without sleeping)."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def tick(self, seconds: float = 1.0) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> StepClock:
    return StepClock()


@pytest.fixture
def store(sqlite_store: EventStore, clock: StepClock) -> EventStore:
    return EventStore(sqlite_store.engine, clock=clock)


def rows(store: EventStore) -> list[tuple[str, int]]:
    return [(m.instance, m.events_seen) for m in store.list_model_checkpoints(NAME)]


# ---------------------------------------------------------------------------------------- restore
def test_a_restored_model_scores_exactly_like_the_one_that_kept_learning(store: EventStore) -> None:
    original = OnlineAnomalyScorer(warmup=30)
    learn(original, stream(400, seed=1))
    assert ModelCheckpointer(store, [LockedScorer(original)], interval=60, instance="a").save() == 1

    restarted = OnlineAnomalyScorer(warmup=30)
    assert ModelCheckpointer(store, [LockedScorer(restarted)], interval=60, instance="b").restore() == {NAME: 400}
    fresh = OnlineAnomalyScorer(warmup=30)

    nxt = stream(200, seed=2, start=400)
    scored: list[float] = []
    for i in range(0, 200, 50):  # batch by batch: the restored model also keeps learning the same way
        kept = original.score_batch(nxt[i : i + 50])
        got = restarted.score_batch(nxt[i : i + 50])
        assert [r.score for r in got] == pytest.approx([r.score for r in kept], abs=1e-12, rel=0)
        assert [r.explanation for r in got] == [r.explanation for r in kept]
        scored += [r.score for r in got]
    # The comparison means something: the restored model really scores (no warm-up), unlike a
    # fresh one, which is still in warm-up for both types on the first 40 events (27 + 13 < 30 each).
    assert not any(r.explanation.get("warmup") for r in restarted.score_batch(nxt[:40]))
    assert len(set(scored)) > 50 and max(scored) > 0.5
    assert all(r.score == 0.0 and r.explanation["warmup"] is True for r in fresh.score_batch(nxt[:40]))


def test_restore_takes_the_most_informed_checkpoint_ties_by_newest(store: EventStore, clock: StepClock) -> None:
    events = stream(300, seed=4)
    big, small = OnlineAnomalyScorer(), OnlineAnomalyScorer()
    learn(big, events)
    learn(small, events[:100])
    ModelCheckpointer(store, [big], interval=60, instance="host-1-big").save()
    clock.tick()
    ModelCheckpointer(store, [small], interval=60, instance="host-2-small").save()  # newer, but knows less
    assert rows(store) == [("host-1-big", 300), ("host-2-small", 100)]

    restored = OnlineAnomalyScorer()
    assert ModelCheckpointer(store, [restored], interval=60).restore() == {NAME: 300}
    assert restored.state_dict() == big.state_dict()

    # A tie on events_seen: the newest row wins.
    clock.tick()
    other = OnlineAnomalyScorer(horizon=50)  # learns the same 300 events into a different state
    learn(other, events)
    ModelCheckpointer(store, [other], interval=60, instance="host-3-tie").save()
    state, meta = store.load_model_checkpoint(NAME, "1")  # type: ignore[misc]
    assert (meta.instance, meta.events_seen, meta.saved_at) == ("host-3-tie", 300, clock.now)
    assert state == other.state_dict() != big.state_dict()


def test_corrupt_or_foreign_checkpoints_log_a_warning_and_start_fresh(
    store: EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    model = OnlineAnomalyScorer()
    learn(model, stream(100, seed=5))
    ModelCheckpointer(store, [model], interval=60, instance="w").save()

    # Another format (a future release wrote it): the model refuses it.
    with store.engine.begin() as conn:
        bad = {**model.state_dict(), "format": 99}
        conn.execute(update(model_checkpoints).values(state=json.dumps(bad)))
    fresh = OnlineAnomalyScorer()
    with caplog.at_level(logging.WARNING, "gateway.scoring.checkpoint"):
        assert ModelCheckpointer(store, [fresh], interval=60).restore() == {NAME: 0}
    (rec,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "'online-anomaly'" in rec.getMessage() and "starts fresh" in rec.getMessage()
    assert "format 99" in rec.getMessage() and "'w'" in rec.getMessage()
    assert fresh.state_dict()["types"] == {}
    assert all(r.explanation["warmup"] for r in fresh.score_batch(stream(10, seed=6)))

    # Corrupt JSON (a truncated write by hand): same.
    caplog.clear()
    with store.engine.begin() as conn:
        conn.execute(update(model_checkpoints).values(state='{"format": 1, "types": {'))
    fresh = OnlineAnomalyScorer()
    with caplog.at_level(logging.WARNING, "gateway.scoring.checkpoint"):
        assert ModelCheckpointer(store, [fresh], interval=60).restore() == {NAME: 0}
    (rec,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "'online-anomaly'" in rec.getMessage() and "not valid JSON" in rec.getMessage()
    assert fresh.state_dict()["types"] == {}

    # A structurally broken state of the right format: the model's own load fails; still fresh.
    caplog.clear()
    with store.engine.begin() as conn:
        broken = {**model.state_dict(), "types": {PAY: {"seen": 3}}}
        conn.execute(update(model_checkpoints).values(state=json.dumps(broken)))
    fresh = OnlineAnomalyScorer()
    with caplog.at_level(logging.WARNING, "gateway.scoring.checkpoint"):
        assert ModelCheckpointer(store, [fresh], interval=60).restore() == {NAME: 0}
    assert "KeyError" in caplog.records[-1].getMessage()
    assert fresh.state_dict()["types"] == {}


def test_another_version_is_never_loaded(store: EventStore) -> None:
    model = OnlineAnomalyScorer()
    learn(model, stream(100, seed=7))
    ModelCheckpointer(store, [model], interval=60, instance="w").save()
    v2 = OnlineAnomalyScorer()
    v2.version = "2"
    assert ModelCheckpointer(store, [v2], interval=60).restore() == {NAME: 0}
    assert store.load_model_checkpoint(NAME, "2") is None
    assert v2.state_dict()["types"] == {}


# ---------------------------------------------------------------------------------------- save
def test_save_is_skipped_when_nothing_new_was_learned(store: EventStore, clock: StepClock) -> None:
    model = OnlineAnomalyScorer()
    cp = ModelCheckpointer(store, [model], interval=60, instance="w")
    assert cp.restore() == {NAME: 0}
    assert cp.save() == 0  # a fresh model that learned nothing writes nothing
    learn(model, stream(90, seed=8))
    assert cp.save() == 1
    first = store.list_model_checkpoints(NAME)[0].saved_at
    clock.tick()
    assert cp.save() == 0
    assert store.list_model_checkpoints(NAME)[0].saved_at == first
    learn(model, stream(10, seed=9, start=90))
    assert cp.save() == 1
    assert rows(store) == [("w", 100)]  # overwritten in place: one row per process
    # A process that restored and learned nothing does not write a copy of the state.
    other = ModelCheckpointer(store, [OnlineAnomalyScorer()], interval=60, instance="idle")
    assert other.restore() == {NAME: 100}
    assert other.save() == 0
    assert rows(store) == [("w", 100)]


def test_a_store_failure_in_save_does_not_raise_and_is_retried(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(sqlite_url)
    try:
        upgrade(engine, "0005")  # the store lacks the checkpoint table: every write fails
        store = EventStore(engine)
        model = OnlineAnomalyScorer()
        learn(model, stream(60, seed=10))
        cp = ModelCheckpointer(store, [model], interval=60, instance="w")
        with caplog.at_level(logging.WARNING, "gateway.scoring.checkpoint"):
            assert cp.save() == 0
        (rec,) = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert "'online-anomaly'" in rec.getMessage() and "StoreUnavailableError" in rec.getMessage()
        upgrade(engine)  # the store is back: the next save writes what was not saved
        assert cp.save() == 1
        assert store.load_model_checkpoint(NAME, "1")[1].events_seen == 60  # type: ignore[index]
    finally:
        engine.dispose()


def test_stop_writes_a_final_checkpoint(store: EventStore) -> None:
    model = OnlineAnomalyScorer()
    cp = ModelCheckpointer(store, [LockedScorer(model)], interval=3600, instance="w")
    cp.restore()
    cp.start()
    learn(model, stream(75, seed=11))
    assert rows(store) == []  # the interval is an hour away
    assert cp.stop() == 1
    state, meta = store.load_model_checkpoint(NAME, "1")  # type: ignore[misc]
    assert meta.events_seen == 75 and state == model.state_dict()


def test_the_thread_saves_every_interval(store: EventStore) -> None:
    model = OnlineAnomalyScorer()
    cp = ModelCheckpointer(store, [model], interval=0.05, instance="w")
    cp.start()
    try:
        learn(model, stream(40, seed=12))
        wait_until(lambda: rows(store) == [("w", 40)])
        learn(model, stream(20, seed=13, start=40))
        wait_until(lambda: rows(store) == [("w", 60)])
    finally:
        cp.stop()


def test_checkpoints_while_workers_score_concurrently(store: EventStore) -> None:
    model = LockedScorer(OnlineAnomalyScorer())
    cp = ModelCheckpointer(store, [model], interval=0.01, instance="w")
    cp.start()
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            learn(model, stream(600, seed=seed), batch=20)
        except Exception as exc:  # noqa: BLE001 -- reported below, in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in (20, 21)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    cp.stop()
    assert not errors
    state, meta = store.load_model_checkpoint(NAME, "1")  # type: ignore[misc]
    assert meta.events_seen == 1200 and state == model.inner.state_dict()  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------- which models
class PluginState:
    """A plugin scorer with its own state layout (a running count)."""

    name, version = "counter", "7"

    def __init__(self) -> None:
        self.n = 0

    def score_batch(self, events: list[Event]) -> list[Any]:
        self.n += len(events)
        return []

    def state_dict(self) -> dict[str, Any]:
        return {"events_seen": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n = int(state["events_seen"])


def test_only_stateful_models_are_checkpointed_unwrapped_and_once(
    store: EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    online = OnlineAnomalyScorer()
    rules = RulesScorer("guard", [])
    plugin = PluginState()
    twin = OnlineAnomalyScorer()  # same name and version, separate state: would clobber the row
    with caplog.at_level(logging.WARNING, "gateway.scoring.checkpoint"):
        found = stateful_scorers([LockedScorer(online), online, rules, None, plugin, twin])
    assert found == [online, plugin]
    assert "appears twice" in caplog.records[-1].getMessage()

    plugin.score_batch([Event(id="x", source="/t", type=PAY, time=T0, data={})] * 5)
    cp = ModelCheckpointer(store, [rules, plugin], interval=60, instance="w")
    assert cp.save() == 1
    again = PluginState()
    assert ModelCheckpointer(store, [again], interval=60).restore() == {"counter": 5}
    assert again.n == 5
    assert ModelCheckpointer(store, [rules], interval=60).start() is None  # nothing stateful: no thread


def test_events_seen_of_states() -> None:
    assert events_seen_of({"events_seen": 12}) == 12
    assert events_seen_of({"types": {"a": {"seen": 3}, "b": {"seen": 4}}}) == 7
    assert events_seen_of({"weights": [1, 2]}) == 0


def test_invalid_arguments_are_refused(store: EventStore) -> None:
    with pytest.raises(ValueError, match="interval must be > 0"):
        ModelCheckpointer(store, [], interval=0)
    with pytest.raises(ValueError, match="retention must be > 0"):
        ModelCheckpointer(store, [], interval=1, retention=0)
    with pytest.raises(ValueError, match="'online-anomaly' v'1' is not JSON data"):
        store.save_model_checkpoint(NAME, "1", "w", {"x": float("nan")}, 1)


# ---------------------------------------------------------------------------------------- repository
def test_prune_keeps_each_models_best_row(store: EventStore, clock: StepClock) -> None:
    store.save_model_checkpoint(NAME, "1", "old-best", {"events_seen": 500}, 500)
    store.save_model_checkpoint(NAME, "1", "old-small", {"events_seen": 10}, 10)
    store.save_model_checkpoint("counter", "7", "old-only", {"events_seen": 1}, 1)
    clock.tick(86400)
    store.save_model_checkpoint(NAME, "1", "new", {"events_seen": 20}, 20)
    assert store.prune_model_checkpoints(timedelta(hours=1)) == 1
    assert rows(store) == [("old-best", 500), ("new", 20)]
    assert [m.instance for m in store.list_model_checkpoints("counter")] == ["old-only"]
    assert store.delete_model_checkpoints(NAME) == 2
    assert store.load_model_checkpoint(NAME, "1") is None


def test_periodic_prune_with_retention(store: EventStore, clock: StepClock) -> None:
    store.save_model_checkpoint(NAME, "1", "dead-process", {"events_seen": 5}, 5)
    clock.tick(3600)
    model = OnlineAnomalyScorer()
    learn(model, stream(40, seed=14))
    cp = ModelCheckpointer(store, [model], interval=60, instance="w", retention=60)
    cp.save()
    assert cp.prune() == 1
    assert rows(store) == [("w", 40)]


# ---------------------------------------------------------------------------------------- migration
@pytest.fixture
def engine(sqlite_url: str) -> Iterator[Any]:
    e = make_engine(sqlite_url)
    yield e
    e.dispose()


def test_0006_adds_model_checkpoints_to_a_0005_store(engine: Any) -> None:
    # (That the head revision matches schema.py is tests/unit/test_migrations.py's check.)
    upgrade(engine, "0005")
    EventStore(engine).begin_scoring_attempts(["e-1"])
    upgrade(engine, "0006")
    assert current_revision(engine) == "0006"
    assert "model_checkpoints" in inspect(engine).get_table_names()
    store = EventStore(engine)
    assert store.scoring_attempts(["e-1"]) == {"e-1": 1}
    store.save_model_checkpoint(NAME, "1", "w", {"events_seen": 3}, 3)
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0005")
    assert "model_checkpoints" not in inspect(engine).get_table_names()
    assert store.scoring_attempts(["e-1"]) == {"e-1": 1}


def test_a_restarted_embedded_gateway_scores_from_what_it_learned_before(tmp_path: Any) -> None:
    """relay + scorer on SQLite and the in-process bus: stop (final checkpoint), start again on the
    same store; the new process's first events are scored, not in warm-up."""
    from gateway.config import Settings
    from gateway.runtime import Gateway
    from tests.unit.test_scoring_worker import make_events

    settings = Settings(profile="test", store={"url": f"sqlite:///{tmp_path / 'g.db'}"}, relay={"idle_wait": 0.02},
                        scoring={"warmup": 20, "checkpoint_interval": 3600})

    def run(events: list[Event]) -> dict[str, Any]:
        gw = Gateway(settings, roles=["relay", "scorer"])
        gw.start()
        try:
            gw.store.accept(events, source_name="orders")
            gw.wake_relay()
            model = gw.scorers[0].scorer
            deadline = time.monotonic() + 30
            while len(got := gw.store.get_scores([e.id for e in events], model.name, model.version)) < len(events):
                assert time.monotonic() < deadline, "events not scored"
                time.sleep(0.02)
            return got
        finally:
            gw.stop()  # the final checkpoint (the interval is an hour)

    first = run(make_events(40))
    assert any((s.explanation or {}).get("warmup") for s in first.values())
    second = run(make_events(10, start=500))
    assert not any((s.explanation or {}).get("warmup") for s in second.values()), "the restart forgot what it learned"
