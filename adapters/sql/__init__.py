"""The SQL polling adapter (SQLAlchemy): incremental reads with a commit-safe cursor."""

from adapters.sql.config import SoftDeleteConfig, SqlConfig
from adapters.sql.source import SqlSource

__all__ = ["SoftDeleteConfig", "SqlConfig", "SqlSource"]
