"""The gateway store: acceptance point (outbox + cursor in one transaction), relay claims,
scores, cursors and dead letters.

Every method is one transaction. Nothing here retries; callers decide (see ``gateway.resilience``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Integer,
    and_,
    any_,
    bindparam,
    delete,
    false,
    func,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from gateway.errors import FencingError, StoreUnavailableError
from gateway.events import Event, utcnow
from gateway.events.jsonsafe import loads
from gateway.store._sql import guard as _guard
from gateway.store._sql import insert_ignore as _insert_ignore
from gateway.store.attempts import ScoringAttemptRepository
from gateway.store.audit import AuditRepository
from gateway.store.checkpoints import ModelCheckpointRepository
from gateway.store.contracts import ContractRepository
from gateway.store.keys import ApiKeyRepository
from gateway.store.leases import LeaseRepository
from gateway.store.shadow import ShadowRepository
from gateway.store.schema import (
    EVENT_PENDING,
    EVENT_PUBLISHED,
    dead_letters,
    events,
    scores,
    source_cursors,
)
from gateway.store.status import SourceStatusRepository

__all__ = [
    "EventStore",
    "AcceptResult",
    "OutboxRow",
    "ScoreRecord",
    "StoredEvent",
    "CursorState",
    "DeadLetter",
    "ReplayWrite",
    "EventFilter",
    "DEAD_OPEN",
    "DEAD_REPLAYED",
    "DEAD_STATES",
]

_CHUNK = 500

#: Dead-letter states (``list_dead_letters(state=...)``): open = not replayed (yet).
DEAD_OPEN = "open"
DEAD_REPLAYED = "replayed"
DEAD_STATES = (DEAD_OPEN, DEAD_REPLAYED, "all")


@dataclass(frozen=True, slots=True)
class AcceptResult:
    """What one acceptance transaction did."""

    inserted: list[str]
    duplicates: list[str]


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A pending event claimed by a relay."""

    seq: int
    id: str
    type: str
    envelope: str
    attempts: int


@dataclass(frozen=True, slots=True)
class ScoreRecord:
    """One model's score of one event."""

    event_id: str
    model_name: str
    model_version: str
    score: float
    explanation: dict[str, Any] | None
    event_type: str
    source_name: str
    event_time: datetime
    scored_at: datetime


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as the store holds it, with its delivery state and scores."""

    seq: int
    event: dict[str, Any]
    source_name: str
    status: str
    attempts: int
    accepted_at: datetime
    published_at: datetime | None
    scores: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class CursorState:
    """A source's committed cursor and its lease.

    Attributes:
        source_name: the source.
        cursor: the committed cursor (``None``: the adapter's initial cursor).
        epoch: the fencing epoch; bumped by every lease takeover and operator cursor move.
        updated_at: when the cursor was last written.
        events_total: events committed with it, over all runners.
        lease_owner: the runner holding the lease, ``None`` when free.
        lease_until: when the lease expires unless renewed (UTC).
    """

    source_name: str
    cursor: Any
    epoch: int
    updated_at: datetime
    events_total: int
    lease_owner: str | None = None
    lease_until: datetime | None = None

    def lease_live(self, now: datetime) -> bool:
        """Whether someone holds the lease at ``now`` (held and not expired)."""
        return self.lease_owner is not None and self.lease_until is not None and self.lease_until >= now


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A parked message or record."""

    id: int
    event_id: str | None
    stage: str
    source_name: str | None
    error_class: str
    reason: str
    payload: str | None
    headers: dict[str, Any] | None
    attempts: int
    created_at: datetime
    replayed_at: datetime | None = None
    replay_count: int = 0
    last_replay_at: datetime | None = None
    last_replay_outcome: str | None = None
    last_replay_detail: str | None = None
    dedupe_key: str | None = None

    @property
    def state(self) -> str:
        """``open`` until a replay succeeded, then ``replayed``."""
        return DEAD_REPLAYED if self.replayed_at is not None else DEAD_OPEN


@dataclass(frozen=True, slots=True)
class ReplayWrite:
    """What :meth:`EventStore.replay_dead_letter` committed.

    Attributes:
        requeued: event ids already in the outbox, set back to pending (the relay publishes them again).
        accepted: event ids newly stored in the outbox.
    """

    requeued: list[str]
    accepted: list[str]

    @property
    def outcome(self) -> str:
        """``accepted`` when an event was new, else ``requeued``."""
        return "accepted" if self.accepted else "requeued"


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Filters of ``list_events``; every field is optional."""

    source_name: str | None = None
    type: str | None = None
    time_from: datetime | None = None
    time_to: datetime | None = None
    min_score: float | None = None
    status: str | None = None
    subject: str | None = None
    max_score: float | None = None
    #: Only events scored by this model (name); with min_score/max_score, that model's score.
    model: str | None = None
    #: Only events of these sources (a restricted API key); None: every source.
    sources: tuple[str, ...] | None = None


class _AlreadyReplayed(Exception):
    """Rolls back a replay whose dead letter was replayed meanwhile."""


def _member(column: Any, name: str, pg: bool) -> Any:
    """``column IN (:name)``: one array parameter on PostgreSQL (a constant statement text that
    psycopg can prepare), an expanding IN elsewhere."""
    if pg:
        return column == any_(bindparam(name, type_=ARRAY(column.type)))
    return column.in_(bindparam(name, expanding=True))


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]



def _outbox_rows(batch: Iterable[Event], source_name: str | None, now: datetime) -> dict[str, dict[str, Any]]:
    """New pending outbox rows for ``batch`` by event id (the first of duplicate ids wins)."""
    rows: dict[str, dict[str, Any]] = {}
    for ev in batch:
        rows.setdefault(ev.id, {
            "id": ev.id,
            "source_name": source_name or ev.source_name or ev.source,
            "type": ev.type,
            "subject": ev.subject,
            "time": ev.time,
            "envelope": ev.to_json().decode("utf-8"),
            "status": EVENT_PENDING,
            "attempts": 0,
            "accepted_at": now,
        })
    return rows

class EventStore(
    SourceStatusRepository, LeaseRepository, ScoringAttemptRepository, ShadowRepository, ModelCheckpointRepository,
    ApiKeyRepository, AuditRepository, ContractRepository,
):
    """Repository over the gateway store (source status methods: :class:`SourceStatusRepository`;
    source leases: :class:`~gateway.store.leases.LeaseRepository`; scoring attempts:
    :class:`~gateway.store.attempts.ScoringAttemptRepository`; the shadow comparison:
    :class:`~gateway.store.shadow.ShadowRepository`; model checkpoints:
    :class:`~gateway.store.checkpoints.ModelCheckpointRepository`).

    Args:
        engine: SQLAlchemy engine of the store (migrated to head).
        clock: returns aware UTC "now"; injectable for tests.
    """

    def __init__(self, engine: Engine, clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self._clock = clock
        self._dialect = engine.dialect.name
        self._skip_locked = self._dialect in ("postgresql", "mysql", "mariadb")
        self._pg = self._dialect == "postgresql"
        if self._pg:  # psycopg is only needed (and installed) for PostgreSQL stores
            from gateway.store.pgcopy import copy_insert

            self._copy_insert = copy_insert
        self._build_statements()

    def now(self) -> datetime:
        """The store's clock: aware UTC "now" (lease times and timestamps are taken from it)."""
        return self._clock()

    def _build_statements(self) -> None:
        """Build the hot statements once: constructing SQLAlchemy expressions per call costs more
        CPU than running them, and the relay and scorer call these thousands of times."""
        pg = self._pg
        now = bindparam("now", type_=events.c.accepted_at.type)
        claim = (
            select(events.c.seq, events.c.id, events.c.type, events.c.envelope, events.c.attempts)
            .where(
                events.c.status == EVENT_PENDING,
                or_(events.c.next_attempt_at.is_(None), events.c.next_attempt_at <= now),
                or_(events.c.claimed_until.is_(None), events.c.claimed_until < now),
            )
            .order_by(events.c.seq)
            .limit(bindparam("lim", type_=Integer))
        )
        self._q_claim = claim.with_for_update(skip_locked=True) if self._skip_locked else claim
        self._q_set_claim = (
            update(events)
            .where(_member(events.c.seq, "seqs", pg))
            .values(claimed_by=bindparam("owner"), claimed_until=bindparam("until"))
        )
        self._q_published = (
            update(events)
            .where(_member(events.c.seq, "seqs", pg))
            .values(status=EVENT_PUBLISHED, published_at=bindparam("now"), claimed_by=None, claimed_until=None)
        )
        self._q_event_exists = select(events.c.id).where(_member(events.c.id, "ids", pg))
        self._q_scores = select(scores).where(
            _member(scores.c.event_id, "ids", pg),
            scores.c.model_name == bindparam("model"),
            scores.c.model_version == bindparam("version"),
        )

    # ------------------------------------------------------------------ acceptance point
    def accept(
        self,
        batch: Sequence[Event],
        *,
        source_name: str | None = None,
        cursor: Any = None,
        epoch: int | None = None,
        write_cursor: bool = False,
        rejects: Sequence[dict[str, Any]] = (),
    ) -> AcceptResult:
        """Store events in the outbox and, in the SAME transaction, the source's new cursor.

        Duplicate ids (already stored, or repeated in ``batch``) are ignored, not errors.

        Args:
            batch: events to accept.
            source_name: the source the batch came from (lineage; cursor owner).
            cursor: the cursor after this batch (JSON-safe); written when ``write_cursor``.
            epoch: fencing epoch of the writer (from :meth:`try_acquire_lease`); the cursor write
                fails if the stored epoch differs (a takeover or an operator's cursor move since).
            write_cursor: whether to write ``cursor`` (``None`` is a valid cursor to store).
            rejects: dead letters for records of this batch that could not be mapped, stored in
                the same transaction (keys of :meth:`add_dead_letter`), so a record is either an
                event or a dead letter, never lost and never both.

        Returns:
            Which ids were inserted and which were duplicates.

        Raises:
            FencingError: ``epoch`` is stale; nothing was written.
            StoreUnavailableError: the transaction did not commit; nothing was written.
        """
        now = self._clock()
        rows = _outbox_rows(batch, source_name, now)
        inserted: list[str] = []
        try:
            with self.engine.begin() as conn:
                if rows:
                    inserted = self._insert_events(conn, list(rows.values()))
                if rejects:
                    # A reject with a dedupe key (the source's identity of the legacy record) is
                    # stored once: a record redelivered after a crash between this commit and the
                    # legacy ack must not become a second dead letter.
                    dead = [self._dead_row(now, **r) for r in rejects]
                    keyed = [r for r in dead if r.get("dedupe_key")]
                    plain = [r for r in dead if not r.get("dedupe_key")]
                    if plain:
                        conn.execute(dead_letters.insert(), plain)
                    for row in {r["dedupe_key"]: r for r in keyed}.values():
                        conn.execute(_insert_ignore(conn, dead_letters, ["dedupe_key"]).values(**row))
                if write_cursor:
                    if source_name is None:
                        raise ValueError("write_cursor needs source_name")
                    self._write_cursor(conn, source_name, cursor, epoch, len(inserted), now)
        except FencingError:
            raise
        except (DBAPIError, SQLAlchemyError) as exc:
            orig = exc.orig if isinstance(exc, DBAPIError) else exc
            raise StoreUnavailableError(f"outbox transaction failed: {type(orig).__name__}") from exc
        ins = set(inserted)
        # Both lists in batch order, each id once.
        return AcceptResult(
            inserted=[i for i in rows if i in ins], duplicates=[i for i in rows if i not in ins]
        )

    def _insert_events(self, conn: Connection, rows: list[dict[str, Any]]) -> list[str]:
        """Insert rows whose id is new; returns the inserted ids.

        Existing ids are looked up first and the insert skips conflicts (so a concurrent insert of
        the same id is harmless). No RETURNING: with it SQLAlchemy renders one giant multi-VALUES
        statement per page, which psycopg re-parses every time (about 10x slower than its
        pipelined executemany).
        """
        if self._pg:
            # Straight COPY into events first: new ids are the common case (see copy_insert).
            return [str(i) for i in self._copy_insert(conn, events, rows, ["id"], "id", direct_first=True)]
        existing: set[str] = set()
        for chunk in _chunks([r["id"] for r in rows], 1000):
            existing.update(conn.execute(self._q_event_exists, {"ids": list(chunk)}).scalars())
        fresh = [r for r in rows if r["id"] not in existing]
        if fresh:
            conn.execute(_insert_ignore(conn, events, ["id"]), fresh)
        return [r["id"] for r in fresh]

    @staticmethod
    def _existing(conn: Connection, column: Any, ids: Sequence[str], *where: Any) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(list(ids), 1000):
            found.update(conn.execute(select(column).where(column.in_(chunk), *where)).scalars())
        return found

    def _write_cursor(
        self, conn: Connection, source_name: str, cursor: Any, epoch: int | None, count: int, now: datetime
    ) -> None:
        cond = source_cursors.c.source_name == source_name
        if epoch is not None:
            cond = and_(cond, source_cursors.c.epoch == epoch)
        res = conn.execute(
            update(source_cursors)
            .where(cond)
            .values(cursor=cursor, updated_at=now, events_total=source_cursors.c.events_total + count)
        )
        if res.rowcount == 1:
            return
        if epoch is not None:
            raise FencingError(
                f"source {source_name!r}: cursor write with epoch {epoch} refused "
                "(another runner holds a newer epoch)"
            )
        conn.execute(
            _insert_ignore(conn, source_cursors, ["source_name"]),
            {"source_name": source_name, "cursor": cursor, "epoch": 0, "updated_at": now, "events_total": count},
        )

    # ------------------------------------------------------------------ cursors
    def set_cursor(self, source_name: str, cursor: Any) -> int:
        """Set (or reset with ``None``) a source's cursor, as an operator; returns the new epoch.

        One ``UPDATE`` writes the cursor and bumps the epoch together, so a
        runner's concurrent cursor write either commits before it (and is overwritten) or affects
        0 rows (:class:`FencingError`). The lease is left alone: its holder's next renewal fails
        on the new epoch, it re-acquires its own lease and reloads this cursor.
        """
        now = self._clock()
        c = source_cursors.c
        with _guard("set_cursor"), self.engine.begin() as conn:
            conn.execute(
                _insert_ignore(conn, source_cursors, ["source_name"]),
                {"source_name": source_name, "cursor": None, "epoch": 0, "updated_at": now, "events_total": 0},
            )
            conn.execute(
                update(source_cursors)
                .where(c.source_name == source_name)
                .values(cursor=cursor, epoch=c.epoch + 1, updated_at=now)
            )
            return int(conn.execute(select(c.epoch).where(c.source_name == source_name)).scalar_one())

    def get_cursor(self, source_name: str) -> CursorState | None:
        """The committed cursor of ``source_name``, or ``None`` if it never ran."""
        with _guard('get_cursor'), self.engine.connect() as conn:
            row = conn.execute(select(source_cursors).where(source_cursors.c.source_name == source_name)).first()
        return self._cursor_state(row) if row else None

    def list_cursors(self) -> list[CursorState]:
        """Every source's cursor."""
        with _guard('list_cursors'), self.engine.connect() as conn:
            rows = conn.execute(select(source_cursors).order_by(source_cursors.c.source_name)).all()
        return [self._cursor_state(r) for r in rows]

    @staticmethod
    def _cursor_state(row: Any) -> CursorState:
        return CursorState(
            row.source_name, row.cursor, row.epoch, row.updated_at, row.events_total, row.lease_owner, row.lease_until
        )

    # ------------------------------------------------------------------ relay
    def claim_pending(self, owner: str, limit: int, claim_seconds: float) -> list[OutboxRow]:
        """Reserve up to ``limit`` publishable rows for ``owner``, oldest first.

        Rows claimed by another relay whose claim has not expired are skipped
        (``FOR UPDATE SKIP LOCKED`` where the database has it), so relays can run side by side.
        """
        now = self._clock()
        with _guard('claim_pending'), self.engine.begin() as conn:
            if self._pg:
                # The oldest pending rows come from the (status, seq) index in order, stopping at
                # ``limit``. With statistics that say pending rows are rare (a new table before its
                # first ANALYZE, or a backlog built up since the last one) PostgreSQL prefers a
                # bitmap scan of *every* pending row and a sort of them all -- spilled to disk
                # with the envelopes -- on every claim: about 14 ms instead of 1 ms per 1,000 rows
                # at 12,000 pending, growing with the backlog exactly when the relay must catch up.
                conn.exec_driver_sql("SET LOCAL enable_sort = off")
            rows = conn.execute(self._q_claim, {"now": now, "lim": limit}).all()
            if not rows:
                return []
            until = now + timedelta(seconds=claim_seconds)
            for chunk in _chunks([r.seq for r in rows], 1000):
                conn.execute(self._q_set_claim, {"seqs": list(chunk), "owner": owner, "until": until})
        return [OutboxRow(r.seq, r.id, r.type, r.envelope, r.attempts) for r in rows]

    def mark_published(self, seqs: Sequence[int]) -> None:
        """Mark rows published (call only after the broker's ack)."""
        if not seqs:
            return
        now = self._clock()
        with _guard('mark_published'), self.engine.begin() as conn:
            for chunk in _chunks(list(seqs), 1000):
                conn.execute(self._q_published, {"seqs": list(chunk), "now": now})

    def mark_failed(self, failures: dict[int, str], delay_for: Callable[[int], float]) -> None:
        """Record a failed publish: ``attempts + 1``, release the claim, schedule the next attempt.

        Args:
            failures: row ``seq`` -> reason.
            delay_for: seconds to wait before the next attempt, given the attempt count so far.
        """
        if not failures:
            return
        now = self._clock()
        with _guard('mark_failed'), self.engine.begin() as conn:
            current = dict(
                conn.execute(select(events.c.seq, events.c.attempts).where(events.c.seq.in_(list(failures)))).all()
            )
            for seq, reason in failures.items():
                attempts = current.get(seq, 0) + 1
                conn.execute(
                    update(events)
                    .where(and_(events.c.seq == seq, events.c.status == EVENT_PENDING))
                    .values(
                        attempts=attempts,
                        last_error=reason[:2000],
                        claimed_by=None,
                        claimed_until=None,
                        next_attempt_at=now + timedelta(seconds=delay_for(attempts)),
                    )
                )

    def release(self, seqs: Sequence[int]) -> None:
        """Give claimed rows back without counting an attempt (graceful stop)."""
        if not seqs:
            return
        with _guard('release'), self.engine.begin() as conn:
            for chunk in _chunks(list(seqs), 1000):
                conn.execute(
                    update(events)
                    .where(and_(events.c.seq.in_(chunk), events.c.status == EVENT_PENDING))
                    .values(claimed_by=None, claimed_until=None)
                )

    def pending_stats(self) -> tuple[int, datetime | None]:
        """Number of pending outbox rows and the oldest one's acceptance time."""
        with _guard('pending_stats'), self.engine.connect() as conn:
            row = conn.execute(
                select(func.count(), func.min(events.c.accepted_at)).where(events.c.status == EVENT_PENDING)
            ).one()
        oldest = row[1]
        if isinstance(oldest, datetime) and oldest.tzinfo is None:
            from datetime import timezone

            oldest = oldest.replace(tzinfo=timezone.utc)
        return int(row[0]), oldest

    # ------------------------------------------------------------------ scores
    def save_scores(self, records: Sequence[ScoreRecord]) -> int:
        """Store scores idempotently on (event, model, version); returns how many were new."""
        if not records:
            return 0
        unique = {(r.event_id, r.model_name, r.model_version): r for r in records}
        rows = [
            {
                "event_id": r.event_id,
                "model_name": r.model_name,
                "model_version": r.model_version,
                "score": r.score,
                "explanation": r.explanation,
                "event_type": r.event_type,
                "source_name": r.source_name,
                "event_time": r.event_time,
                "scored_at": r.scored_at,
            }
            for r in unique.values()
        ]
        try:
            with self.engine.begin() as conn:
                if self._pg:
                    keys = ["event_id", "model_name", "model_version"]
                    # The worker looks committed scores up before scoring, so a conflict here is
                    # rare (a duplicate scored by another worker at the same time): COPY straight
                    # into the table first, the staging path only after an integrity error.
                    return len(self._copy_insert(conn, scores, rows, keys, "event_id", direct_first=True))
                # One look-up per model version (the worker writes one per batch).
                for name, version in {k[1:] for k in unique}:
                    existing = self._existing(
                        conn, scores.c.event_id,
                        [k[0] for k in unique if k[1:] == (name, version)],
                        scores.c.model_name == name, scores.c.model_version == version,
                    )
                    rows = [
                        r for r in rows
                        if (r["model_name"], r["model_version"]) != (name, version) or r["event_id"] not in existing
                    ]
                if rows:
                    conn.execute(_insert_ignore(conn, scores, ["event_id", "model_name", "model_version"]), rows)
                return len(rows)
        except (DBAPIError, SQLAlchemyError) as exc:
            raise StoreUnavailableError(f"score transaction failed: {type(exc).__name__}") from exc

    def get_scores(self, event_ids: Sequence[str], model_name: str, model_version: str) -> dict[str, ScoreRecord]:
        """Committed scores of one model version for ``event_ids`` (missing ids are absent)."""
        if not event_ids:
            return {}
        out: dict[str, ScoreRecord] = {}
        with _guard("get_scores"), self.engine.connect() as conn:
            for chunk in _chunks(list(event_ids), 1000):
                params = {"ids": list(chunk), "model": model_name, "version": model_version}
                for r in conn.execute(self._q_scores, params).all():
                    out[r.event_id] = ScoreRecord(
                        r.event_id, r.model_name, r.model_version, float(r.score), r.explanation,
                        r.event_type, r.source_name, r.event_time, r.scored_at,
                    )
        return out

    def count_scores(self) -> int:
        """Total stored scores (all models)."""
        with _guard('count_scores'), self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(scores)).scalar_one())

    # ------------------------------------------------------------------ queries
    def get_event(self, event_id: str) -> StoredEvent | None:
        """One event with its delivery state and scores, or ``None``."""
        with _guard('get_event'), self.engine.connect() as conn:
            row = conn.execute(select(events).where(events.c.id == event_id)).first()
            if row is None:
                return None
            sc = conn.execute(select(scores).where(scores.c.event_id == event_id)).all()
        return self._stored(row, {event_id: [self._score_dict(s) for s in sc]})

    def list_events(self, flt: EventFilter, *, limit: int, after_seq: int | None = None) -> list[StoredEvent]:
        """Events matching ``flt`` in acceptance order, after ``after_seq`` (cursor pagination)."""
        cond = []
        if after_seq is not None:
            cond.append(events.c.seq > after_seq)
        if flt.source_name:
            cond.append(events.c.source_name == flt.source_name)
        if flt.type:
            cond.append(events.c.type == flt.type)
        if flt.time_from:
            cond.append(events.c.time >= flt.time_from)
        if flt.time_to:
            cond.append(events.c.time < flt.time_to)
        if flt.status:
            cond.append(events.c.status == flt.status)
        if flt.subject:
            cond.append(events.c.subject == flt.subject)
        if flt.sources is not None:
            cond.append(events.c.source_name.in_(list(flt.sources)) if flt.sources else false())
        score_cond = [
            c for c in (
                scores.c.score >= flt.min_score if flt.min_score is not None else None,
                scores.c.score <= flt.max_score if flt.max_score is not None else None,
                scores.c.model_name == flt.model if flt.model else None,
            ) if c is not None
        ]
        if score_cond:
            cond.append(events.c.id.in_(select(scores.c.event_id).where(and_(*score_cond))))
        query = select(events).where(and_(true(), *cond)).order_by(events.c.seq).limit(limit)
        with _guard('list_events'), self.engine.connect() as conn:
            rows = conn.execute(query).all()
            ids = [r.id for r in rows]
            by_event: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
            if ids:
                for s in conn.execute(select(scores).where(scores.c.event_id.in_(ids))).all():
                    by_event[s.event_id].append(self._score_dict(s))
        return [self._stored(r, by_event) for r in rows]

    def top_scored(self, limit: int) -> list[tuple[float, dict[str, Any]]]:
        """The highest scores with their events, highest first."""
        query = (
            select(scores.c.score, events.c.envelope)
            .join(events, events.c.id == scores.c.event_id)
            .order_by(scores.c.score.desc())
            .limit(limit)
        )
        with _guard('top_scored'), self.engine.connect() as conn:
            return [(float(s), loads(env)) for s, env in conn.execute(query).all()]

    @staticmethod
    def _score_dict(s: Any) -> dict[str, Any]:
        return {
            "score": s.score,
            "model": {"name": s.model_name, "version": s.model_version},
            "explanation": s.explanation,
            "scored_at": s.scored_at,
        }

    @staticmethod
    def _stored(row: Any, by_event: dict[str, list[dict[str, Any]]]) -> StoredEvent:
        return StoredEvent(
            seq=row.seq,
            event=loads(row.envelope),
            source_name=row.source_name,
            status=row.status,
            attempts=row.attempts,
            accepted_at=row.accepted_at,
            published_at=row.published_at,
            scores=by_event.get(row.id, []),
        )

    # ------------------------------------------------------------------ dead letters
    def add_dead_letter(
        self,
        *,
        stage: str,
        error_class: str,
        reason: str,
        payload: str | None,
        event_id: str | None = None,
        source_name: str | None = None,
        headers: dict[str, Any] | None = None,
        attempts: int = 1,
    ) -> int:
        """Park a message or record; returns the dead letter's id."""
        row = self._dead_row(
            self._clock(), stage=stage, error_class=error_class, reason=reason, payload=payload,
            event_id=event_id, source_name=source_name, headers=headers, attempts=attempts,
        )
        with _guard('add_dead_letter'), self.engine.begin() as conn:
            res = conn.execute(dead_letters.insert().values(**row))
            return int(res.inserted_primary_key[0])

    def add_dead_letter_once(
        self,
        *,
        stage: str,
        error_class: str,
        reason: str,
        payload: str | None,
        source_name: str | None = None,
        same: Callable[[str | None, str | None], bool] | None = None,
        event_id: str | None = None,
        headers: dict[str, Any] | None = None,
        attempts: int = 1,
        dedupe_key: str | None = None,
        open_stages: Sequence[str] = (),
    ) -> tuple[int, bool]:
        """Park an item unless an equal dead letter exists; for errors that repeat on every attempt
        and for messages that may be delivered more than once.

        Everything happens in the same transaction as the insert. What counts as "equal":

        * ``open_stages`` (with ``event_id``): an open (not replayed) dead letter of one of these
          stages for the same event -- e.g. the scorer's row for a message it also rejected to
          the broker's dead-letter queue;
        * ``dedupe_key``: a dead letter with the same key (unique in the table, so a concurrent
          insert of the same key is harmless); the stage/reason look-up below is then skipped;
        * otherwise a row with the same ``stage``, ``source_name``, ``error_class`` and ``reason``
          whose payload is ``same`` as ``payload`` (default: equal text).

        Args:
            stage: ``source`` | ``scoring`` | ``bridge`` | ``broker`` | ``relay`` | ``ingest``.
            error_class: the error's class name (for the broker: the ``x-death`` reason).
            reason: the error message (truncated like :meth:`add_dead_letter` does).
            payload: the item, JSON text.
            source_name: the source, if any.
            same: ``same(existing_payload, payload)``; compare only the fields that identify the
                item (for example the cursor), not volatile ones.
            event_id: the event's id, if known.
            headers: message headers worth keeping.
            attempts: deliveries or reads so far.
            dedupe_key: the item's identity (at most 64 characters, e.g. a SHA-256 hex digest).
            open_stages: stages whose open dead letter for ``event_id`` makes this one redundant.

        Returns:
            The dead letter's id and whether it was created now (``False``: it existed already).
        """
        row = self._dead_row(
            self._clock(), stage=stage, error_class=error_class, reason=reason, payload=payload,
            source_name=source_name, event_id=event_id, headers=headers, attempts=attempts, dedupe_key=dedupe_key,
        )
        dl = dead_letters.c
        with _guard("add_dead_letter_once"), self.engine.begin() as conn:
            if open_stages and event_id is not None:
                found = conn.execute(
                    select(dl.id)
                    .where(dl.event_id == event_id, dl.stage.in_(list(open_stages)), dl.replayed_at.is_(None))
                    .order_by(dl.id)
                    .limit(1)
                ).scalar()
                if found is not None:
                    return int(found), False
            if dedupe_key is not None:
                by_key = select(dl.id).where(dl.dedupe_key == dedupe_key)
                found = conn.execute(by_key).scalar()
                if found is not None:
                    return int(found), False
                res = conn.execute(_insert_ignore(conn, dead_letters, ["dedupe_key"]).values(**row))
                if not res.rowcount:  # a concurrent writer stored the same key first
                    return int(conn.execute(by_key).scalar_one()), False
                return int(conn.execute(by_key).scalar_one()), True
            match = same or (lambda old, new: old == new)
            query = (
                select(dl.id, dl.payload)
                .where(
                    dl.stage == stage,
                    dl.source_name.is_(None) if source_name is None else dl.source_name == source_name,
                    dl.error_class == error_class,
                    dl.reason == row["reason"],
                )
                .order_by(dl.id.desc())
            )
            for existing_id, existing_payload in conn.execute(query).all():
                if match(existing_payload, payload):
                    return int(existing_id), False
            res = conn.execute(dead_letters.insert().values(**row))
            return int(res.inserted_primary_key[0]), True

    @staticmethod
    def _dead_row(now: datetime, **fields: Any) -> dict[str, Any]:
        """A ``dead_letters`` row from :meth:`add_dead_letter`'s keyword arguments."""
        row: dict[str, Any] = {"event_id": None, "source_name": None, "headers": None, "attempts": 1, **fields}
        row["reason"] = row["reason"][:10000]
        row["created_at"] = now
        return row

    @staticmethod
    def _dead_conditions(
        *, stage: str | None, source_name: str | None, error_class: str | None, state: str | None
    ) -> list[Any]:
        dl = dead_letters.c
        cond: list[Any] = []
        if stage:
            cond.append(dl.stage == stage)
        if source_name:
            cond.append(dl.source_name == source_name)
        if error_class:
            cond.append(dl.error_class == error_class)
        if state == DEAD_OPEN:
            cond.append(dl.replayed_at.is_(None))
        elif state == DEAD_REPLAYED:
            cond.append(dl.replayed_at.is_not(None))
        elif state not in (None, "all"):
            raise ValueError(f"state: expected one of {', '.join(DEAD_STATES)}; got {state!r}")
        return cond

    def list_dead_letters(
        self,
        *,
        stage: str | None = None,
        limit: int = 100,
        after_id: int | None = None,
        source_name: str | None = None,
        error_class: str | None = None,
        state: str | None = None,
    ) -> list[DeadLetter]:
        """Dead letters, oldest first, filtered by stage, source, error class and state (all optional).

        ``state`` is ``open`` (not replayed), ``replayed`` or ``all``/``None``.
        """
        cond = self._dead_conditions(stage=stage, source_name=source_name, error_class=error_class, state=state)
        if after_id is not None:
            cond.append(dead_letters.c.id > after_id)
        with _guard('list_dead_letters'), self.engine.connect() as conn:
            rows = conn.execute(select(dead_letters).where(and_(true(), *cond)).order_by(dead_letters.c.id).limit(limit)).all()
        return [DeadLetter(**r._mapping) for r in rows]

    def count_dead_letters(
        self,
        *,
        stage: str | None = None,
        source_name: str | None = None,
        error_class: str | None = None,
        state: str | None = None,
    ) -> int:
        """How many dead letters match the filters of :meth:`list_dead_letters`."""
        cond = self._dead_conditions(stage=stage, source_name=source_name, error_class=error_class, state=state)
        with _guard("count_dead_letters"), self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(dead_letters).where(and_(true(), *cond))).scalar_one())

    def get_dead_letter(self, dead_letter_id: int) -> DeadLetter | None:
        """One dead letter by id, or ``None``."""
        with _guard('get_dead_letter'), self.engine.connect() as conn:
            row = conn.execute(select(dead_letters).where(dead_letters.c.id == dead_letter_id)).first()
        return DeadLetter(**row._mapping) if row is not None else None

    def get_dead_letters(self, ids: Sequence[int]) -> list[DeadLetter]:
        """The dead letters with these ids that exist, in id order."""
        out: list[DeadLetter] = []
        with _guard("get_dead_letters"), self.engine.connect() as conn:
            for chunk in _chunks(sorted(set(ids)), 1000):
                query = select(dead_letters).where(dead_letters.c.id.in_(list(chunk))).order_by(dead_letters.c.id)
                out.extend(DeadLetter(**r._mapping) for r in conn.execute(query).all())
        return out

    def existing_event_ids(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` are in the outbox (``events``)."""
        if not ids:
            return set()
        with _guard("existing_event_ids"), self.engine.connect() as conn:
            return self._existing(conn, events.c.id, list(dict.fromkeys(ids)))

    def replay_dead_letter(
        self,
        dead_letter_id: int,
        *,
        event_ids: Sequence[str] = (),
        events_in: Sequence[Event] = (),
        source_name: str | None = None,
        again: bool = False,
    ) -> ReplayWrite | None:
        """Replay one dead letter through the outbox, in ONE transaction.

        Each event (``event_ids`` already in the outbox, and ``events_in``) goes through the outbox
        again: a row that exists is set back to pending (attempts 0, due now, claims cleared) so
        the relay publishes it again; a new event is inserted like :meth:`accept` does (idempotent
        on its deterministic id). In the same transaction the dead letter is marked replayed
        (``replayed_at``, ``replay_count + 1``, outcome and event ids; ``event_id`` when it had
        none) -- unless it was replayed meanwhile and ``again`` is false: then nothing is written.

        Args:
            dead_letter_id: the dead letter.
            event_ids: ids of events to publish again from the outbox.
            events_in: events to accept (or publish again, if their id is stored already).
            source_name: outbox ``source_name`` of new events (default: the event's lineage).
            again: replay even if the dead letter is marked replayed.

        Returns:
            What was written, or ``None`` when the dead letter is replayed already (or gone).
        """
        now = self._clock()
        rows = _outbox_rows(events_in, source_name, now)
        wanted = list(dict.fromkeys([*event_ids, *rows]))
        if not wanted:
            raise ValueError("replay_dead_letter needs event_ids or events_in")
        dl = dead_letters.c
        try:
            with self.engine.begin() as conn:
                present = self._existing(conn, events.c.id, wanted)
                missing = [i for i in event_ids if i not in present and i not in rows]
                if missing:
                    raise ValueError(f"event(s) {missing} are not in the outbox")
                fresh = [rows[i] for i in rows if i not in present]
                accepted = self._insert_events(conn, fresh) if fresh else []
                requeued = [i for i in wanted if i not in set(accepted)]
                for chunk in _chunks(requeued, 1000):
                    conn.execute(
                        update(events)
                        .where(events.c.id.in_(list(chunk)))
                        .values(status=EVENT_PENDING, attempts=0, next_attempt_at=now, claimed_by=None,
                                claimed_until=None, last_error=None, published_at=None)
                    )
                mark = update(dead_letters).where(dl.id == dead_letter_id)
                if not again:
                    mark = mark.where(dl.replayed_at.is_(None))
                detail = ("accepted " if accepted else "requeued ") + ", ".join(wanted)
                res = conn.execute(mark.values(
                    replayed_at=now, replay_count=dl.replay_count + 1, last_replay_at=now,
                    last_replay_outcome="accepted" if accepted else "requeued", last_replay_detail=detail[:10000],
                    event_id=func.coalesce(dl.event_id, wanted[0]),
                ))
                if res.rowcount != 1:
                    raise _AlreadyReplayed
        except _AlreadyReplayed:
            return None
        except (DBAPIError, SQLAlchemyError) as exc:
            orig = exc.orig if isinstance(exc, DBAPIError) else exc
            raise StoreUnavailableError(f"replay transaction failed: {type(orig).__name__}") from exc
        return ReplayWrite(requeued=requeued, accepted=accepted)

    def record_replay_failure(
        self,
        dead_letter_id: int,
        detail: str,
        *,
        error_class: str | None = None,
        reason: str | None = None,
    ) -> bool:
        """Record a failed replay attempt: ``replay_count + 1``, outcome ``failed`` and ``detail``.

        With ``error_class``/``reason`` the item failed again for a new reason (a source record
        that the current mapping still rejects): the dead letter takes the new error and
        ``attempts + 1`` -- it stays one row, open.

        Returns:
            Whether the dead letter exists.
        """
        now = self._clock()
        dl = dead_letters.c
        values: dict[str, Any] = {
            "replay_count": dl.replay_count + 1, "last_replay_at": now, "last_replay_outcome": "failed",
            "last_replay_detail": detail[:10000],
        }
        if error_class is not None:
            values.update(error_class=error_class[:255], reason=(reason or error_class)[:10000], attempts=dl.attempts + 1)
        with _guard("record_replay_failure"), self.engine.begin() as conn:
            return bool(conn.execute(update(dead_letters).where(dl.id == dead_letter_id).values(**values)).rowcount)

    def delete_dead_letters(self, ids: Sequence[int]) -> int:
        """Delete dead letters by id; returns how many existed."""
        if not ids:
            return 0
        n = 0
        with _guard('delete_dead_letters'), self.engine.begin() as conn:
            for chunk in _chunks(list(ids), 1000):
                n += int(conn.execute(delete(dead_letters).where(dead_letters.c.id.in_(list(chunk)))).rowcount or 0)
        return n

    def stats(self) -> dict[str, int]:
        """Counts for progress displays: events by status, scores, dead letters."""
        with _guard('stats'), self.engine.connect() as conn:
            by_status = dict(conn.execute(select(events.c.status, func.count()).group_by(events.c.status)).all())
            n_scores = conn.execute(select(func.count()).select_from(scores)).scalar_one()
            n_dead = conn.execute(select(func.count()).select_from(dead_letters)).scalar_one()
        return {
            "events": int(sum(by_status.values())),
            "pending": int(by_status.get(EVENT_PENDING, 0)),
            "published": int(by_status.get(EVENT_PUBLISHED, 0)),
            "scores": int(n_scores),
            "dead_letters": int(n_dead),
        }

    def ping(self) -> None:
        """Raise StoreUnavailableError unless the store answers."""
        try:
            with self.engine.connect() as conn:
                conn.execute(select(1))
        except (DBAPIError, SQLAlchemyError) as exc:
            raise StoreUnavailableError(f"store unreachable: {type(exc).__name__}") from exc
