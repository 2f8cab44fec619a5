"""The gateway store: outbox, cursors and leases, source status, scores, dead letters and model checkpoints (SQLAlchemy + Alembic)."""

from gateway.store.checkpoints import CheckpointMeta, ModelCheckpointRepository
from gateway.store.engine import engine_from_settings, make_engine
from gateway.store.leases import LeaseRepository
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
from gateway.store.status import (
    SourceStatusRepository,
    StoredRunner,
    StoredSourceStatus,
)

__all__ = [
    "AcceptResult",
    "CheckpointMeta",
    "CursorState",
    "DeadLetter",
    "EventFilter",
    "EventStore",
    "LeaseRepository",
    "ModelCheckpointRepository",
    "OutboxRow",
    "ScoreRecord",
    "SourceStatusRepository",
    "StoredEvent",
    "StoredRunner",
    "StoredSourceStatus",
    "engine_from_settings",
    "make_engine",
]
