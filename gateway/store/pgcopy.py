"""Bulk insert for PostgreSQL: COPY into a temporary table, then one INSERT ... ON CONFLICT.

psycopg's COPY encodes rows in C; the per-row cost of ``executemany`` (parameter construction,
type processing, one protocol message per row) dominated the outbox and score writes in the
profile (decision 0006). The final INSERT ... SELECT keeps the semantics of the portable path:
existing keys are skipped (race-safe), rows keep the batch order, and RETURNING tells exactly which
keys were new.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy import JSON, Column, Connection, Integer, MetaData, Table, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import DBAPIError

from gateway.events.jsonsafe import dumps_text

__all__ = ["copy_insert"]

_META = MetaData()
_STAGING: dict[str, Table] = {}


def _staging(table: Table, columns: Sequence[str]) -> Table:
    """A Table object describing the temp staging table for ``table`` (``_gw_in_<name>``)."""
    key = table.name + ":" + ",".join(columns)
    if key not in _STAGING:
        _STAGING[key] = Table(
            f"_gw_in_{table.name}",
            _META,
            Column("ord", Integer),
            *[Column(c, table.c[c].type) for c in columns],
            keep_existing=True,
        )
    return _STAGING[key]


def _processor(column: Column[Any], conn: Connection) -> Any:
    """Python value -> what COPY gets: JSON columns as JSON text, others through their type."""
    if isinstance(column.type, JSON):
        return lambda v: None if v is None else dumps_text(v)
    return column.type.bind_processor(conn.dialect)


def _copy_rows(cur: Any, copy_sql: Any, rows: Sequence[dict[str, Any]], columns: list[str], processors: list[Any],
               *, ordinal: bool) -> None:
    """COPY ``rows`` (their ``columns``, through ``processors``; with ``ord`` first if ``ordinal``)."""
    get = itemgetter(*columns)
    single = len(columns) == 1
    convert = [(i, p) for i, p in enumerate(processors) if p is not None]
    with cur.copy(copy_sql) as cp:
        write = cp.write_row
        for i, row in enumerate(rows):
            values = [get(row)] if single else list(get(row))
            for at, p in convert:
                values[at] = p(values[at])
            write([i, *values] if ordinal else values)


def copy_insert(
    conn: Connection,
    table: Table,
    rows: Sequence[dict[str, Any]],
    conflict: Sequence[str],
    returning: str,
    *,
    direct_first: bool = False,
) -> list[Any]:
    """Insert ``rows`` into ``table`` skipping conflicts on ``conflict``; returns ``returning`` of new rows.

    Must run inside the caller's transaction (the staging table empties on commit).

    ``direct_first`` (``returning`` must be one of the rows' columns): first COPY the rows straight
    into ``table`` under a savepoint -- when none of them exists yet (the common case: new records
    of a source), that is the whole insert, without the staging table, the sort and the
    ``INSERT ... SELECT``. Any integrity error (a key that exists, also one a concurrent
    transaction just committed, or a key repeated in ``rows``) rolls back to the savepoint, and the
    staging path below does the insert with its usual semantics (and reports any other error as
    before). Either way the rows are inserted in their order (``seq`` follows the batch order).
    """
    if not rows:
        return []
    columns = list(rows[0])
    raw = conn.connection.driver_connection
    processors = [_processor(table.c[c], conn) for c in columns]
    if direct_first and returning in columns:
        direct_sql = sql.SQL("COPY {} ({}) FROM STDIN").format(
            sql.Identifier(table.name), sql.SQL(", ").join(map(sql.Identifier, columns))
        )
        try:
            with conn.begin_nested(), raw.cursor() as cur:
                _copy_rows(cur, direct_sql, rows, columns, processors, ordinal=False)
        except psycopg.IntegrityError:
            pass  # rolled back to the savepoint: the staging path sorts it out
        except psycopg.Error as exc:
            raise DBAPIError(f"COPY into {table.name}", None, exc) from exc
        else:
            return [row[returning] for row in rows]
    staging = _staging(table, columns)
    try:
        with raw.cursor() as cur:
            # Every time: a rolled-back transaction takes the CREATE with it.
            cur.execute(
                sql.SQL(
                    "CREATE TEMP TABLE IF NOT EXISTS {} (ord integer, LIKE {} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
                ).format(sql.Identifier(staging.name), sql.Identifier(table.name))
            )
            copy_sql = sql.SQL("COPY {} ({}) FROM STDIN").format(
                sql.Identifier(staging.name), sql.SQL(", ").join(map(sql.Identifier, ["ord", *columns]))
            )
            _copy_rows(cur, copy_sql, rows, columns, processors, ordinal=True)
    except psycopg.Error as exc:  # raw-cursor errors in SQLAlchemy's type, like every other store error
        raise DBAPIError(f"COPY into {staging.name}", None, exc) from exc
    stmt = (
        postgresql.insert(table)
        .from_select(columns, select(*[staging.c[c] for c in columns]).order_by(staging.c.ord))
        .on_conflict_do_nothing(index_elements=list(conflict))
        .returning(table.c[returning])
    )
    return list(conn.execute(stmt).scalars())
