"""The audit log of admin actions (issue 8): who changed keys, replayed or deleted dead letters,
or moved a source's cursor, and when.

Rows are only ever appended. An action done through the API names the API key (``actor_id``,
``actor_name``); one done with the CLI names the OS user (``cli:<user>``). Key changes are
audited in the same transaction as the change; other actions right after theirs commits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, and_, insert, select, true

from gateway.store._sql import guard
from gateway.store.schema import audit_log

__all__ = [
    "AUDIT_ACTIONS",
    "Actor",
    "AuditEntry",
    "AuditRepository",
]

#: The actions the gateway records (``audit_log.action``).
AUDIT_ACTIONS = (
    "key.create",
    "key.revoke",
    "dead_letters.replay",
    "dead_letters.delete",
    "source.cursor.set",
    "source.cursor.reset",
)


@dataclass(frozen=True, slots=True)
class Actor:
    """Who did an admin action.

    Attributes:
        id: the API key id, or ``None`` (the CLI, or the API with ``api.auth`` off).
        name: the key's name, ``cli:<os user>``, or ``anonymous``.
    """

    id: str | None
    name: str


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audit log row."""

    id: int
    at: datetime
    actor_id: str | None
    actor_name: str
    action: str
    target: str | None
    details: dict[str, Any] | None


class AuditRepository:
    """Audit log methods of :class:`~gateway.store.EventStore` (mixed in)."""

    engine: Engine
    _clock: Callable[[], datetime]

    def _write_audit(
        self, conn: Connection, actor: Actor, action: str, target: str | None, details: dict[str, Any] | None
    ) -> None:
        if action not in AUDIT_ACTIONS:
            raise ValueError(f"unknown audit action {action!r} (known: {', '.join(AUDIT_ACTIONS)})")
        conn.execute(insert(audit_log).values(
            at=self._clock(), actor_id=actor.id, actor_name=actor.name[:255], action=action,
            target=None if target is None else str(target)[:255], details=details,
        ))

    def record_audit(
        self, actor: Actor, action: str, target: str | None = None, details: dict[str, Any] | None = None
    ) -> None:
        """Append one audit row.

        Args:
            actor: who did it.
            action: one of :data:`AUDIT_ACTIONS`.
            target: what it was done to (a key id, a source name, ``dead-letter:<id>``...).
            details: JSON-safe facts of the action (never a secret).

        Raises:
            ValueError: ``action`` is not one of :data:`AUDIT_ACTIONS`.
            StoreUnavailableError: the transaction did not commit.
        """
        with guard("record_audit"), self.engine.begin() as conn:
            self._write_audit(conn, actor, action, target, details)

    def list_audit(
        self, *, action: str | None = None, actor_id: str | None = None, after_id: int | None = None, limit: int = 100
    ) -> list[AuditEntry]:
        """Audit rows, oldest first, after ``after_id`` (cursor pagination), optionally filtered."""
        c = audit_log.c
        cond = [true()]
        if action is not None:
            cond.append(c.action == action)
        if actor_id is not None:
            cond.append(c.actor_id == actor_id)
        if after_id is not None:
            cond.append(c.id > after_id)
        query = select(audit_log).where(and_(*cond)).order_by(c.id).limit(limit)
        with guard("list_audit"), self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [AuditEntry(r.id, r.at, r.actor_id, r.actor_name, r.action, r.target, r.details) for r in rows]
