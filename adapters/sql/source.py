"""Incremental polling of a legacy table.

Cursor modes:

* ``timestamp_key`` -- the cursor is ``(timestamp, key)``; the next read is
  ``WHERE (ts, key) > (:last_ts, :last_key) ORDER BY ts, key LIMIT :n``. Rows that share a
  timestamp across a batch boundary are neither skipped nor repeated (the key breaks the tie), and
  an updated row (new timestamp) is read again as a new version.
* ``incrementing`` -- the cursor is the last key of a strictly increasing column; updates are
  invisible in this mode.

Table and column names are checked against the reflected table, and queries are built from
SQLAlchemy ``Table``/``Column`` objects with bound values only (SEC-02). Timestamps are compared at
full precision; naive columns are read in ``naive_timezone`` and emitted in UTC.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, field_validator, model_validator
from sqlalchemy import Connection, Engine, Integer, MetaData, Select, Table, and_, bindparam, create_engine, or_, select, tuple_
from sqlalchemy.exc import DBAPIError, NoSuchTableError, SQLAlchemyError

from adapters.base import Batch, PollingSource, Record, SourceConfig
from gateway.errors import ConfigurationError, GatewayError, PermanentError, TransientError
from gateway.events import format_time, parse_time, utcnow

__all__ = ["SqlConfig", "SqlSource"]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,127}$")


def _check_ident(value: str, what: str) -> str:
    if not _IDENT.match(value):
        raise ValueError(
            f"{what} {value!r} is not a plain SQL identifier (letters, digits, _ and $; "
            "not starting with a digit)"
        )
    return value


class SqlConfig(SourceConfig):
    """Settings of the ``sql`` adapter."""

    url: SecretStr = Field(..., description="SQLAlchemy URL of the legacy database; use ${ENV} for passwords.")
    table: str = Field(..., description="Table (or view) to poll, optionally schema-qualified: schema.table.")
    mode: Literal["timestamp_key", "incrementing"] = Field(
        "timestamp_key", description="Cursor mode: (timestamp, key) tuple, or an incrementing key."
    )
    key_column: str = Field(..., description="Unique key column; the tie-breaker of the cursor.")
    timestamp_column: str | None = Field(
        None, description="Last-change timestamp column (required in timestamp_key mode)."
    )
    columns: list[str] | None = Field(None, description="Columns to read (default: all).")
    naive_timezone: str = Field("UTC", description="Zone of timestamp columns without a zone.")
    delay_seconds: float = Field(
        0.0, ge=0, le=86400,
        description="Read only rows older than now minus this delay; set it to at least the source's "
        "longest write transaction so late commits are not skipped.",
    )

    @field_validator("key_column", "timestamp_column")
    @classmethod
    def _ident(cls, v: str | None) -> str | None:
        return _check_ident(v, "column") if v is not None else None

    @field_validator("columns")
    @classmethod
    def _idents(cls, v: list[str] | None) -> list[str] | None:
        return [_check_ident(c, "column") for c in v] if v is not None else None

    @field_validator("table")
    @classmethod
    def _table(cls, v: str) -> str:
        parts = v.split(".")
        if len(parts) > 2:
            raise ValueError(f"table {v!r}: expected 'table' or 'schema.table'")
        for p in parts:
            _check_ident(p, "table")
        return v

    @field_validator("naive_timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r} (expected an IANA name such as 'Europe/Berlin')") from None
        return v

    @model_validator(mode="after")
    def _mode_needs(self) -> SqlConfig:
        if self.mode == "timestamp_key" and not self.timestamp_column:
            raise ValueError("mode timestamp_key needs timestamp_column")
        return self


class SqlSource(PollingSource[SqlConfig]):
    """Polls one table of a legacy SQL database."""

    kind = "sql"
    config_model = SqlConfig

    def __init__(self, config: SqlConfig, *, source_name: str) -> None:
        super().__init__(config, source_name=source_name)
        self._engine: Engine | None = None
        self._table: Table | None = None
        self._zone = ZoneInfo(config.naive_timezone)
        self._queries: dict[bool, Select[Any]] = {}
        self._conn: Connection | None = None

    # ---------------------------------------------------------------- lifecycle
    def open(self) -> None:
        """Connect and reflect the table; unknown names raise ConfigurationError."""
        if self._table is not None:
            return
        cfg = self.config
        # Reads only, one statement each: autocommit, and one connection kept between polls (a pool
        # checkout with pre-ping and reset-on-return tripled the round trips of an idle poll).
        engine = create_engine(cfg.url.get_secret_value(), isolation_level="AUTOCOMMIT", pool_size=1, max_overflow=1)
        schema, _, name = cfg.table.rpartition(".")
        try:
            table = Table(name, MetaData(), autoload_with=engine, schema=schema or None)
        except NoSuchTableError:
            engine.dispose()
            raise ConfigurationError(f"source {self.source_name!r}: config.table: table {cfg.table!r} does not exist") from None
        except (DBAPIError, SQLAlchemyError) as exc:
            engine.dispose()
            raise self.classify_error(exc) from exc
        wanted = [cfg.key_column, *([cfg.timestamp_column] if cfg.timestamp_column else []), *(cfg.columns or [])]
        missing = [c for c in wanted if c not in table.c]
        if missing:
            engine.dispose()
            raise ConfigurationError(
                f"source {self.source_name!r}: column(s) {', '.join(map(repr, missing))} not in table "
                f"{cfg.table!r} (columns: {', '.join(table.c.keys())})"
            )
        self._engine, self._table = engine, table

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
        self._engine, self._table = None, None
        self._queries = {}

    def columns(self) -> list[str]:
        """Names of the columns each record carries."""
        self.open()
        assert self._table is not None
        return list(self.config.columns or self._table.c.keys())

    # ---------------------------------------------------------------- reading
    def fetch(self, cursor: Any, limit: int) -> Batch:
        """Read the next ``limit`` rows after ``cursor`` (see the module docstring)."""
        self.open()
        assert self._engine is not None and self._table is not None
        cfg = self.config
        params: dict[str, Any] = {"lim": limit}
        if cursor:
            params["last_key"] = cursor["key"]
            if cfg.mode == "timestamp_key":
                params["last_ts"] = self._bind_ts(parse_time(cursor["ts"]))
        if cfg.mode == "timestamp_key" and cfg.delay_seconds > 0:
            params["upper"] = self._bind_ts(utcnow() - timedelta(seconds=cfg.delay_seconds))
        query = self._query(bool(cursor))
        if self._conn is None:
            self._conn = self._engine.connect()
        try:
            rows = self._conn.execute(query, params).mappings().all()
        except DBAPIError:
            conn, self._conn = self._conn, None  # reconnect on the next poll
            conn.invalidate()
            raise
        records = []
        position: Any = cursor
        for row in rows:
            data = {str(k): self._normalize(v) for k, v in row.items()}
            if cfg.mode == "timestamp_key":
                ts_val = data[cfg.timestamp_column]  # type: ignore[index]
                if not isinstance(ts_val, datetime):
                    raise PermanentError(
                        f"source {self.source_name!r}: {cfg.timestamp_column!r} holds "
                        f"{type(ts_val).__name__}, expected a timestamp"
                    )
                position = {"ts": format_time(ts_val), "key": data[cfg.key_column]}
            else:
                position = {"key": data[cfg.key_column]}
            records.append(Record(data=data, position=position))
        return Batch(records=records, cursor=position, has_more=len(rows) == limit)

    def _query(self, after_cursor: bool) -> Select[Any]:
        """The poll query, built once per shape (SQLAlchemy construction is the costly part)."""
        cached = self._queries.get(after_cursor)
        if cached is not None:
            return cached
        assert self._table is not None and self._engine is not None
        cfg, t = self.config, self._table
        key = t.c[cfg.key_column]
        cols = [t.c[c] for c in cfg.columns] if cfg.columns else list(t.c)
        for needed in (key, t.c[cfg.timestamp_column] if cfg.timestamp_column else None):
            if needed is not None and needed not in cols:
                cols.append(needed)
        query = select(*cols)
        last_key = bindparam("last_key", type_=key.type)
        if cfg.mode == "timestamp_key":
            ts = t.c[cfg.timestamp_column]  # type: ignore[index]
            last_ts = bindparam("last_ts", type_=ts.type)
            if after_cursor:
                if self._engine.dialect.name == "sqlite":
                    query = query.where(or_(ts > last_ts, and_(ts == last_ts, key > last_key)))
                else:  # row-value comparison: uses a (ts, key) index
                    query = query.where(tuple_(ts, key) > tuple_(last_ts, last_key))
            if cfg.delay_seconds > 0:
                query = query.where(ts < bindparam("upper", type_=ts.type))
            query = query.order_by(ts, key)
        else:
            if after_cursor:
                query = query.where(key > last_key)
            query = query.order_by(key)
        query = query.limit(bindparam("lim", type_=Integer))
        self._queries[after_cursor] = query
        return query

    def _bind_ts(self, value: datetime) -> datetime:
        """Bind an aware UTC datetime the way the timestamp column stores it."""
        assert self._table is not None and self.config.timestamp_column
        if getattr(self._table.c[self.config.timestamp_column].type, "timezone", False):
            return value
        return value.astimezone(self._zone).replace(tzinfo=None)

    def _normalize(self, value: Any) -> Any:
        if isinstance(value, datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=self._zone)
            return value.astimezone(timezone.utc)
        if isinstance(value, str):
            return value.rstrip(" ")  # CHAR(n) padding
        return value

    def classify_error(self, exc: BaseException) -> GatewayError:
        """DBAPI connection-level errors are transient; programming errors permanent."""
        if isinstance(exc, GatewayError):
            return exc
        if isinstance(exc, DBAPIError):
            if exc.connection_invalidated or type(exc.orig).__name__ in ("OperationalError", "InterfaceError"):
                err: GatewayError = TransientError(f"source {self.source_name!r}: database unavailable: {type(exc.orig).__name__}")
            else:
                err = PermanentError(f"source {self.source_name!r}: query failed: {type(exc.orig).__name__}: {exc.orig}")
            err.__cause__ = exc
            return err
        return super().classify_error(exc)
