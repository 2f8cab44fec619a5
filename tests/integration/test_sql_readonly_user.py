"""SEC-02: the SQL source works with a read-only database user, and that user cannot write.

A role with SELECT on the legacy table only (plus what it needs to connect) polls the table
through the SQL adapter; an INSERT with the same credentials is denied by the database. The
gateway never needs more than SELECT on a legacy database.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, insert, make_url, text
from sqlalchemy.exc import DBAPIError

from gateway.config import SourceSettings
from gateway.sources.runner import SourceRunner
from gateway.store import EventFilter, EventStore
from tests.legacy import ORDERS, make_orders, source_settings

pytestmark = pytest.mark.integration

ROWS = 12
PASSWORD = "ro-" + uuid.uuid4().hex[:16]


def _postgres_reader(url: str, role: str) -> Iterator[str]:
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    database = make_url(url).database
    with admin.connect() as conn:  # role and database names are generated here, not configuration
        conn.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'"))
        conn.execute(text(f"GRANT CONNECT ON DATABASE {database} TO {role}"))
        conn.execute(text(f"GRANT USAGE ON SCHEMA public TO {role}"))
        conn.execute(text(f"GRANT SELECT ON legacy_orders TO {role}"))
    try:
        yield make_url(url).set(username=role, password=PASSWORD).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP OWNED BY {role}"))  # its grants here and on the database
            conn.execute(text(f"DROP ROLE {role}"))
        admin.dispose()


def _mariadb_reader(url: str, user: str) -> Iterator[str]:
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    database = make_url(url).database
    hosts = ("%", "localhost", "127.0.0.1")
    with admin.connect() as conn:
        for host in hosts:
            conn.execute(text(f"CREATE USER '{user}'@'{host}' IDENTIFIED BY '{PASSWORD}'"))
            conn.execute(text(f"GRANT SELECT ON `{database}`.legacy_orders TO '{user}'@'{host}'"))
    try:
        yield make_url(url).set(username=user, password=PASSWORD).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            for host in hosts:
                conn.execute(text(f"DROP USER IF EXISTS '{user}'@'{host}'"))
        admin.dispose()


@pytest.fixture(params=["postgres", "mariadb"])
def reader_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """URL of a read-only user of a fresh legacy database holding ``legacy_orders``."""
    owner_url = request.getfixturevalue("pg_db_url" if request.param == "postgres" else "mariadb_db_url")
    make_orders(owner_url, ROWS).dispose()
    name = "gw_ro_" + uuid.uuid4().hex[:10]
    if request.param == "postgres":
        yield from _postgres_reader(owner_url, name)
    else:
        yield from _mariadb_reader(owner_url, name)


def test_the_sql_source_polls_as_a_read_only_user_that_cannot_insert(reader_url: str, sqlite_store: EventStore) -> None:
    runner = SourceRunner(SourceSettings.model_validate(source_settings(reader_url)), sqlite_store, sleep=lambda s: None)
    while runner.run_once().has_more:
        pass
    stored = sqlite_store.list_events(EventFilter(), limit=100)
    assert len(stored) == ROWS, "the read-only user polls the whole table"

    engine = create_engine(reader_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM legacy_orders")).scalar_one() == ROWS  # same credentials
        with pytest.raises(DBAPIError) as denied, engine.begin() as conn:
            conn.execute(insert(ORDERS).values(id=10_000, customer="X", amount=1, status="NEW",
                                               updated_at=stored[0].event["time"][:19].replace("T", " ")))
    finally:
        engine.dispose()
    message = str(denied.value.orig).lower()
    assert "permission denied" in message or "command denied" in message, message  # a privilege error, nothing else
