"""Commit-safe incremental polling of a legacy table or query.

Modes (``config.mode``) and their cursors:

* ``timestamp_key`` -- ``{"ts", "key"}``: ``WHERE ts < :upper AND (ts, key) > (:last_ts, :last_key)
  ORDER BY ts, key LIMIT n``. The key breaks timestamp ties, so rows sharing a timestamp across a
  batch boundary are neither skipped nor repeated; an update (new timestamp) is read again as a
  new version. ``:upper`` is the **database's** clock minus ``delay_seconds``: a row whose
  transaction is still open when the cursor passes its timestamp would be skipped for good, so
  the delay must be at least the source's longest write transaction. ``overlap_seconds`` adds a
  re-read of the rows behind the cursor to catch what the delay missed (:mod:`.window`).
* ``incrementing`` -- ``{"key"}``: ``WHERE key > :last_key ORDER BY key``, for append-only tables.
* ``xid`` -- ``{"xid", "key"}``, PostgreSQL: rows carry the id of the transaction that wrote them;
  only rows of transactions older than every running one are read, so a late commit can never
  be skipped, with no delay.
* ``snapshot`` -- ``{"snapshot_key", "pass"}``: the whole table in key order, pass after pass;
  each record carries ``_row_hash`` for the mapping's ``version``, so unchanged rows dedupe.

``bootstrap: snapshot`` makes a ``timestamp_key``/``incrementing`` source start with one snapshot
pass (cursor ``{"snapshot_key", "since"}``) and then continue incrementally from ``since``.

Table and column names are checked against the reflected table and queries are built from
SQLAlchemy objects with bound values only (SEC-02); a custom ``query`` is run exactly as written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, Engine, MetaData, Table, bindparam, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, NoSuchTableError, SQLAlchemyError
from sqlalchemy.sql import Executable

from adapters.base import Batch, PollingSource, Record, Reject
from adapters.sql.clock import DbClock, read_db_clock
from adapters.sql.config import SqlConfig
from adapters.sql.custom import CustomQuery
from adapters.sql.errors import classify_db_error
from adapters.sql.queries import TableQueries
from adapters.sql.values import ROW_HASH_FIELD, RowConverter, SoftDeleteRule, row_hash
from adapters.sql.window import SeenWindow
from gateway.errors import ConfigurationError, GatewayError, PermanentError
from gateway.events import format_time, jsonable, parse_time, utcnow
from gateway.events.jsonsafe import dumps, format_time_cached

__all__ = ["SqlConfig", "SqlSource"]

#: Most keys in one ``IN (...)`` of the overlap re-read (bound parameters are limited per statement).
_KEYS_PER_QUERY = 1000


class SqlSource(PollingSource[SqlConfig]):
    """Polls one table (or custom query) of a legacy SQL database.

    Args:
        config: the validated ``config:`` block.
        source_name: the configured source name.
        clock: the local wall clock (aware UTC) the database clock offset is measured against;
            injectable for tests.
        monotonic: times the database clock's refresh; injectable for tests.
    """

    kind = "sql"
    config_model = SqlConfig

    def __init__(
        self,
        config: SqlConfig,
        *,
        source_name: str,
        clock: Callable[[], datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(config, source_name=source_name)
        self._engine: Engine | None = None
        self._conn: Connection | None = None
        self._table: Table | None = None
        self._queries: TableQueries | None = None
        self._custom: CustomQuery | None = None
        self._zone = ZoneInfo(config.naive_timezone)
        self._convert = RowConverter(self._zone)
        self._soft = SoftDeleteRule(config.soft_delete) if config.soft_delete else None
        self._ts_aware = False
        self._db_clock = DbClock(self._read_db_clock, clock=clock, monotonic=monotonic)
        self._seen = SeenWindow()

    # ================================================================== lifecycle
    def open(self) -> None:
        """Connect; reflect the table (or probe the custom query); read the database clock.

        Raises:
            ConfigurationError: the table, a configured column or a query result column is
                missing, the query is rejected, or ``mode: xid`` is not on PostgreSQL.
            TransientError: the database is unreachable.
        """
        if self._engine is not None:
            return
        cfg = self.config
        # Reads only, one statement each: autocommit, and one connection kept between polls (a pool
        # checkout with pre-ping and reset-on-return tripled the round trips of an idle poll).
        engine = _make_engine(cfg.url.get_secret_value())
        self._engine = engine
        try:
            if cfg.mode == "xid" and engine.dialect.name != "postgresql":
                raise ConfigurationError(
                    f"source {self.source_name!r}: config.mode: xid needs PostgreSQL; url is a "
                    f"{engine.dialect.name} database"
                )
            if cfg.table is not None:
                self._open_table(engine)
            else:
                self._open_query()
            if cfg.mode == "timestamp_key":
                self._db_clock.measure()
        except BaseException as exc:
            self.close()
            if isinstance(exc, (DBAPIError, SQLAlchemyError)) and not isinstance(exc, NoSuchTableError):
                raise self.classify_error(exc) from exc
            raise

    def _open_table(self, engine: Engine) -> None:
        cfg = self.config
        assert cfg.table is not None
        schema, _, name = cfg.table.rpartition(".")
        try:
            table = Table(name, MetaData(), autoload_with=engine, schema=schema or None)
        except NoSuchTableError:
            raise ConfigurationError(f"source {self.source_name!r}: config.table: table {cfg.table!r} does not exist") from None
        wanted: list[tuple[str, str]] = [
            ("key_column", cfg.key_column),
            *((f, c) for f, c in (("timestamp_column", cfg.timestamp_column), ("xid_column", cfg.xid_column))
              if c and cfg.mode != "snapshot"),
            *(("columns", c) for c in cfg.columns or []),
            *([("soft_delete.column", cfg.soft_delete.column)] if cfg.soft_delete else []),
            *(("column_encodings", c) for c in cfg.column_encodings),
        ]
        missing = [(f, c) for f, c in wanted if c not in table.c]
        if missing:
            field = missing[0][0]
            names = ", ".join(dict.fromkeys(repr(c) for f, c in missing if f == field))
            raise ConfigurationError(
                f"source {self.source_name!r}: config.{field}: column(s) {names} not in table "
                f"{cfg.table!r} (columns: {', '.join(table.c.keys())})"
            )
        queries = TableQueries(table, cfg, engine.dialect.name)
        self._table, self._queries = table, queries
        self._convert = RowConverter.for_columns(
            queries.columns, self._zone, encodings=cfg.column_encodings, errors=cfg.encoding_errors
        )
        if queries.ts is not None:
            self._ts_aware = bool(getattr(queries.ts.type, "timezone", False))

    def _open_query(self) -> None:
        cfg = self.config
        custom = CustomQuery(cfg, self.source_name)
        params = self._custom_params(None, upper=cfg.first_start_time)
        custom.probe(self._connection(), params)
        self._custom = custom
        self._ts_aware = custom.aware_timestamps
        self._convert = RowConverter(
            self._zone,
            encodings=cfg.column_encodings,
            errors=cfg.encoding_errors,
            text_timestamps=[cfg.timestamp_column] if cfg.timestamp_column else (),
        )

    def close(self) -> None:
        """Close the kept connection and dispose of the pool."""
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 -- a dead connection is closed enough
                pass
            self._conn = None
        if self._engine is not None:
            self._engine.dispose()
        self._engine, self._table, self._queries, self._custom = None, None, None, None

    def columns(self) -> list[str]:
        """Names of the fields each record carries."""
        self.open()
        if self._custom is not None:
            return list(self._custom.columns)
        assert self._queries is not None
        names = [c.name for c in self._queries.columns]
        return [*names, ROW_HASH_FIELD] if self.config.mode == "snapshot" else names

    def initial_cursor(self) -> Any:
        """Where a source that never ran starts: ``start_time``/``start_key``, else the beginning.

        With ``bootstrap: snapshot`` (and in snapshot mode) the first fetch starts the snapshot.
        """
        cfg = self.config
        if cfg.query is not None or cfg.bootstrap == "snapshot" or cfg.mode == "snapshot":
            return None
        if cfg.mode == "timestamp_key" and cfg.start_time is not None:
            return {"ts": format_time(cfg.start_time), "key": None}
        if cfg.mode == "incrementing" and cfg.start_key is not None:
            return {"key": cfg.start_key}
        return None

    # ================================================================== reading
    def fetch(self, cursor: Any, limit: int) -> Batch:
        """Read the next ``limit`` rows after ``cursor`` (see the module docstring)."""
        self.open()
        cfg = self.config
        if cursor is None:
            cursor = self.initial_cursor()
        if cfg.mode == "snapshot":
            return self._fetch_snapshot(cursor, limit)
        if cfg.bootstrap == "snapshot" and (cursor is None or "snapshot_key" in cursor):
            return self._fetch_bootstrap(cursor, limit)
        if self._custom is not None:
            return self._fetch_custom(cursor, limit)
        if cfg.mode == "timestamp_key":
            return self._fetch_timestamp(cursor, limit)
        if cfg.mode == "incrementing":
            return self._fetch_by_key(cursor, limit)
        return self._fetch_xid(cursor, limit)

    # ------------------------------------------------------------------ timestamp_key
    def _fetch_timestamp(self, cursor: Mapping[str, Any] | None, limit: int) -> Batch:
        cfg, q = self.config, self._queries
        assert q is not None
        overlap = cfg.overlap_seconds > 0
        if overlap:
            self._seen.settle(cursor)
        params: dict[str, Any] = {"lim": limit, "upper": self._bind_ts(self._upper())}
        if cursor is None:
            shape = "first"
        else:
            params["last_ts"] = self._bind_cursor_ts(cursor)
            if cursor.get("key") is None:
                shape = "since"
            else:
                shape, params["last_key"] = "after", cursor["key"]
        rows = self._execute(q.timestamp(shape), params)
        late = self._late_records(cursor) if overlap and shape == "after" else []
        records = self._records(rows, self._ts_position)
        new_cursor = dict(records[-1].position) if records else (dict(cursor) if cursor is not None else None)
        if overlap:
            self._hold_seen([*late, *records], new_cursor, cursor)
        return self._batch([*late, *records], new_cursor, has_more=len(rows) == limit)

    def _upper(self) -> datetime:
        """The read horizon: the database's clock minus ``delay_seconds`` (aware UTC)."""
        return self._db_clock.now() - timedelta(seconds=self.config.delay_seconds)

    def _late_records(self, cursor: Mapping[str, Any]) -> list[Record | _Unreadable]:
        """Rows in ``[cursor.ts - overlap, cursor]`` not emitted yet: commits the delay missed."""
        q = self._queries
        assert q is not None and q.ts is not None
        last_ts = parse_time(cursor["ts"])
        start = last_ts - timedelta(seconds=self.config.overlap_seconds)
        self._seen.prune(start)
        params = {
            "window_start": self._bind_ts(start),
            "last_ts": self._bind_cursor_ts(cursor),
            "last_key": cursor["key"],
        }
        key_name, ts_name = q.key.name, q.ts.name
        unseen = []
        for data, _ in self._converted(self._execute(q.window_keys(), params)):
            if (data[key_name], data[ts_name]) not in self._seen:
                unseen.append(data[key_name])
        if not unseen:
            return []
        keys = list(dict.fromkeys(unseen))
        late: list[Record | _Unreadable] = []
        for i in range(0, len(keys), _KEYS_PER_QUERY):  # after a restart the whole window is unseen
            for rec in self._records(self._execute(q.window_rows(), {**params, "keys": keys[i : i + _KEYS_PER_QUERY]}),
                                     self._ts_position):
                if (rec.data[key_name], rec.data[ts_name]) not in self._seen:
                    late.append(rec)
        late.sort(key=lambda r: (r.data[ts_name], r.data[key_name]))  # chunks each come ordered
        return late

    def _hold_seen(self, records: Sequence[Record | _Unreadable], new_cursor: Any, read_from: Any) -> None:
        cfg = self.config
        assert cfg.timestamp_column is not None
        pairs = [(r.data[cfg.key_column], r.data[cfg.timestamp_column]) for r in records]
        self._seen.hold(pairs, new_cursor, read_from)

    def _ts_position(self, data: Mapping[str, Any]) -> dict[str, Any]:
        cfg = self.config
        ts = data[cfg.timestamp_column]  # type: ignore[index]
        if not isinstance(ts, datetime):
            raise PermanentError(
                f"source {self.source_name!r}: {cfg.timestamp_column!r} holds "
                f"{type(ts).__name__}, expected a timestamp"
            )
        return {"ts": format_time_cached(ts), "key": data[cfg.key_column]}

    # ------------------------------------------------------------------ incrementing
    def _fetch_by_key(self, cursor: Mapping[str, Any] | None, limit: int) -> Batch:
        q = self._queries
        assert q is not None
        after = cursor is not None and cursor.get("key") is not None
        params: dict[str, Any] = {"lim": limit}
        if after:
            assert cursor is not None
            params["last_key"] = cursor["key"]
        rows = self._execute(q.by_key(after), params)
        records = self._records(rows, self._key_position)
        new_cursor = dict(records[-1].position) if records else (dict(cursor) if cursor else None)
        return self._batch(records, new_cursor, has_more=len(rows) == limit)

    def _key_position(self, data: Mapping[str, Any]) -> dict[str, Any]:
        return {"key": data[self.config.key_column]}

    # ------------------------------------------------------------------ xid
    def _fetch_xid(self, cursor: Mapping[str, Any] | None, limit: int) -> Batch:
        q = self._queries
        assert q is not None
        params: dict[str, Any] = {"lim": limit}
        after = cursor is not None
        if cursor is not None:
            params["last_xid"], params["last_key"] = int(cursor["xid"]), cursor["key"]
        rows = self._execute(q.by_xid(after), params)
        records = self._records(rows, self._xid_position)
        new_cursor = dict(records[-1].position) if records else (dict(cursor) if cursor else None)
        return self._batch(records, new_cursor, has_more=len(rows) == limit)

    def _xid_position(self, data: Mapping[str, Any]) -> dict[str, Any]:
        xid = data[self.config.xid_column]  # type: ignore[index]
        return {"xid": int(xid), "key": data[self.config.key_column]}

    # ------------------------------------------------------------------ snapshot
    def _fetch_snapshot(self, cursor: Mapping[str, Any] | None, limit: int) -> Batch:
        """One page of the current pass; a short page ends the pass (the next starts after ``interval``)."""
        q = self._queries
        assert q is not None
        n = int(cursor.get("pass", 1)) if cursor else 1
        last = cursor.get("snapshot_key") if cursor else None
        params: dict[str, Any] = {"lim": limit}
        if last is not None:
            params["last_key"] = last
        rows = self._execute(q.by_key(last is not None), params)
        key = self.config.key_column
        records = self._records(rows, lambda d: {"snapshot_key": d[key], "pass": n}, with_hash=True)
        if len(rows) == limit:
            return self._batch(records, {"snapshot_key": records[-1].data[key], "pass": n}, has_more=True)
        return self._batch(records, {"snapshot_key": None, "pass": n + 1}, has_more=False)

    def _fetch_bootstrap(self, cursor: Mapping[str, Any] | None, limit: int) -> Batch:
        """One page of the bootstrap snapshot; after the last, continue incrementally from ``since``."""
        cfg, q = self.config, self._queries
        assert q is not None
        if cursor is None:  # the snapshot starts now: what changes from here on is read incrementally
            since = format_time(self._db_clock.now()) if cfg.mode == "timestamp_key" else None
            cursor = {"snapshot_key": None, "since": since}
        last = cursor.get("snapshot_key")
        params: dict[str, Any] = {"lim": limit}
        if last is not None:
            params["last_key"] = last
        rows = self._execute(q.by_key(last is not None), params)
        key = cfg.key_column
        records = self._records(rows, lambda d: {"snapshot_key": d[key]})
        if len(rows) == limit:
            return self._batch(records, {"snapshot_key": records[-1].data[key], "since": cursor["since"]}, has_more=True)
        if cfg.mode == "timestamp_key":
            start = parse_time(cursor["since"]) - timedelta(seconds=cfg.delay_seconds)
            nxt: dict[str, Any] = {"ts": format_time(start), "key": None}
        else:
            end = records[-1].data[key] if records else last
            nxt = {"key": end} if end is not None else {"key": None}
        return self._batch(records, nxt, has_more=True)

    # ------------------------------------------------------------------ custom query
    def _custom_params(self, cursor: Mapping[str, Any] | None, *, upper: datetime | None = None) -> dict[str, Any]:
        """The placeholder values of a custom query for ``cursor`` (``None``: the configured start)."""
        cfg = self.config
        cur = cursor or {}
        params: dict[str, Any] = {"last_key": cur.get("key", cfg.start_key)}
        if cfg.mode == "timestamp_key":
            params["last_ts"] = self._bind_cursor_ts(cur) if cur.get("ts") else self._bind_ts(cfg.first_start_time)
            params["upper"] = self._bind_ts(upper if upper is not None else self._upper())
        elif cfg.mode == "xid":
            params["last_xid"] = int(cur.get("xid", 0))
        return params

    def _fetch_custom(self, cursor: Mapping[str, Any] | None, limit: int) -> Batch:
        custom, cfg = self._custom, self.config
        assert custom is not None
        params = {**self._custom_params(cursor), "limit": limit}
        rows = self._execute(custom.statement, params)
        position = {
            "timestamp_key": self._ts_position, "incrementing": self._key_position, "xid": self._xid_position,
        }[cfg.mode]
        records = self._records(rows, position)
        self._check_order(cursor, records)
        new_cursor = dict(records[-1].position) if records else (dict(cursor) if cursor else None)
        return self._batch(records, new_cursor, has_more=len(rows) >= limit)

    def _check_order(self, cursor: Mapping[str, Any] | None, records: Sequence[Record | _Unreadable]) -> None:
        """A custom query must return rows after the cursor in cursor order; else it would loop or skip."""
        def sort_key(pos: Mapping[str, Any]) -> tuple[Any, ...]:
            if "ts_local" in pos:  # a naive column: its own values order the rows (UTC may not, at DST)
                return (datetime.fromisoformat(pos["ts_local"]), pos["key"])
            if "ts" in pos:
                return (parse_time(pos["ts"]), pos["key"])
            return (pos["xid"], pos["key"]) if "xid" in pos else (pos["key"],)

        prev = cursor if cursor and all(v is not None for v in cursor.values()) else None
        for rec in records:
            try:
                ok = prev is None or sort_key(rec.position) > sort_key(prev)
            except TypeError:  # NULL or incomparable keys: the database's order is taken as is
                ok = True
            if not ok:
                raise PermanentError(
                    f"source {self.source_name!r}: config.query returned {rec.position} after {dict(prev or {})}: "
                    "it must return only rows after the cursor placeholders, ordered by the cursor columns "
                    "(ORDER BY timestamp, key)"
                )
            prev = rec.position

    # ------------------------------------------------------------------ rows to records
    def _converted(self, rows: _Rows) -> Iterator[tuple[dict[str, Any], str | None]]:
        """Each row of ``rows`` converted (:meth:`RowConverter.convert`): data and error."""
        convert = self._convert
        if rows.by_name:
            for row in rows:
                yield convert.convert(row._mapping)
            return
        plan = convert.plan(rows.names)
        convert_values = convert.convert_values
        for row in rows:
            yield convert_values(plan, row)

    def _records(
        self, rows: _Rows, position: Callable[[Mapping[str, Any]], dict[str, Any]], *, with_hash: bool = False
    ) -> list[Record | _Unreadable]:
        """The records of ``rows``; the conversion plan is made once for the whole result."""
        ts_col = self.config.timestamp_column
        if rows.by_name:  # a result with a repeated column name: read by name, as a mapping (as before)
            return [
                self._record(data, error, row._mapping.get(ts_col) if ts_col else None, position, with_hash)
                for row, (data, error) in zip(rows, self._converted(rows))
            ]
        at = rows.names.index(ts_col) if ts_col and ts_col in rows.names else None
        record = self._record
        if at is None:
            return [record(data, error, None, position, with_hash) for data, error in self._converted(rows)]
        return [record(data, error, row[at], position, with_hash) for row, (data, error) in zip(rows, self._converted(rows))]

    def _record(
        self, data: dict[str, Any], error: str | None, raw_ts: Any,
        position: Callable[[Mapping[str, Any]], dict[str, Any]], with_hash: bool,
    ) -> Record | _Unreadable:
        """One converted row as a record (``raw_ts``: the row's timestamp column as read, or ``None``)."""
        pos = position(data)
        # A local time the zone does not have (the hour skipped in spring) does not survive the
        # round trip through UTC: keep the column's own value, so binding the cursor back cannot
        # move it past the rows that follow. In a UTC naive_timezone every local time survives it
        # (no gaps): the check cannot fire there, so it is skipped.
        if (
            "ts" in pos and self.config.timestamp_column and not self._ts_aware
            and isinstance(raw_ts, datetime) and raw_ts.tzinfo is None and not self._convert.utc_zone
            and self._bind_ts(parse_time(pos["ts"])) != raw_ts
        ):
            pos["ts_local"] = raw_ts.isoformat(timespec="microseconds")
        if error is not None:
            return _Unreadable(data=data, position=pos, reason=f"source {self.source_name!r}: row {pos}: {error}")
        if with_hash:
            data[ROW_HASH_FIELD] = row_hash(data)
        return Record(data=data, position=pos, deleted=bool(self._soft and self._soft.is_deleted(data)))

    def _batch(self, records: Sequence[Record | _Unreadable], cursor: Any, *, has_more: bool) -> Batch:
        """The batch; records that could not be read become dead letters of it (``Reject``)."""
        bad = [r for r in records if isinstance(r, _Unreadable)]
        good = [r for r in records if isinstance(r, Record)]
        if not bad:
            return Batch(records=good, cursor=cursor, has_more=has_more)
        rejects = [
            Reject(
                payload=dumps(jsonable(dict(r.data))), headers={}, error_class="UnicodeDecodeError",
                reason=r.reason, position=r.position, attempts=1,
            )
            for r in bad
        ]
        return Batch(records=good, cursor=cursor, has_more=has_more, rejects=rejects)

    # ------------------------------------------------------------------ commit hooks
    def committed(self, batch: Batch) -> None:
        """The runner stored ``batch``: its rows count as emitted in the overlap window."""
        self._seen.settle(batch.cursor)

    def released(self, batch: Batch) -> None:
        """The runner could not store ``batch``: its rows are emitted again by a later poll."""
        self._seen.settle(object())

    # ------------------------------------------------------------------ previews
    def count_between(self, after: Any, upto: Any) -> int | None:
        """Rows after cursor ``after`` up to and including cursor ``upto`` (``None``: the end).

        For a cursor-move preview: how many rows a move would re-read or skip. Counts what is in
        the table now, ignoring the delay horizon (0 when ``upto`` is not after ``after``).
        ``None`` for a custom query (its rows cannot be counted without running it) and for
        cursors of two different shapes.

        Args:
            after: a cursor of this source, or ``None`` (the beginning).
            upto: a cursor of this source, or ``None`` (the end).

        Returns:
            The number of rows, or ``None`` when it cannot be told.
        """
        self.open()
        q = self._queries
        if q is None:
            return None
        cfg = self.config
        if after is None:
            after = self.initial_cursor()  # the beginning, as fetch(None, ...) reads it
        shapes = {_shape(c) for c in (after, upto) if c is not None}
        if len(shapes) > 1:
            return None
        shape = shapes.pop() if shapes else ("key" if cfg.mode in ("snapshot", "incrementing") else cfg.mode)
        query = q.count()
        params: dict[str, Any] = {}
        if shape == "key":
            a, u = _key_of(after), _key_of(upto)
            if a is not None:
                query = query.where(q.key > bindparam("a_key", type_=q.key.type))
                params["a_key"] = a
            if u is not None:
                query = query.where(q.key <= bindparam("u_key", type_=q.key.type))
                params["u_key"] = u
            return int(self._execute(query, params, scalar=True))
        col = q.xid if shape == "xid" else q.ts
        if col is None:
            return None
        query = query.where(col.is_not(None))
        for which, cur in (("a", after), ("u", upto)):
            if cur is None:
                continue
            first = int(cur["xid"]) if shape == "xid" else self._bind_cursor_ts(cur)
            params[f"{which}_first"] = first
            if cur.get("key") is None:  # {"ts": X, "key": None}: the start of X, before any key
                b = bindparam(f"{which}_first", type_=col.type)
                query = query.where(col >= b if which == "a" else col < b)
                continue
            params[f"{which}_key"] = cur["key"]
            names = (f"{which}_first", f"{which}_key")
            cols = (col.name, q.key.name)
            query = query.where(q.after_cond(cols, names) if which == "a" else q.upto_cond(cols, names))
        return int(self._execute(query, params, scalar=True))

    # ------------------------------------------------------------------ plumbing
    def _bind_cursor_ts(self, cursor: Mapping[str, Any]) -> datetime:
        """The cursor's timestamp as the column stores it: its own naive value when it has one."""
        local = cursor.get("ts_local")
        if local and not self._ts_aware:
            return datetime.fromisoformat(local)
        return self._bind_ts(parse_time(cursor["ts"]))

    def _bind_ts(self, value: datetime) -> datetime:
        """An aware UTC datetime as the timestamp column stores it (naive: in ``naive_timezone``)."""
        if self._ts_aware:
            return value
        return value.astimezone(self._zone).replace(tzinfo=None)

    def _connection(self) -> Connection:
        assert self._engine is not None
        if self._conn is None:
            self._conn = self._engine.connect()
        return self._conn

    def _execute(self, statement: Executable, params: Mapping[str, Any], *, scalar: bool = False) -> Any:
        """Run one statement on the kept connection; a failed connection is replaced next time."""
        conn = self._connection()
        try:
            result = conn.execute(statement, dict(params))
            if scalar:
                return result.scalar_one()
            return _Rows([str(k) for k in result.keys()], result.all())
        except DBAPIError:
            self._conn = None  # reconnect on the next poll
            conn.invalidate()
            raise

    def _read_db_clock(self) -> datetime:
        conn = self._connection()
        try:
            return read_db_clock(conn, self._zone)
        except DBAPIError:
            self._conn = None
            conn.invalidate()
            raise

    def classify_error(self, exc: BaseException) -> GatewayError:
        """DBAPI connection-level errors are transient; programming errors permanent."""
        return classify_db_error(exc, self.source_name) or super().classify_error(exc)


def _make_engine(url: str) -> Engine:
    """An autocommit engine with a one-connection pool (SQLite in memory has a pool of its own)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        return create_engine(parsed, isolation_level="AUTOCOMMIT")
    return create_engine(parsed, isolation_level="AUTOCOMMIT", pool_size=1, max_overflow=1)


def _shape(cursor: Mapping[str, Any]) -> str:
    """Which order a cursor is in: ``key`` (incrementing, snapshot, bootstrap), ``xid`` or ``timestamp_key``."""
    if "xid" in cursor:
        return "xid"
    if "ts" in cursor:
        return "timestamp_key"
    return "key"


def _key_of(cursor: Mapping[str, Any] | None) -> Any:
    """The key of a key-ordered cursor (``key`` or ``snapshot_key``), or ``None``."""
    if cursor is None:
        return None
    return cursor.get("snapshot_key", cursor.get("key"))


class _Rows(list):  # type: ignore[type-arg]
    """The rows of one result (tuple-like, in column order) and its column names."""

    def __init__(self, names: list[str], rows: Sequence[Any]) -> None:
        super().__init__(rows)
        self.names = names
        #: A column name appears twice: rows are read by name, through their mapping (as before).
        self.by_name = len(set(names)) != len(names)


@dataclass(frozen=True, slots=True)
class _Unreadable:
    """A row the adapter could not convert (a value that does not decode): a dead letter, not a record."""

    data: Mapping[str, Any]
    position: Any
    reason: str
