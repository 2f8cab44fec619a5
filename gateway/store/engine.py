"""Engines from settings; nothing connects at import time."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from gateway.config import StoreSettings
from gateway.events.jsonsafe import dumps_text, loads

__all__ = ["engine_from_settings", "make_engine"]


def _json_column(value: Any) -> Any:
    """Read a JSON column. SQLite's JSON columns have numeric affinity: a bare-number document
    (a cursor such as ``9``) comes back as a number, not text."""
    return loads(value) if isinstance(value, (str, bytes)) else value


def make_engine(url: str, *, pool_size: int = 5, echo: bool = False) -> Engine:
    """Create an engine tuned for the gateway's access pattern.

    SQLite gets WAL, a busy timeout and cross-thread use (the gateway's roles share one file);
    server databases get pre-ping so a restarted database does not fail the next transaction.
    """
    u = make_url(url)
    kwargs: dict[str, Any] = {"echo": echo, "json_serializer": dumps_text, "json_deserializer": _json_column}
    if u.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        engine = create_engine(u, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            if u.database not in (None, "", ":memory:"):
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
            # Take the write lock at BEGIN: a deferred transaction that later upgrades to a
            # writer fails with SQLITE_BUSY at once instead of waiting out the busy timeout.
            dbapi_conn.isolation_level = None

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
    return create_engine(u, **kwargs)


def engine_from_settings(settings: StoreSettings) -> Engine:
    """Engine for the gateway store described by ``settings``."""
    return make_engine(settings.url.get_secret_value(), pool_size=settings.pool_size, echo=settings.echo)
