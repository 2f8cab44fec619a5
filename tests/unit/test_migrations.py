"""Alembic revisions upgrade a populated store in place (and downgrade) -- on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select, update

from gateway.store import EventStore, make_engine
from gateway.store.migrate import alembic_config, current_revision, upgrade
from gateway.store.schema import metadata, source_cursors


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
        assert len(store.list_dead_letters()) == 1
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

        upgrade(engine)
        assert current_revision(engine) == "0003"
        cur = store.get_cursor("orders")
        assert cur is not None and cur.cursor == {"key": 7} and cur.epoch == 3
        assert cur.lease_owner is None and cur.lease_until is None  # free: the first runner takes it
        assert store.try_acquire_lease("orders", "h:2:y", 30) == 4  # ownership changes: a new epoch
        assert store.try_acquire_lease("orders", "h:3:z", 30) is None
        store.save_runner("orders", "h:2:y", state="idle", epoch=4)
        assert [r.owner for r in store.list_runners("orders")] == ["h:2:y"]
        assert store.get_source_status("orders").epoch == 3  # type: ignore[union-attr]
        # The revisions create exactly what schema.py declares.
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
        assert diff == []
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
