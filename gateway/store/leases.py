"""Source leases: one active runner per source across replicas, fenced by the cursor's epoch.

The lease lives on the source's ``source_cursors`` row: ``lease_owner`` (the runner's
``hostname:pid:runner-id``), ``lease_until`` (UTC) and the fencing ``epoch``. Each method decides in
one transaction by a single conditional ``UPDATE``, so two replicas racing for a lease are
serialised by the row lock (PostgreSQL and MariaDB re-check the ``WHERE`` against the row a
concurrent transaction committed; SQLite takes the write lock at ``BEGIN``) -- there is no
read-modify-write window.

* Taking the lease over (it was free, released or expired) bumps the epoch. Every cursor write
  (:meth:`~gateway.store.EventStore.accept`) is conditional on the writer's epoch, so a runner
  that was taken over while it was stuck writes 0 rows and gets :class:`~gateway.errors.FencingError`.
* An operator's :meth:`~gateway.store.EventStore.set_cursor` bumps the epoch too, without taking
  the lease: the holder's next renewal or cursor write fails, and it re-acquires its own lease
  (same owner: no second bump) and reloads the operator's cursor.

Times come from the store's clock (the gateway process's UTC clock, injectable), not the
database's: the clocks of replicas must agree to well under the lease TTL.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import Engine, and_, case, or_, select, update

from gateway.store._sql import guard, insert_ignore
from gateway.store.schema import source_cursors

__all__ = ["LeaseRepository"]


class LeaseRepository:
    """Lease methods of :class:`~gateway.store.EventStore` (mixed in; one transaction each, but a
    source's first acquisition, which creates its row first)."""

    engine: Engine
    _clock: Callable[[], datetime]

    def try_acquire_lease(self, source_name: str, owner: str, ttl: float) -> int | None:
        """Take ``source_name``'s lease for ``ttl`` seconds if it is free, expired or ours already.

        The epoch is bumped when the ownership changes (including after a release), never when
        ``owner`` extends its own lease.

        Args:
            source_name: the source.
            owner: the runner's unique identity (``hostname:pid:runner-id``).
            ttl: seconds the lease lasts unless renewed.

        Returns:
            The epoch now held (write the cursor with it), or ``None`` when another owner holds a
            lease that has not expired.

        Raises:
            StoreUnavailableError: the transaction did not commit.
        """
        now = self._clock()
        c = source_cursors.c
        takeable = or_(c.lease_owner.is_(None), c.lease_owner == owner, c.lease_until.is_(None), c.lease_until < now)
        # MySQL/MariaDB evaluate SET assignments left to right, each seeing the ones before it:
        # the epoch must be computed while lease_owner still holds the previous owner.
        stmt = (
            update(source_cursors)
            .where(c.source_name == source_name, takeable)
            .ordered_values(
                (c.epoch, case((c.lease_owner == owner, c.epoch), else_=c.epoch + 1)),
                (c.lease_owner, owner),
                (c.lease_until, now + timedelta(seconds=ttl)),
            )
        )
        for _ in range(2):
            with guard("try_acquire_lease"), self.engine.begin() as conn:
                if conn.execute(stmt).rowcount == 1:
                    return int(conn.execute(select(c.epoch).where(c.source_name == source_name)).scalar_one())
                if conn.execute(select(c.epoch).where(c.source_name == source_name)).first() is not None:
                    return None  # held by another owner
            # The source never ran: create its row, then decide by the UPDATE above. In a
            # transaction of its own: MariaDB's INSERT IGNORE takes a shared lock on a duplicate
            # key, and concurrent acquirers upgrading it for the UPDATE would deadlock.
            with guard("try_acquire_lease"), self.engine.begin() as conn:
                conn.execute(
                    insert_ignore(conn, source_cursors, ["source_name"]),
                    {"source_name": source_name, "cursor": None, "epoch": 0, "updated_at": now, "events_total": 0},
                )
        return None

    def renew_lease(self, source_name: str, owner: str, epoch: int, ttl: float) -> bool:
        """Extend the lease ``owner`` holds with ``epoch`` to ``ttl`` seconds from now.

        Succeeds even after ``lease_until`` passed, as long as nobody took the lease meanwhile
        (taking it changes the owner and the epoch).

        Args:
            source_name: the source.
            owner: the runner's identity.
            epoch: the epoch it holds.
            ttl: seconds from now.

        Returns:
            ``False`` when the lease is lost: another runner took it, it was released, or an
            operator moved the cursor (a new epoch). Stop polling; re-acquire to go on.

        Raises:
            StoreUnavailableError: the transaction did not commit.
        """
        now = self._clock()
        c = source_cursors.c
        with guard("renew_lease"), self.engine.begin() as conn:
            res = conn.execute(
                update(source_cursors)
                .where(c.source_name == source_name, c.lease_owner == owner, c.epoch == epoch)
                .values(lease_until=now + timedelta(seconds=ttl))
            )
            return res.rowcount == 1

    def release_lease(self, source_name: str, owner: str, epoch: int) -> bool:
        """Give the lease back (graceful stop), so a standby runner takes over at its next try.

        Args:
            source_name: the source.
            owner: the runner's identity.
            epoch: the epoch it holds.

        Returns:
            Whether it was still held (``False``: lost already; nothing changed).

        Raises:
            StoreUnavailableError: the transaction did not commit.
        """
        c = source_cursors.c
        with guard("release_lease"), self.engine.begin() as conn:
            res = conn.execute(
                update(source_cursors)
                .where(and_(c.source_name == source_name, c.lease_owner == owner, c.epoch == epoch))
                .values(lease_owner=None, lease_until=None)
            )
            return res.rowcount == 1
