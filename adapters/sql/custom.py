"""A user's own SELECT (``query:``) with named cursor placeholders.

The text is executed as written -- never appended to, never concatenated -- with the cursor bound
to its placeholders (``:last_ts``, ``:last_key``, ``:upper``, ``:limit``, ``:last_xid``, checked at
config time). At open it runs once with the first values and ``:limit`` bound to 0, which checks
that the database accepts it and that its result has the cursor columns.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    DateTime,
    Integer,
    TextClause,
    bindparam,
    text,
)
from sqlalchemy.exc import DBAPIError

from adapters.sql.config import SqlConfig
from gateway.errors import ConfigurationError

__all__ = ["CustomQuery"]

#: PostgreSQL type OID of ``timestamptz`` (result description ``type_code`` under psycopg).
_PG_TIMESTAMPTZ = 1184


class CustomQuery:
    """The configured query, its typed placeholders, and what its result looks like.

    Args:
        config: the source's configuration (``config.query`` is set).
        source_name: for messages.
    """

    def __init__(self, config: SqlConfig, source_name: str) -> None:
        assert config.query is not None
        self.config = config
        self.source_name = source_name
        binds = [bindparam("limit", type_=Integer)]
        if config.mode == "timestamp_key":
            binds += [bindparam("last_ts", type_=DateTime()), bindparam("upper", type_=DateTime())]
        if config.mode == "xid":
            binds.append(bindparam("last_xid", type_=BigInteger))
        self.statement: TextClause = text(config.query).bindparams(*binds)
        self.columns: list[str] = []
        #: Whether the timestamp column is zone-aware (bind aware UTC) or naive (bind local time).
        self.aware_timestamps = False

    def required_columns(self) -> list[str]:
        """Result columns the adapter needs: the cursor columns and the soft-delete column."""
        cfg = self.config
        cols = [cfg.key_column]
        if cfg.mode == "timestamp_key" and cfg.timestamp_column:
            cols.append(cfg.timestamp_column)
        if cfg.mode == "xid" and cfg.xid_column:
            cols.append(cfg.xid_column)
        if cfg.soft_delete:
            cols.append(cfg.soft_delete.column)
        return list(dict.fromkeys([*cols, *cfg.column_encodings]))

    def probe(self, conn: Connection, params: dict[str, Any]) -> None:
        """Run the query with ``params`` and ``:limit`` = 0; learn and check its result columns.

        Raises:
            ConfigurationError: the database rejects the query, or the result lacks a column the
                adapter needs (the message lists what it has).
        """
        try:
            result = conn.execute(self.statement, {**params, "limit": 0})
            keys = [str(k) for k in result.keys()]
            description = result.cursor.description if result.cursor is not None else None
            result.close()
        except DBAPIError as exc:
            hint = ""
            if "could not determine data type" in str(exc.orig):
                hint = " (PostgreSQL needs a type for a NULL placeholder: write CAST(:last_key AS integer))"
            raise ConfigurationError(
                f"source {self.source_name!r}: config.query: the database rejected it with the first "
                f"cursor values: {type(exc.orig).__name__}: {str(exc.orig).strip()}{hint}"
            ) from None
        missing = [c for c in self.required_columns() if c not in keys]
        if missing:
            raise ConfigurationError(
                f"source {self.source_name!r}: config.query: its result lacks column(s) "
                f"{', '.join(map(repr, missing))} (it returns: {', '.join(keys) or 'no columns'})"
            )
        self.columns = keys
        ts = self.config.timestamp_column
        if conn.dialect.name == "postgresql" and ts and description:
            codes = {str(d[0]): d[1] for d in description}
            self.aware_timestamps = codes.get(ts) == _PG_TIMESTAMPTZ
