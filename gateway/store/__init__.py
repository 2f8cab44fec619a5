"""The gateway store: outbox, cursors, source status, scores and dead letters (SQLAlchemy + Alembic)."""

from gateway.store.engine import engine_from_settings, make_engine
from gateway.store.repository import (
    AcceptResult,
    CursorState,
    DeadLetter,
    EventFilter,
    EventStore,
    OutboxRow,
    ScoreRecord,
    StoredEvent,
)
from gateway.store.status import SourceStatusRepository, StoredSourceStatus

__all__ = [
    "AcceptResult",
    "CursorState",
    "DeadLetter",
    "EventFilter",
    "EventStore",
    "OutboxRow",
    "ScoreRecord",
    "SourceStatusRepository",
    "StoredEvent",
    "StoredSourceStatus",
    "engine_from_settings",
    "make_engine",
]
