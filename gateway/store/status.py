"""Persisted source status: what each runner reports, what operators want, the drift baseline.

One ``source_status`` row per source, written by three parties that never overwrite each other:

* the source's runner (:meth:`SourceStatusRepository.save_source_status`): state, counters,
  breaker snapshot, last error, current drift -- refused when a runner with a newer fencing epoch
  has reported since, so a runner that was taken over cannot clobber its successor's status;
* operators (:meth:`~SourceStatusRepository.set_source_desired_state`): ``desired_state`` and a
  ``desired_generation`` that every command bumps, so a failed runner can tell a fresh "resume"
  from the default ``running``;
* the drift baseline (:meth:`~SourceStatusRepository.set_fingerprint_baseline`).

Operators' "run now" wishes live in ``source_run_requests``
(:meth:`~SourceStatusRepository.request_source_run`, :meth:`~SourceStatusRepository.get_run_request`):
the runner polls at once when it reads a ``requested_at`` it has not seen before.

Besides, every runner of a source -- the lease holder and the standby replicas -- keeps a
heartbeat row in ``source_runners`` (:meth:`~SourceStatusRepository.save_runner`), so operators
see the standbys too.

Other processes (``gateway sources list``, an API-only process's ``/readyz``) read the rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, delete, or_, select, update

from gateway.events.jsonsafe import jsonable
from gateway.store._sql import guard, insert_ignore
from gateway.store.schema import (
    DESIRED_PAUSED,
    DESIRED_RUNNING,
    source_run_requests,
    source_runners,
    source_status,
)

__all__ = ["LAST_ERROR_MAX", "RUNNER_ROW_MAX_AGE", "SourceStatusRepository", "StoredRunner", "StoredSourceStatus"]

#: Longest ``last_error`` kept (characters); the full text is in the logs and dead letters.
LAST_ERROR_MAX = 2000

#: ``source_runners`` rows not refreshed for this long (crashed runners) are deleted by the next
#: heartbeat of any runner of the same source.
RUNNER_ROW_MAX_AGE = timedelta(hours=1)

#: ``state`` of a row that an operator command created before any runner reported.
_UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class StoredSourceStatus:
    """One source's persisted status.

    Attributes:
        source_name: the source.
        state: the runner's last reported state (``unknown`` before any runner reported).
        owner: ``hostname:pid:runner-id`` of the runner that reported.
        epoch: that runner's fencing epoch.
        last_poll_at: end of its last successful poll.
        last_error: its last error (truncated to :data:`LAST_ERROR_MAX`), ``None`` once polling
            succeeds again.
        polls: successful polls since that runner started; likewise ``events_accepted``,
            ``duplicates`` and ``rejected``.
        breaker: the source's circuit breaker snapshot as of ``updated_at``.
        fingerprint: the drift baseline's digest, ``None`` until one is stored.
        fingerprint_parts: the baseline's part name -> digest.
        fingerprint_at: when the baseline was stored.
        drift: the current drift against the baseline (``baseline``, ``current``,
            ``current_parts``, ``changed``, ``detected_at``), or ``None``.
        desired_state: ``running`` or ``paused`` (operator commands).
        desired_generation: bumped by every operator command.
        desired_at: time of the last operator command.
        updated_at: time of the runner's last status write (or the row's creation).
    """

    source_name: str
    state: str
    owner: str | None
    epoch: int | None
    last_poll_at: datetime | None
    last_error: str | None
    polls: int
    events_accepted: int
    duplicates: int
    rejected: int
    breaker: dict[str, Any] | None
    fingerprint: str | None
    fingerprint_parts: dict[str, str] | None
    fingerprint_at: datetime | None
    drift: dict[str, Any] | None
    desired_state: str
    desired_generation: int
    desired_at: datetime | None
    updated_at: datetime

    @property
    def drift_detected(self) -> bool:
        """Whether the source's current fingerprint differs from the baseline."""
        return bool(self.drift)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of every field (datetimes as ISO-8601 UTC)."""
        out: dict[str, Any] = jsonable(asdict(self))
        return out


@dataclass(frozen=True, slots=True)
class StoredRunner:
    """One source runner's heartbeat.

    Attributes:
        source_name: the source.
        owner: the runner's ``hostname:pid:runner-id``.
        state: its state (``standby`` while another runner holds the lease).
        epoch: the fencing epoch it holds, ``None`` while standby.
        updated_at: its last heartbeat.
    """

    source_name: str
    owner: str
    state: str
    epoch: int | None
    updated_at: datetime


class SourceStatusRepository:
    """Source status methods of :class:`~gateway.store.EventStore` (mixed in; one transaction each)."""

    engine: Engine
    _clock: Callable[[], datetime]

    def save_source_status(
        self,
        source_name: str,
        *,
        state: str,
        owner: str | None = None,
        epoch: int | None = None,
        last_poll_at: datetime | None = None,
        last_error: str | None = None,
        polls: int = 0,
        events_accepted: int = 0,
        duplicates: int = 0,
        rejected: int = 0,
        breaker: Mapping[str, Any] | None = None,
        drift: Mapping[str, Any] | None = None,
    ) -> bool:
        """Insert or update a runner's status; never touches ``desired_*`` or ``fingerprint*``.

        Args:
            source_name: the source.
            state: the runner's state.
            owner: the runner's identity (``hostname:pid:runner-id``).
            epoch: the runner's fencing epoch; the write is refused when the stored row was
                written by a runner with a newer epoch (``None`` writes only rows without one).
            last_poll_at: end of the last successful poll.
            last_error: the last error, truncated to :data:`LAST_ERROR_MAX` characters.
            polls: counters since the runner started (also ``events_accepted``, ``duplicates``,
                ``rejected``).
            events_accepted: events newly stored.
            duplicates: events that were stored already.
            rejected: records dead-lettered by the mapping.
            breaker: the circuit breaker snapshot.
            drift: the current drift, or ``None``.

        Returns:
            ``False`` when the write was refused because a newer runner owns the row.

        Raises:
            StoreUnavailableError: the transaction did not commit.
        """
        values: dict[str, Any] = {
            "state": state,
            "owner": owner,
            "epoch": epoch,
            "last_poll_at": last_poll_at,
            "last_error": last_error[:LAST_ERROR_MAX] if last_error is not None else None,
            "polls": polls,
            "events_accepted": events_accepted,
            "duplicates": duplicates,
            "rejected": rejected,
            "breaker": jsonable(dict(breaker)) if breaker is not None else None,
            "drift": jsonable(dict(drift)) if drift is not None else None,
            "updated_at": self._clock(),
        }
        c = source_status.c
        mine = c.epoch.is_(None) if epoch is None else or_(c.epoch.is_(None), c.epoch <= epoch)
        with guard("save_source_status"), self.engine.begin() as conn:
            res = conn.execute(update(source_status).where(c.source_name == source_name, mine).values(**values))
            if res.rowcount:
                return True
            if conn.execute(select(c.epoch).where(c.source_name == source_name)).first() is not None:
                return False  # a newer runner reported since
            # Absent: insert. A concurrent insert (an operator command) wins; then update again.
            ins = conn.execute(insert_ignore(conn, source_status, ["source_name"]), {**self._defaults(source_name), **values})
            if not ins.rowcount:
                res = conn.execute(update(source_status).where(c.source_name == source_name, mine).values(**values))
                return bool(res.rowcount)
            return True

    def get_source_status(self, source_name: str) -> StoredSourceStatus | None:
        """The persisted status of ``source_name``, or ``None`` if nothing was ever recorded."""
        with guard("get_source_status"), self.engine.connect() as conn:
            row = conn.execute(select(source_status).where(source_status.c.source_name == source_name)).first()
        return self._status(row) if row is not None else None

    def list_source_status(self) -> list[StoredSourceStatus]:
        """Every persisted source status, by source name."""
        with guard("list_source_status"), self.engine.connect() as conn:
            rows = conn.execute(select(source_status).order_by(source_status.c.source_name)).all()
        return [self._status(r) for r in rows]

    def set_source_desired_state(self, source_name: str, state: str) -> StoredSourceStatus:
        """Record an operator's wish (``running`` or ``paused``) and bump ``desired_generation``.

        A running runner observes it within its status interval. Setting ``running`` on a source
        that stopped after a permanent failure or schema drift resumes it (the bumped generation
        tells the runner this is a new command, not the default).

        Args:
            source_name: the source.
            state: ``"running"`` or ``"paused"``.

        Returns:
            The status row after the change.

        Raises:
            ValueError: ``state`` is neither.
            StoreUnavailableError: the transaction did not commit.
        """
        if state not in (DESIRED_RUNNING, DESIRED_PAUSED):
            raise ValueError(f"desired state must be {DESIRED_RUNNING!r} or {DESIRED_PAUSED!r}, not {state!r}")
        values = {
            "desired_state": state,
            "desired_generation": source_status.c.desired_generation + 1,
            "desired_at": self._clock(),
        }
        with guard("set_source_desired_state"), self.engine.begin() as conn:
            self._upsert_control(conn, source_name, values, {**values, "desired_generation": 1})
            row = conn.execute(select(source_status).where(source_status.c.source_name == source_name)).one()
        return self._status(row)

    # ------------------------------------------------------------------ run now
    def request_source_run(self, source_name: str, requested_by: str | None = None) -> datetime:
        """Record an operator's "run now" wish for ``source_name`` (replacing an earlier one).

        The source's runner reads it with the other operator wishes (within its
        ``status_interval``) and, when the time is new to it, polls at once.

        Args:
            source_name: the source.
            requested_by: who asked (API key name, ``cli:<os user>``).

        Returns:
            The request's time (the store's clock).

        Raises:
            StoreUnavailableError: the transaction did not commit.
        """
        now = self._clock()
        c = source_run_requests.c
        values = {"requested_at": now, "requested_by": requested_by}
        with guard("request_source_run"), self.engine.begin() as conn:
            if not conn.execute(update(source_run_requests).where(c.source_name == source_name).values(**values)).rowcount:
                ins = conn.execute(insert_ignore(conn, source_run_requests, ["source_name"]), {"source_name": source_name, **values})
                if not ins.rowcount:  # a concurrent request inserted first
                    conn.execute(update(source_run_requests).where(c.source_name == source_name).values(**values))
        return now

    def get_run_request(self, source_name: str) -> datetime | None:
        """Time of the last "run now" wish for ``source_name``, or ``None`` when none was made."""
        c = source_run_requests.c
        with guard("get_run_request"), self.engine.connect() as conn:
            return conn.execute(select(c.requested_at).where(c.source_name == source_name)).scalar()  # type: ignore[no-any-return]

    def list_run_requests(self) -> dict[str, datetime]:
        """Source name -> time of its last "run now" wish."""
        c = source_run_requests.c
        with guard("list_run_requests"), self.engine.connect() as conn:
            return {r.source_name: r.requested_at for r in conn.execute(select(c.source_name, c.requested_at))}

    def set_fingerprint_baseline(self, source_name: str, digest: str, parts: Mapping[str, str]) -> None:
        """Make ``digest``/``parts`` the source's drift baseline and clear any recorded drift.

        Args:
            source_name: the source.
            digest: the fingerprint's digest.
            parts: part name -> digest of that part.

        Raises:
            StoreUnavailableError: the transaction did not commit.
        """
        values = {"fingerprint": digest, "fingerprint_parts": dict(parts), "fingerprint_at": self._clock(), "drift": None}
        with guard("set_fingerprint_baseline"), self.engine.begin() as conn:
            self._upsert_control(conn, source_name, values, values)

    # ------------------------------------------------------------------ runner heartbeats
    def save_runner(self, source_name: str, owner: str, *, state: str, epoch: int | None) -> None:
        """Insert or refresh one runner's heartbeat row; prune the source's rows of dead runners.

        Args:
            source_name: the source.
            owner: the runner's identity.
            state: its state.
            epoch: the epoch it holds, ``None`` while standby.

        Raises:
            StoreUnavailableError: the transaction did not commit.
        """
        now = self._clock()
        c = source_runners.c
        values = {"state": state, "epoch": epoch, "updated_at": now}
        mine = (c.source_name == source_name) & (c.owner == owner)
        with guard("save_runner"), self.engine.begin() as conn:
            if not conn.execute(update(source_runners).where(mine).values(**values)).rowcount:
                row = {"source_name": source_name, "owner": owner, **values}
                if not conn.execute(insert_ignore(conn, source_runners, ["source_name", "owner"]), row).rowcount:
                    conn.execute(update(source_runners).where(mine).values(**values))
            conn.execute(
                delete(source_runners).where(c.source_name == source_name, c.updated_at < now - RUNNER_ROW_MAX_AGE)
            )

    def remove_runner(self, source_name: str, owner: str) -> None:
        """Delete a runner's heartbeat row (it stopped).

        Raises:
            StoreUnavailableError: the transaction did not commit.
        """
        c = source_runners.c
        with guard("remove_runner"), self.engine.begin() as conn:
            conn.execute(delete(source_runners).where(c.source_name == source_name, c.owner == owner))

    def list_runners(self, source_name: str | None = None) -> list[StoredRunner]:
        """Runner heartbeats (of one source, or all), by source and owner.

        Rows of crashed runners remain until pruned; compare ``updated_at`` with the source's
        ``status_interval`` and ``lease_ttl`` to tell live runners.
        """
        c = source_runners.c
        query = select(source_runners).order_by(c.source_name, c.owner)
        if source_name is not None:
            query = query.where(c.source_name == source_name)
        with guard("list_runners"), self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [StoredRunner(r.source_name, r.owner, r.state, r.epoch, r.updated_at) for r in rows]

    # ------------------------------------------------------------------ internals
    def _defaults(self, source_name: str) -> dict[str, Any]:
        """A new row's values before anyone reported (insert needs every NOT NULL column)."""
        return {
            "source_name": source_name,
            "state": _UNKNOWN,
            "polls": 0,
            "events_accepted": 0,
            "duplicates": 0,
            "rejected": 0,
            "desired_state": DESIRED_RUNNING,
            "desired_generation": 0,
            "updated_at": self._clock(),
        }

    def _upsert_control(
        self, conn: Connection, source_name: str, update_values: dict[str, Any], insert_values: dict[str, Any]
    ) -> None:
        """Update operator/baseline columns, creating the row first if no runner reported yet.

        Portable on every dialect: UPDATE; if no row, INSERT ... ignoring a concurrent insert;
        if that insert was ignored, UPDATE again.
        """
        where = source_status.c.source_name == source_name
        if conn.execute(update(source_status).where(where).values(**update_values)).rowcount:
            return
        ins = conn.execute(
            insert_ignore(conn, source_status, ["source_name"]), {**self._defaults(source_name), **insert_values}
        )
        if not ins.rowcount:
            conn.execute(update(source_status).where(where).values(**update_values))

    @staticmethod
    def _status(row: Any) -> StoredSourceStatus:
        m = row._mapping
        return StoredSourceStatus(
            **{k: m[k] for k in StoredSourceStatus.__dataclass_fields__},
        )
