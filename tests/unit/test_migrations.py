"""Alembic revisions upgrade a populated store in place -- on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from gateway.store import EventStore, make_engine
from gateway.store.migrate import alembic_config, current_revision, upgrade
from gateway.store.schema import metadata


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


def test_0002_adds_source_status_to_a_0001_store(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    try:
        upgrade(engine, "0001")
        assert current_revision(engine) == "0001"
        assert "source_status" not in inspect(engine).get_table_names()
        store = EventStore(engine)
        epoch = store.acquire_epoch("orders")
        store.accept([], source_name="orders", cursor={"key": 7}, epoch=epoch, write_cursor=True)
        store.add_dead_letter(stage="source", error_class="ContractError", reason="bad", payload="{}")

        upgrade(engine)
        assert current_revision(engine) == "0002"
        # Existing data is untouched; the new table works.
        assert store.get_cursor("orders").cursor == {"key": 7}  # type: ignore[union-attr]
        assert len(store.list_dead_letters()) == 1
        assert store.save_source_status("orders", state="idle", owner="h:1:x", epoch=epoch)
        row = store.set_source_desired_state("orders", "paused")
        assert row.desired_state == "paused" and row.state == "idle"
        # The revision creates exactly what schema.py declares.
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
        assert diff == []
        # And it downgrades cleanly.
        cfg = alembic_config()
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0001")
        assert current_revision(engine) == "0001"
        assert "source_status" not in inspect(engine).get_table_names()
        assert store.get_cursor("orders").updated_at < datetime.now(UTC)  # type: ignore[union-attr]
    finally:
        engine.dispose()
