"""The SQL polling adapter (SQLAlchemy): incremental reads with a commit-safe cursor."""

from adapters.sql.source import SqlConfig, SqlSource

__all__ = ["SqlConfig", "SqlSource"]
