"""SQL helpers shared by the store's repositories: dialect-portable statements, error translation."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from sqlalchemy import Connection, Insert, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from gateway.errors import StoreUnavailableError

__all__ = ["guard", "insert_ignore"]


def insert_ignore(conn: Connection, table: Table, keys: Sequence[str]) -> Insert:
    """INSERT that skips rows whose unique ``keys`` exist already, for this connection's dialect."""
    name = conn.dialect.name
    if name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=list(keys))
    if name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=list(keys))
    if name in ("mysql", "mariadb"):
        return table.insert().prefix_with("IGNORE")
    raise StoreUnavailableError(f"unsupported store dialect {name!r}")


@contextmanager
def guard(what: str) -> Iterator[None]:
    """Turn database errors into StoreUnavailableError (type only: driver text can hold hosts/users)."""
    try:
        yield
    except (DBAPIError, SQLAlchemyError) as exc:
        orig = exc.orig if isinstance(exc, DBAPIError) else exc
        raise StoreUnavailableError(f"{what} failed: {type(orig).__name__}") from exc
