"""The ``config:`` block of the ``sql`` adapter, validated before anything connects.

Everything that can be checked without the database is checked here, with messages that name the
field and what was expected: identifiers, which options each mode takes, the placeholders of a
custom query, codecs, the dialect of ``mode: xid``. What needs the database (that tables and
columns exist, what a custom query returns) is checked by :meth:`SqlSource.open`.
"""

from __future__ import annotations

import codecs
import re
from datetime import datetime, timezone
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from adapters.base import SourceConfig
from gateway.events.timeutil import check_zone

__all__ = ["SqlConfig", "SoftDeleteConfig", "PLACEHOLDERS", "check_ident", "query_placeholders"]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,127}$")

#: The named placeholders a custom ``query`` must use, per mode (all of them, and no others).
PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "timestamp_key": ("last_ts", "last_key", "upper", "limit"),
    "incrementing": ("last_key", "limit"),
    "xid": ("last_xid", "last_key", "limit"),
}

#: ``start_time`` of a custom query when none is configured.
DEFAULT_START_TIME = datetime(1900, 1, 1, tzinfo=timezone.utc)

_MODES_WITH_DELAY = ("timestamp_key",)


def check_ident(value: str, what: str) -> str:
    """Return ``value`` if it is a plain SQL identifier, else raise ``ValueError`` naming ``what``."""
    if not _IDENT.match(value):
        raise ValueError(
            f"{what} {value!r} is not a plain SQL identifier (letters, digits, _ and $; "
            "not starting with a digit)"
        )
    return value


def query_placeholders(query: str) -> set[str]:
    """The named bind parameters SQLAlchemy's ``text()`` finds in ``query``."""
    return set(text(query)._bindparams)  # noqa: SLF001 -- text()'s parsed names; no public accessor


class SoftDeleteConfig(BaseModel):
    """Rows marked deleted by a column become delete events (``Record.deleted``)."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    column: str = Field(..., description="Column that marks a row deleted, e.g. is_deleted or deleted_at.")
    values: list[int | str | bool] | None = Field(
        None,
        description="Values of the column meaning 'deleted', e.g. [1, \"Y\"] (text compared after "
        "trimming spaces). Give values or not_null.",
    )
    not_null: bool = Field(
        False, description="A row is deleted when the column is not NULL (a deleted_at column)."
    )

    @field_validator("column")
    @classmethod
    def _ident(cls, v: str) -> str:
        return check_ident(v, "column")

    @model_validator(mode="after")
    def _one_rule(self) -> SoftDeleteConfig:
        if bool(self.values) == self.not_null:
            raise ValueError(
                "soft_delete: give exactly one of values (e.g. [1, \"Y\"]) or not_null: true"
            )
        return self


class SqlConfig(SourceConfig):
    """Settings of the ``sql`` adapter."""

    url: SecretStr = Field(..., description="SQLAlchemy URL of the legacy database; use ${ENV} for passwords.")
    table: str | None = Field(
        None, description="Table (or view) to poll, optionally schema-qualified: schema.table. Give table or query."
    )
    query: str | None = Field(
        None,
        description="Custom SELECT with named placeholders instead of table (timestamp_key: :last_ts, "
        ":last_key, :upper, :limit; incrementing: :last_key, :limit; xid: :last_xid, :last_key, "
        ":limit). Run as written: it must filter, ORDER BY the cursor columns and LIMIT :limit itself.",
    )
    mode: Literal["timestamp_key", "incrementing", "xid", "snapshot"] = Field(
        "timestamp_key",
        description="Cursor mode: timestamp_key ((timestamp, key) tuple), incrementing (a rising key), "
        "xid (PostgreSQL transaction ids: commit-safe without a delay), snapshot (whole table every "
        "pass, changes found by a row hash).",
    )
    key_column: str = Field(..., description="Unique key column; the tie-breaker of the cursor.")
    timestamp_column: str | None = Field(
        None, description="Last-change timestamp column (required in timestamp_key mode)."
    )
    xid_column: str | None = Field(
        None,
        description="Bigint column the source fills with pg_current_xact_id() on every insert and "
        "update (required in xid mode; see docs/adapters/sql.md for the trigger).",
    )
    columns: list[str] | None = Field(None, description="Columns to read (default: all). Table mode only.")
    naive_timezone: str = Field("UTC", description="Zone of timestamp columns without a zone.")
    delay_seconds: float = Field(
        0.0, ge=0, le=86400,
        description="Read only rows older than the database's clock minus this delay; set it to at "
        "least the source's longest write transaction so late commits are not skipped "
        "(timestamp_key mode).",
    )
    overlap_seconds: float = Field(
        0.0, ge=0, le=86400,
        description="Also re-read, on every poll, rows up to this many seconds behind the cursor and "
        "emit the ones not seen before (late commits the delay missed). timestamp_key mode with a table.",
    )
    bootstrap: Literal["none", "snapshot"] = Field(
        "none",
        description="snapshot: the first run reads the whole table by key (rows with NULL timestamps "
        "too), then continues incrementally from the database time the snapshot started (minus the delay).",
    )
    start_time: datetime | None = Field(
        None,
        description="Where the first poll starts: rows with timestamp >= start_time; the first "
        ":last_ts of a custom query (default there: 1900-01-01T00:00:00Z). UTC unless an offset is given.",
    )
    start_key: int | str | None = Field(
        None,
        description="The first :last_key of a custom query (default NULL: the query must accept it), "
        "and where incrementing mode starts (keys > start_key).",
    )
    soft_delete: SoftDeleteConfig | None = Field(
        None, description="A column marking deleted rows: such rows become delete events."
    )
    column_encodings: dict[str, str] = Field(
        default_factory=dict,
        description="Binary column -> legacy text codec (cp1252, cp037, latin-1, ...): decoded to text "
        "instead of base64. A value that does not decode sends its record to dead letters.",
    )
    encoding_errors: Literal["strict", "replace"] = Field(
        "strict",
        description="strict: an undecodable value is an error of its record; replace: it is decoded "
        "with U+FFFD for the bad bytes.",
    )

    # ------------------------------------------------------------------ names
    @field_validator("key_column", "timestamp_column", "xid_column")
    @classmethod
    def _ident(cls, v: str | None) -> str | None:
        return check_ident(v, "column") if v is not None else None

    @field_validator("columns")
    @classmethod
    def _idents(cls, v: list[str] | None) -> list[str] | None:
        return [check_ident(c, "column") for c in v] if v is not None else None

    @field_validator("table")
    @classmethod
    def _table(cls, v: str | None) -> str | None:
        if v is None:
            return None
        parts = v.split(".")
        if len(parts) > 2:
            raise ValueError(f"table {v!r}: expected 'table' or 'schema.table'")
        for p in parts:
            check_ident(p, "table")
        return v

    @field_validator("naive_timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        return check_zone(v)

    @field_validator("start_time")
    @classmethod
    def _aware(cls, v: datetime | None) -> datetime | None:
        if v is not None and v.tzinfo is None:
            v = v.replace(tzinfo=timezone.utc)
        return v

    @field_validator("column_encodings")
    @classmethod
    def _codecs(cls, v: dict[str, str]) -> dict[str, str]:
        for column, codec in v.items():
            check_ident(column, "column")
            try:
                info = codecs.lookup(codec)
            except LookupError:
                raise ValueError(
                    f"column {column!r}: unknown codec {codec!r} (expected a Python text codec such as "
                    "'cp1252', 'cp037' or 'latin-1')"
                ) from None
            if not getattr(info, "_is_text_encoding", True):
                raise ValueError(f"column {column!r}: codec {codec!r} is not a text encoding")
        return v

    # ------------------------------------------------------------------ combinations
    @model_validator(mode="after")
    def _combinations(self) -> SqlConfig:
        mode = self.mode
        if (self.table is None) == (self.query is None):
            raise ValueError("give exactly one of table (a table or view) or query (a custom SELECT)")
        if mode == "timestamp_key" and not self.timestamp_column:
            raise ValueError("mode timestamp_key needs timestamp_column")
        if mode == "xid":
            if not self.xid_column:
                raise ValueError("mode xid needs xid_column (a bigint column filled with pg_current_xact_id())")
            backend = self._backend()
            if backend is not None and backend != "postgresql":
                raise ValueError(f"mode xid needs PostgreSQL (transaction snapshots); url is a {backend} database")
        if self.delay_seconds > 0 and mode not in _MODES_WITH_DELAY:
            raise ValueError(f"delay_seconds applies to mode timestamp_key, not {mode}")
        if self.overlap_seconds > 0 and (mode != "timestamp_key" or self.query is not None):
            raise ValueError("overlap_seconds applies to mode timestamp_key with a table (not to a custom query)")
        if self.bootstrap == "snapshot" and (mode not in ("timestamp_key", "incrementing") or self.query is not None):
            raise ValueError(
                "bootstrap: snapshot applies to modes timestamp_key and incrementing with a table "
                "(not to a custom query)"
            )
        if mode == "snapshot" and self.query is not None:
            raise ValueError("mode snapshot reads a table by key: give table, not query")
        if self.query is not None:
            if self.columns is not None:
                raise ValueError("columns applies to table; a custom query selects its own columns")
            self._check_placeholders(self.query)
        return self

    def _backend(self) -> str | None:
        try:
            return make_url(self.url.get_secret_value()).get_backend_name()
        except ArgumentError:
            return None  # open() reports an unusable URL

    def _check_placeholders(self, query: str) -> None:
        wanted = PLACEHOLDERS[self.mode]
        found = query_placeholders(query)
        missing = [p for p in wanted if p not in found]
        unknown = sorted(found - set(wanted))
        problems = []
        if missing:
            hint = ""
            cast = [p for p in missing if re.search(rf"(?<![:\w]):{p}::", query)]
            if cast:
                hint = (
                    f" (':{cast[0]}::type' is not a placeholder to SQLAlchemy: write "
                    f"CAST(:{cast[0]} AS type))"
                )
            problems.append(f"missing {', '.join(':' + p for p in missing)}{hint}")
        if unknown:
            problems.append(f"unknown {', '.join(':' + p for p in unknown)}")
        if problems:
            raise ValueError(
                f"query: placeholders {'; '.join(problems)}; mode {self.mode} expects exactly "
                f"{', '.join(':' + p for p in wanted)} (write a literal colon as \\:)"
            )

    # ------------------------------------------------------------------ derived
    @property
    def first_start_time(self) -> datetime:
        """The first ``:last_ts`` of a custom query."""
        return self.start_time or DEFAULT_START_TIME

    def describe_source(self) -> str:
        """``table 'x'`` or ``the custom query`` (for messages)."""
        return f"table {self.table!r}" if self.table else "the custom query"
