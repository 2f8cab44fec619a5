"""Alembic revisions upgrade a populated store in place (and downgrade) -- on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import column, func, insert, inspect, select, table, update

from gateway.store import Actor, EventStore, make_engine
from gateway.store.migrate import alembic_config, current_revision, upgrade
from gateway.store.schema import dead_letters, metadata, source_cursors


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.integration),
        pytest.param("mariadb", marks=pytest.mark.integration),
    ]
)
def empty_db_url(request) -> str:  # type: ignore[no-untyped-def]
    """A URL of an empty database: SQLite file, or a fresh PostgreSQL/MariaDB database."""
    name = {"sqlite": "sqlite_url", "postgres": "pg_db_url", "mariadb": "mariadb_db_url"}[request.param]
    return str(request.getfixturevalue(name))


def _downgrade(engine, revision: str) -> None:  # type: ignore[no-untyped-def]
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def _dead_letter_count(engine) -> int:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(dead_letters)).scalar_one())


def _cursor_row(engine, name: str) -> tuple[object, int]:  # type: ignore[no-untyped-def]
    """The cursor and epoch of ``name``, read with only the columns every revision has."""
    with engine.connect() as conn:
        row = conn.execute(select(source_cursors.c.cursor, source_cursors.c.epoch).where(source_cursors.c.source_name == name)).one()
    return row[0], int(row[1])


def test_0002_adds_source_status_to_a_0001_store(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    try:
        upgrade(engine, "0001")
        assert current_revision(engine) == "0001"
        assert "source_status" not in inspect(engine).get_table_names()
        store = EventStore(engine)
        store.accept([], source_name="orders", cursor={"key": 7}, write_cursor=True)
        store.add_dead_letter(stage="source", error_class="ContractError", reason="bad", payload="{}")

        upgrade(engine, "0002")
        assert current_revision(engine) == "0002"
        # Existing data is untouched; the new table works.
        assert _cursor_row(engine, "orders") == ({"key": 7}, 0)
        assert _dead_letter_count(engine) == 1  # (the repository reads columns of later revisions)
        assert store.save_source_status("orders", state="idle", owner="h:1:x", epoch=1)
        row = store.set_source_desired_state("orders", "paused")
        assert row.desired_state == "paused" and row.state == "idle"
        # And it downgrades cleanly.
        _downgrade(engine, "0001")
        assert current_revision(engine) == "0001"
        assert "source_status" not in inspect(engine).get_table_names()
        assert _cursor_row(engine, "orders") == ({"key": 7}, 0)
    finally:
        engine.dispose()


def test_0003_adds_leases_to_a_0002_store(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    try:
        upgrade(engine, "0002")
        store = EventStore(engine)
        store.accept([], source_name="orders", cursor={"key": 7}, write_cursor=True)
        with engine.begin() as conn:  # a runner of the previous version took epoch 3
            conn.execute(update(source_cursors).where(source_cursors.c.source_name == "orders").values(epoch=3))
        store.save_source_status("orders", state="idle", owner="h:1:x", epoch=3)

        upgrade(engine, "0003")
        assert current_revision(engine) == "0003"
        cur = store.get_cursor("orders")
        assert cur is not None and cur.cursor == {"key": 7} and cur.epoch == 3
        assert cur.lease_owner is None and cur.lease_until is None  # free: the first runner takes it
        assert store.try_acquire_lease("orders", "h:2:y", 30) == 4  # ownership changes: a new epoch
        assert store.try_acquire_lease("orders", "h:3:z", 30) is None
        store.save_runner("orders", "h:2:y", state="idle", epoch=4)
        assert [r.owner for r in store.list_runners("orders")] == ["h:2:y"]
        assert store.get_source_status("orders").epoch == 3  # type: ignore[union-attr]
        # And it downgrades cleanly, keeping the cursor and its epoch.
        _downgrade(engine, "0002")
        assert current_revision(engine) == "0002"
        assert "source_runners" not in inspect(engine).get_table_names()
        assert {c["name"] for c in inspect(engine).get_columns("source_cursors")} == {
            "source_name", "cursor", "epoch", "updated_at", "events_total",
        }
        assert _cursor_row(engine, "orders") == ({"key": 7}, 4)
        assert store.get_source_status("orders").state == "idle"  # type: ignore[union-attr]
        assert store.get_source_status("orders").updated_at < datetime.now(UTC)  # type: ignore[union-attr]
    finally:
        engine.dispose()


def test_0004_adds_replay_state_to_a_0003_store(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    try:
        upgrade(engine, "0003")
        # A dead letter written by the previous version (only the columns it had).
        old_table = table("dead_letters", *(column(n) for n in (
            "stage", "error_class", "reason", "payload", "attempts", "event_id", "created_at")))
        with engine.begin() as conn:
            conn.execute(insert(old_table).values(
                stage="scoring", error_class="ContractError", reason="bad", payload="{}", attempts=3,
                event_id="e-1", created_at=datetime(2026, 1, 1),
            ))

        upgrade(engine, "0004")
        assert current_revision(engine) == "0004"
        store = EventStore(engine)
        (old,) = store.list_dead_letters()
        # The old row is open, never replayed; the new columns have their defaults.
        assert (old.event_id, old.attempts, old.state, old.replay_count, old.replayed_at, old.dedupe_key) == (
            "e-1", 3, "open", 0, None, None)
        assert store.list_dead_letters(state="replayed") == []
        # The broker drain's identity key is unique: the same key gives the same row.
        first = store.add_dead_letter_once(stage="broker", error_class="rejected", reason="r", payload="{}",
                                           event_id="e-2", dedupe_key="k" * 64)
        again = store.add_dead_letter_once(stage="broker", error_class="rejected", reason="r", payload="{}",
                                           event_id="e-2", dedupe_key="k" * 64)
        assert first[1] is True and again == (first[0], False)
        # And it downgrades cleanly, keeping the dead letters.
        _downgrade(engine, "0003")
        assert current_revision(engine) == "0003"
        columns = {c["name"] for c in inspect(engine).get_columns("dead_letters")}
        assert "replayed_at" not in columns and "dedupe_key" not in columns
        assert _dead_letter_count(engine) == 2
        upgrade(engine, "0004")  # and up again
        assert len(store.list_dead_letters()) == 2
    finally:
        engine.dispose()


def test_0005_adds_scoring_attempts_to_a_0004_store(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    try:
        upgrade(engine, "0004")
        upgrade(engine, "0005")
        assert current_revision(engine) == "0005"
        store = EventStore(engine)
        assert store.begin_scoring_attempts(["e-1", "e-2"]) == {"e-1": 1, "e-2": 1}
        assert store.begin_scoring_attempts(["e-1", "e-1"]) == {"e-1": 2}
        store.end_scoring_attempts(["e-2"])
        assert store.scoring_attempts(["e-1", "e-2"]) == {"e-1": 2}
        _downgrade(engine, "0004")
        assert "scoring_attempts" not in inspect(engine).get_table_names()
        upgrade(engine, "0005")
        assert store.scoring_attempts(["e-1"]) == {}
    finally:
        engine.dispose()


def test_0006_adds_model_checkpoints_to_a_0005_store(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    try:
        upgrade(engine, "0005")
        store = EventStore(engine)
        store.begin_scoring_attempts(["e-1"])
        upgrade(engine, "0006")
        assert current_revision(engine) == "0006"
        assert store.scoring_attempts(["e-1"]) == {"e-1": 1}
        store.save_model_checkpoint("m", "1", "h-1-a", {"events_seen": 3}, 3)
        assert store.load_model_checkpoint("m", "1")[1].events_seen == 3  # type: ignore[index]
        _downgrade(engine, "0005")
        assert "model_checkpoints" not in inspect(engine).get_table_names()
        assert store.scoring_attempts(["e-1"]) == {"e-1": 1}
        upgrade(engine, "0006")
        assert store.load_model_checkpoint("m", "1") is None
    finally:
        engine.dispose()


def test_head_matches_the_schema(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    try:
        upgrade(engine)
        # The revisions create exactly what schema.py declares.
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
        assert diff == []
    finally:
        engine.dispose()


def test_0007_adds_api_keys_and_audit_log_to_a_0006_store(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    try:
        upgrade(engine, "0006")
        store = EventStore(engine)
        store.save_model_checkpoint("m", "1", "h-1-a", {"events_seen": 3}, 3)
        upgrade(engine, "0007")
        assert current_revision(engine) == "0007"
        assert store.load_model_checkpoint("m", "1")[1].events_seen == 3  # type: ignore[index]
        key, _token = store.create_api_key("ci", ["events:read"], ["orders"], secret=store.local_key_secret(),
                                           actor=Actor(None, "cli:test"))
        assert [k.id for k in store.list_api_keys()] == [key.id]
        assert [a.action for a in store.list_audit()] == ["key.create"]
        _downgrade(engine, "0006")
        tables = set(inspect(engine).get_table_names())
        assert not {"api_keys", "audit_log", "local_secrets"} & tables and "model_checkpoints" in tables
        upgrade(engine, "0007")
        assert store.list_api_keys() == [] and store.list_audit() == []
    finally:
        engine.dispose()
