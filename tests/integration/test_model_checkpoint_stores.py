"""Model checkpoints on real PostgreSQL and MariaDB: migration, a multi-MB state round trip, best row.

URLs from ``GATEWAY_TEST_POSTGRES_URL`` / ``GATEWAY_TEST_MARIADB_URL`` (else testcontainers, else
skip; a failure under ``CI=true``). Each test gets a fresh database.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic import command
from sqlalchemy import inspect

from gateway.events import Event
from gateway.scoring import LockedScorer, OnlineAnomalyScorer
from gateway.scoring.checkpoint import ModelCheckpointer
from gateway.store import EventStore, make_engine
from gateway.store.migrate import alembic_config, current_revision, upgrade

pytestmark = pytest.mark.integration

T0 = datetime(2024, 1, 1, tzinfo=UTC)


@pytest.fixture(params=["postgres", "mariadb"])
def db_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("pg_db_url" if request.param == "postgres" else "mariadb_db_url"))


@pytest.fixture
def engine(db_url: str) -> Iterator[Any]:
    e = make_engine(db_url)
    yield e
    e.dispose()


def wide_events(types: int, fields: int, values: int) -> list[Event]:
    """Events whose categorical fields take ``values`` distinct values each (a big state)."""
    out = []
    for t in range(types):
        for v in range(values):
            # Non-ASCII values too: the state must survive any column character set.
            data = {f"field_{f}": f"value-{f}-{v}-ünïcødé-€" for f in range(fields)} | {"amount": v % 97}
            out.append(Event(id=f"e-{t}-{v}", source="/test", type=f"com.acme.type{t}", time=T0, data=data))
    return out


def test_migration_0006_on_a_0005_store_up_and_down(engine: Any) -> None:
    # (That the head revision matches schema.py is tests/unit/test_migrations.py's check, on every database.)
    upgrade(engine, "0005")
    upgrade(engine, "0006")
    assert current_revision(engine) == "0006"
    assert "model_checkpoints" in inspect(engine).get_table_names()
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0005")
    assert "model_checkpoints" not in inspect(engine).get_table_names()


def test_a_multi_megabyte_state_round_trips_exactly(engine: Any) -> None:
    upgrade(engine)
    store = EventStore(engine)
    model = OnlineAnomalyScorer(max_categories=5000)
    events = wide_events(types=10, fields=10, values=1000)
    for i in range(0, len(events), 500):
        model.score_batch(events[i : i + 500])
    cp = ModelCheckpointer(store, [LockedScorer(model)], interval=60, instance="host-1-a")
    assert cp.save() == 1

    state, meta = store.load_model_checkpoint("online-anomaly", "1")  # type: ignore[misc]
    assert meta.size > 4_000_000, meta.size  # about 5 MB: far past MariaDB's TEXT (64 KB)
    assert meta.events_seen == len(events) and meta.instance == "host-1-a"
    assert state == json.loads(json.dumps(model.state_dict()))
    restored = OnlineAnomalyScorer(max_categories=5000)
    assert ModelCheckpointer(store, [restored], interval=60).restore() == {"online-anomaly": len(events)}
    probe = wide_events(types=10, fields=10, values=3)
    assert [r.score for r in restored.score_batch(probe)] == pytest.approx(
        [r.score for r in model.score_batch(probe)], abs=1e-12, rel=0
    )
    assert restored.state_dict() == model.state_dict()

    # Overwritten in place by the same process (an update of a multi-MB row): probe + 10 more.
    model.score_batch(wide_events(types=1, fields=10, values=10))
    assert cp.save() == 1
    assert [(m.instance, m.events_seen) for m in store.list_model_checkpoints()] == [
        ("host-1-a", len(events) + len(probe) + 10)
    ]
    assert store.load_model_checkpoint("online-anomaly", "1")[0] == model.state_dict()  # type: ignore[index]


def test_best_row_and_prune_across_processes(db_url: str, engine: Any) -> None:
    upgrade(engine)
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    store = EventStore(engine, clock=lambda: now[0])
    store.save_model_checkpoint("fraud", "1", "host-1", {"events_seen": 900}, 900)
    now[0] += timedelta(seconds=5)
    store.save_model_checkpoint("fraud", "1", "host-2", {"events_seen": 400}, 400)
    now[0] += timedelta(seconds=5)
    store.save_model_checkpoint("fraud", "1", "host-3", {"events_seen": 900, "tie": True}, 900)
    store.save_model_checkpoint("fraud", "2", "host-1", {"events_seen": 5000}, 5000)
    state, meta = store.load_model_checkpoint("fraud", "1")  # type: ignore[misc]
    assert (meta.instance, meta.events_seen, state) == ("host-3", 900, {"events_seen": 900, "tie": True})
    assert meta.saved_at == now[0]
    now[0] += timedelta(days=2)
    # Every row is older than a day; each version's best row stays.
    assert store.prune_model_checkpoints(timedelta(days=1)) == 2
    assert [(m.model_version, m.instance) for m in store.list_model_checkpoints("fraud")] == [("1", "host-3"), ("2", "host-1")]
