"""The gateway store: outbox, cursors and leases, source status, scores, dead letters, model checkpoints, API keys and the audit log (SQLAlchemy + Alembic)."""

from gateway.store.audit import AUDIT_ACTIONS, Actor, AuditEntry, AuditRepository
from gateway.store.checkpoints import CheckpointMeta, ModelCheckpointRepository
from gateway.store.engine import engine_from_settings, make_engine
from gateway.store.keys import SCOPES, ApiKey, ApiKeyRepository
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
    "AUDIT_ACTIONS",
    "AcceptResult",
    "Actor",
    "ApiKey",
    "ApiKeyRepository",
    "AuditEntry",
    "AuditRepository",
    "CheckpointMeta",
    "CursorState",
    "DeadLetter",
    "EventFilter",
    "EventStore",
    "LeaseRepository",
    "ModelCheckpointRepository",
    "OutboxRow",
    "SCOPES",
    "ScoreRecord",
    "SourceStatusRepository",
    "StoredEvent",
    "StoredRunner",
    "StoredSourceStatus",
    "engine_from_settings",
    "make_engine",
]
