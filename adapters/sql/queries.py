"""The poll queries of table mode, built from SQLAlchemy ``Table``/``Column`` objects (SEC-02).

Every value is a bound parameter; every name comes from the reflected table. Queries are built
once per shape and cached (construction is the costly part of an idle poll).

**Cursor comparison.** ``(ts, key) > (:last_ts, :last_key)`` is written as a row-value comparison
on PostgreSQL and SQLite, where it is an index range scan on a ``(ts, key)`` index. MariaDB/MySQL
use only the index's first column for a row-value comparison (MariaDB 10.11 ``ANALYZE``: the range
starts at the beginning of the index and filters row by row -- 36,100 rows read for a 100-row
page of a 50,000-row table), so there, and on unknown dialects, the expanded form
``(ts = :last_ts AND key > :last_key) OR ts > :last_ts`` is used: MariaDB turns it into a range
over both index columns (100 rows read).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Integer,
    Select,
    Table,
    Text,
    and_,
    bindparam,
    cast,
    func,
    or_,
    select,
    tuple_,
)

from adapters.sql.config import SqlConfig

__all__ = ["TableQueries", "ROW_VALUE_DIALECTS"]

#: Dialects where a row-value comparison uses a two-column index.
ROW_VALUE_DIALECTS = frozenset({"postgresql", "sqlite"})


class TableQueries:
    """Builds (and caches) the queries of one configured table.

    Args:
        table: the reflected table.
        config: the source's configuration.
        dialect: the SQLAlchemy dialect name.
    """

    def __init__(self, table: Table, config: SqlConfig, dialect: str) -> None:
        self.table = table
        self.config = config
        self.row_values = dialect in ROW_VALUE_DIALECTS
        self._cache: dict[str, Select[Any]] = {}
        c = table.c
        self.key = c[config.key_column]
        by_key_only = config.mode == "snapshot"  # a snapshot reads by key alone
        self.ts = c[config.timestamp_column] if config.timestamp_column and not by_key_only else None
        self.xid = c[config.xid_column] if config.xid_column and not by_key_only else None
        cols = [c[name] for name in config.columns] if config.columns else list(c)
        for needed in (self.key, self.ts, self.xid, c[config.soft_delete.column] if config.soft_delete else None):
            if needed is not None and needed not in cols:
                cols.append(needed)
        self.columns = cols

    # ------------------------------------------------------------------ pieces
    def _after(self, first: ColumnElement[Any], second: ColumnElement[Any], p1: str, p2: str) -> ColumnElement[bool]:
        """``(first, second) > (:p1, :p2)`` in the form this dialect indexes."""
        b1, b2 = bindparam(p1, type_=first.type), bindparam(p2, type_=second.type)
        if self.row_values:
            return tuple_(first, second) > tuple_(b1, b2)
        return or_(and_(first == b1, second > b2), first > b1)

    def _at_or_before(self, first: ColumnElement[Any], second: ColumnElement[Any], p1: str, p2: str) -> ColumnElement[bool]:
        """``(first, second) <= (:p1, :p2)``."""
        b1, b2 = bindparam(p1, type_=first.type), bindparam(p2, type_=second.type)
        if self.row_values:
            return tuple_(first, second) <= tuple_(b1, b2)
        return or_(and_(first == b1, second <= b2), first < b1)

    def _limit(self, query: Select[Any]) -> Select[Any]:
        return query.limit(bindparam("lim", type_=Integer))

    def _cached(self, shape: str, build: Any) -> Select[Any]:
        query = self._cache.get(shape)
        if query is None:
            query = self._cache[shape] = build()
        return query

    # ------------------------------------------------------------------ timestamp_key
    def timestamp(self, shape: str) -> Select[Any]:
        """The timestamp_key poll of one ``shape``.

        ``ts < :upper`` and, by ``shape``, no lower bound (``first``), ``ts >= :last_ts``
        (``since``) or ``(ts, key) > (:last_ts, :last_key)`` (``after``); ``ORDER BY ts, key
        LIMIT :lim``.
        """
        ts, key = self.ts, self.key
        assert ts is not None

        def build() -> Select[Any]:
            query = select(*self.columns).where(ts < bindparam("upper", type_=ts.type))
            if shape == "since":
                query = query.where(ts >= bindparam("last_ts", type_=ts.type))
            elif shape == "after":
                query = query.where(self._after(ts, key, "last_ts", "last_key"))
            return self._limit(query.order_by(ts, key))

        return self._cached(f"ts:{shape}", build)

    def window_keys(self) -> Select[Any]:
        """The overlap re-read, narrow: ``key, ts`` of rows in ``[:window_start, cursor]``."""
        ts, key = self.ts, self.key
        assert ts is not None
        return self._cached(
            "window:keys",
            lambda: select(key, ts).where(
                ts >= bindparam("window_start", type_=ts.type),
                self._at_or_before(ts, key, "last_ts", "last_key"),
            ),
        )

    def window_rows(self) -> Select[Any]:
        """The overlap re-read, full rows of the keys in ``:keys`` still within the window."""
        ts, key = self.ts, self.key
        assert ts is not None
        return self._cached(
            "window:rows",
            lambda: select(*self.columns)
            .where(
                key.in_(bindparam("keys", expanding=True, type_=key.type)),
                ts >= bindparam("window_start", type_=ts.type),
                self._at_or_before(ts, key, "last_ts", "last_key"),
            )
            .order_by(ts, key),
        )

    # ------------------------------------------------------------------ incrementing, snapshot
    def by_key(self, after: bool) -> Select[Any]:
        """Keyset paging by key: ``key > :last_key`` (``after``) ``ORDER BY key LIMIT :lim``."""
        key = self.key

        def build() -> Select[Any]:
            query = select(*self.columns)
            if after:
                query = query.where(key > bindparam("last_key", type_=key.type))
            return self._limit(query.order_by(key))

        return self._cached(f"key:{after}", build)

    # ------------------------------------------------------------------ xid
    def xid_horizon(self) -> ColumnElement[Any]:
        """The oldest transaction id still running (``pg_snapshot_xmin`` of this statement's snapshot)."""
        return cast(cast(func.pg_snapshot_xmin(func.pg_current_snapshot()), Text), BigInteger)

    def by_xid(self, after: bool) -> Select[Any]:
        """``xid < horizon`` and ``(xid, key) > (:last_xid, :last_key)`` ``ORDER BY xid, key LIMIT :lim``."""
        xid, key = self.xid, self.key
        assert xid is not None

        def build() -> Select[Any]:
            query = select(*self.columns).where(xid < self.xid_horizon())
            if after:
                query = query.where(self._after(xid, key, "last_xid", "last_key"))
            return self._limit(query.order_by(xid, key))

        return self._cached(f"xid:{after}", build)

    # ------------------------------------------------------------------ counting
    def count(self) -> Select[Any]:
        """``SELECT count(*)`` of the table; previews add their conditions (built per call: rare)."""
        return select(func.count()).select_from(self.table)

    def after_cond(self, cols: tuple[str, str], names: tuple[str, str]) -> ColumnElement[bool]:
        """``(cols) > (:names)`` for count previews."""
        return self._after(self.table.c[cols[0]], self.table.c[cols[1]], *names)

    def upto_cond(self, cols: tuple[str, str], names: tuple[str, str]) -> ColumnElement[bool]:
        """``(cols) <= (:names)`` for count previews."""
        return self._at_or_before(self.table.c[cols[0]], self.table.c[cols[1]], *names)
