"""REL-14: the poller is complete under late commits, on PostgreSQL and MariaDB, with real
concurrent transactions on two connections.

The scenario (every test): transaction T1 inserts row A, stamped by the database clock, and stays
open; T2 inserts row B (stamped later) and commits; the gateway polls; T1 commits. A is now a
committed row with a timestamp *older* than B's, which the poll already passed.

* without a delay the poll reads B, the cursor passes A's timestamp, and A is lost -- the control
  that proves the scenario bites;
* with ``delay_seconds`` longer than T1, the first poll reads nothing and a poll after the delay
  reads A and B, each exactly once;
* with ``overlap_seconds`` (no delay) the poll reads B, and the next poll finds A behind the cursor
  in the re-read window and emits it, once;
* on PostgreSQL, ``mode: xid`` reads nothing while T1 (an older transaction) is open, then A and B,
  with no delay at all.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, create_engine, text

from gateway.config import SourceSettings
from gateway.sources.runner import SourceRunner
from gateway.store import EventFilter, EventStore

pytestmark = pytest.mark.integration

_DELAY = 1.5  # seconds; T1 lasts well under it
_TABLE = {
    "postgresql": "CREATE TABLE orders_cs (id integer PRIMARY KEY, ts timestamp(6) NOT NULL, who varchar(10), xid bigint)",
    "mysql": "CREATE TABLE orders_cs (id integer PRIMARY KEY, ts datetime(6) NOT NULL, who varchar(10), xid bigint)",
}
# Stamped by the database's clock at the statement (as a DEFAULT or a trigger would), in UTC.
_INSERT = {
    "postgresql": "INSERT INTO orders_cs (id, ts, who) VALUES (:id, clock_timestamp() AT TIME ZONE 'UTC', :who)",
    "mysql": "INSERT INTO orders_cs (id, ts, who) VALUES (:id, UTC_TIMESTAMP(6), :who)",
}
_XID_TRIGGER = [
    """CREATE FUNCTION orders_cs_xid() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN NEW.xid := pg_current_xact_id()::text::bigint; RETURN NEW; END $$""",
    "CREATE TRIGGER orders_cs_xid BEFORE INSERT OR UPDATE ON orders_cs FOR EACH ROW EXECUTE FUNCTION orders_cs_xid()",
]


@pytest.fixture(params=["postgres", "mariadb"])
def db(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """An engine on a fresh legacy database with the ``orders_cs`` table."""
    url = request.getfixturevalue("pg_db_url" if request.param == "postgres" else "mariadb_db_url")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(_TABLE[_family(engine)]))
    yield engine
    _end_open_transactions()
    engine.dispose()


@pytest.fixture
def pg(pg_db_url: str) -> Iterator[Engine]:
    """PostgreSQL only, with the xid trigger installed."""
    engine = create_engine(pg_db_url)
    with engine.begin() as conn:
        conn.execute(text(_TABLE["postgresql"]))
        for stmt in _XID_TRIGGER:
            conn.execute(text(stmt))
    yield engine
    _end_open_transactions()
    engine.dispose()


def _family(engine: Engine) -> str:
    return "postgresql" if engine.dialect.name == "postgresql" else "mysql"


def _runner(store: EventStore, engine: Engine, **config: Any) -> SourceRunner:
    cfg = {
        "url": engine.url.render_as_string(hide_password=False),
        "table": "orders_cs",
        "key_column": "id",
        "timestamp_column": "ts",
        "batch_size": 100,
        **config,
    }
    settings = SourceSettings.model_validate({
        "name": "orders", "adapter": "sql", "interval": 0.01, "config": cfg,
        "mapping": {"type": "com.acme.order.changed", "entity": "order", "key": ["id"], "version": "ts", "time": "ts"},
    })
    return SourceRunner(settings, store, sleep=lambda s: None)


def _poll(r: SourceRunner) -> list[int]:
    """Poll until the source has nothing more right now; the keys read."""
    keys: list[int] = []
    while True:
        batch = r.run_once()
        keys += [int(rec.data["id"]) for rec in batch.records]
        if not batch.has_more:
            return keys


def _sink(store: EventStore) -> list[int]:
    return sorted(int(i.event["data"]["id"]) for i in store.list_events(EventFilter(), limit=1000))


def _insert(conn: Connection, key: int, who: str) -> None:
    conn.execute(text(_INSERT[_family(conn.engine)]), {"id": key, "who": who})


#: T1s still open (a test failed before committing): rolled back at teardown, else MariaDB's
#: DROP DATABASE waits for T1's metadata lock and the failing test hangs instead of failing.
_OPEN: list[_LateCommit] = []


def _end_open_transactions() -> None:
    while _OPEN:
        late = _OPEN.pop()
        if late.tx.is_active:
            late.tx.rollback()
        late.t1.close()


class _LateCommit:
    """T1 inserts A (id 1) and stays open; T2 inserts B (id 2) a little later and commits."""

    def __init__(self, engine: Engine) -> None:
        self.t1 = engine.connect()
        self.tx = self.t1.begin()
        _OPEN.append(self)
        _insert(self.t1, 1, "T1")
        time.sleep(0.05)  # B's stamp is later than A's
        with engine.begin() as t2:
            _insert(t2, 2, "T2")

    def commit(self) -> None:
        self.tx.commit()
        self.t1.close()


def test_without_a_delay_the_late_commit_is_lost(sqlite_store: EventStore, db: Engine) -> None:
    """The control: the same scenario with delay 0 skips A for good (so the tests below prove the
    delay, the overlap and xid mode are what saves it)."""
    r = _runner(sqlite_store, db)
    late = _LateCommit(db)
    assert _poll(r) == [2]  # B is committed; A is not visible yet
    late.commit()
    time.sleep(0.2)
    assert _poll(r) == []  # A's timestamp is behind the cursor: never read
    assert _sink(sqlite_store) == [2]
    r.adapter.close()


def test_with_a_delay_both_rows_arrive_exactly_once(sqlite_store: EventStore, db: Engine) -> None:
    r = _runner(sqlite_store, db, delay_seconds=_DELAY)
    late = _LateCommit(db)
    assert _poll(r) == []  # both are younger than the delay (by the database's clock)
    late.commit()
    time.sleep(_DELAY + 0.3)
    assert _poll(r) == [1, 2]  # in timestamp order: A first
    assert _poll(r) == []
    assert _sink(sqlite_store) == [1, 2]
    assert r.status.events_accepted == 2 and r.status.duplicates == 0
    r.adapter.close()


def test_with_an_overlap_window_the_late_row_is_emitted_once(sqlite_store: EventStore, db: Engine) -> None:
    r = _runner(sqlite_store, db, overlap_seconds=5)
    late = _LateCommit(db)
    assert _poll(r) == [2]
    cursor = sqlite_store.get_cursor("orders").cursor  # type: ignore[union-attr]
    late.commit()
    assert _poll(r) == [1]  # found behind the cursor, inside the window
    assert sqlite_store.get_cursor("orders").cursor == cursor  # the cursor did not move back
    assert _poll(r) == []  # not emitted again
    assert _sink(sqlite_store) == [1, 2]
    assert r.status.events_accepted == 2 and r.status.duplicates == 0
    r.adapter.close()


def test_xid_mode_needs_no_delay(sqlite_store: EventStore, pg: Engine) -> None:
    r = _runner(sqlite_store, pg, mode="xid", xid_column="xid", timestamp_column=None)
    late = _LateCommit(pg)
    assert _poll(r) == []  # B's transaction is younger than the open T1: not readable yet
    late.commit()
    # Other sessions of this server may hold the horizon back for a moment: poll until it passes.
    keys: list[int] = []
    deadline = time.monotonic() + 10
    while len(keys) < 2 and time.monotonic() < deadline:
        keys += _poll(r)
        time.sleep(0.05)
    assert keys == [1, 2]  # transaction order: T1 first
    assert _poll(r) == []
    assert _sink(sqlite_store) == [1, 2]
    assert r.status.events_accepted == 2 and r.status.duplicates == 0
    r.adapter.close()
