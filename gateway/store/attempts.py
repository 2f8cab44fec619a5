"""Started scoring attempts of suspect deliveries: the gateway's own crash-loop counter (REL-07).

A scorer process that dies while scoring an event (a model that segfaults, runs out of memory or
calls ``os._exit`` on one input) cannot count that attempt in memory, and the broker's delivery
count is no help either: RabbitMQ 3.x raises it for *every* message the dead process held, and on
every consumer pause or requeue. So before a redelivered event is scored, the worker commits one
more started attempt for it here, and removes the row once the model has answered (a score, or an
error handled as such). A row that survives says how many times scoring this event killed the
scorer; at ``max_attempts`` the worker dead-letters the event without scoring it again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

from sqlalchemy import Engine, delete, select, update

from gateway.store._sql import guard, insert_ignore
from gateway.store.schema import scoring_attempts

__all__ = ["ScoringAttemptRepository"]


class ScoringAttemptRepository:
    """Scoring-attempt methods of :class:`~gateway.store.EventStore` (mixed in)."""

    engine: Engine
    _clock: Callable[[], datetime]

    def begin_scoring_attempts(self, event_ids: Sequence[str]) -> dict[str, int]:
        """Commit one more started scoring attempt for each of ``event_ids``.

        Returns:
            Started attempts per event id, this one included (1 the first time).
        """
        ids = sorted(set(event_ids))
        if not ids:
            return {}
        now = self._clock()
        t = scoring_attempts
        with guard("begin_scoring_attempts"), self.engine.begin() as conn:
            conn.execute(
                insert_ignore(conn, t, ["event_id"]), [{"event_id": i, "attempts": 0, "updated_at": now} for i in ids]
            )
            conn.execute(update(t).where(t.c.event_id.in_(ids)).values(attempts=t.c.attempts + 1, updated_at=now))
            rows = conn.execute(select(t.c.event_id, t.c.attempts).where(t.c.event_id.in_(ids))).all()
        return {r.event_id: int(r.attempts) for r in rows}

    def end_scoring_attempts(self, event_ids: Sequence[str]) -> None:
        """Forget the started attempts of ``event_ids`` (the model answered for them)."""
        ids = sorted(set(event_ids))
        if not ids:
            return
        with guard("end_scoring_attempts"), self.engine.begin() as conn:
            conn.execute(delete(scoring_attempts).where(scoring_attempts.c.event_id.in_(ids)))

    def scoring_attempts(self, event_ids: Sequence[str]) -> dict[str, int]:
        """Started attempts that never finished, per event id (ids without any are absent)."""
        ids = sorted(set(event_ids))
        if not ids:
            return {}
        t = scoring_attempts
        with guard("scoring_attempts"), self.engine.connect() as conn:
            rows = conn.execute(select(t.c.event_id, t.c.attempts).where(t.c.event_id.in_(ids))).all()
        return {r.event_id: int(r.attempts) for r in rows if r.attempts}
