"""The gateway store: outbox, cursors, scores and dead letters (SQLAlchemy + Alembic)."""

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

__all__ = [
    "AcceptResult",
    "CursorState",
    "DeadLetter",
    "EventFilter",
    "EventStore",
    "OutboxRow",
    "ScoreRecord",
    "StoredEvent",
    "engine_from_settings",
    "make_engine",
]
