"""The delivery ledger (reliability.md §5.2): accepted == delivered ∪ dead, and nothing twice.

* **accepted** -- event ids in the outbox (``events``): what the gateway promised to deliver;
* **delivered** -- event ids with a row in ``scores`` (the sink);
* **dead** -- event ids parked as dead letters: ``dead_letters`` rows with an event id, plus the
  messages in the broker's ``<prefix>.dead`` queue (their ``message_id`` is the event id).

An event that is both delivered and dead is reported separately: a dead-lettered event must not
have been scored, and a scored one must not have been dead-lettered (the scorer acks a delivery
only after its score committed, and dead-letters only deliveries it could not score).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pika
from sqlalchemy import Engine, create_engine, func, select

from gateway.store.schema import EVENT_PENDING, dead_letters, events, scores

__all__ = ["Ledger", "LedgerReport", "broker_queue_message_ids"]


def broker_queue_message_ids(amqp_url: str, queue: str) -> list[str]:
    """``message_id`` of every ready message in ``queue``, left in the queue (got unacked, then requeued)."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        ch = conn.channel()
        ok = ch.queue_declare(queue, passive=True)
        ids: list[str] = []
        for _ in range(ok.method.message_count):
            method, props, _body = ch.basic_get(queue, auto_ack=False)
            if method is None:
                break
            ids.append(props.message_id or "")
        return ids
    finally:
        conn.close()  # closing the channel requeues everything we got


@dataclass
class LedgerReport:
    """One reading of the ledger."""

    accepted: set[str]
    delivered: set[str]
    dead_rows: set[str]
    dead_queue: list[str]
    duplicate_scores: list[tuple[str, str, int]]
    pending: int
    score_rows: int
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def dead(self) -> set[str]:
        return self.dead_rows | set(self.dead_queue)

    @property
    def lost(self) -> set[str]:
        return self.accepted - self.delivered - self.dead

    @property
    def phantom(self) -> set[str]:
        """Delivered or dead ids that were never accepted."""
        return (self.delivered | self.dead) - self.accepted

    def summary(self) -> str:
        return (
            f"accepted={len(self.accepted)} delivered={len(self.delivered)} score_rows={self.score_rows} "
            f"dead_rows={len(self.dead_rows)} dead_queue={len(self.dead_queue)} lost={len(self.lost)} "
            f"phantom={len(self.phantom)} both={len(self.delivered & self.dead)} "
            f"duplicate_scores={len(self.duplicate_scores)} pending={self.pending}"
        )


class Ledger:
    """Reads the ledger from the gateway store (and the broker's dead queue).

    Args:
        store_url: SQLAlchemy URL of the gateway store.
        amqp_url: the broker (for ``<prefix>.dead``); None skips the broker.
        prefix: the bus prefix.
    """

    def __init__(self, store_url: str, amqp_url: str | None = None, prefix: str | None = None) -> None:
        self.engine: Engine = create_engine(store_url, pool_pre_ping=True)
        self.amqp_url = amqp_url
        self.prefix = prefix

    def close(self) -> None:
        self.engine.dispose()

    # -- cheap counters (polled while waiting)
    def count_accepted(self) -> int:
        with self.engine.connect() as c:
            return int(c.execute(select(func.count()).select_from(events)).scalar_one())

    def count_scores(self) -> int:
        with self.engine.connect() as c:
            return int(c.execute(select(func.count()).select_from(scores)).scalar_one())

    def count_pending(self) -> int:
        with self.engine.connect() as c:
            return int(c.execute(select(func.count()).select_from(events).where(events.c.status == EVENT_PENDING)).scalar_one())

    def count_dead_rows(self) -> int:
        with self.engine.connect() as c:
            return int(c.execute(select(func.count()).select_from(dead_letters)).scalar_one())

    def score_of(self, event_id: str) -> float | None:
        with self.engine.connect() as c:
            return c.execute(select(scores.c.score).where(scores.c.event_id == event_id)).scalar()

    # -- the full reading
    def read(self) -> LedgerReport:
        with self.engine.connect() as c:
            accepted = set(c.execute(select(events.c.id)).scalars())
            delivered = set(c.execute(select(scores.c.event_id)).scalars())
            score_rows = int(c.execute(select(func.count()).select_from(scores)).scalar_one())
            # The sink must hold one row per (event, model): also across model versions.
            dups = [
                (r[0], r[1], int(r[2]))
                for r in c.execute(
                    select(scores.c.event_id, scores.c.model_name, func.count())
                    .group_by(scores.c.event_id, scores.c.model_name)
                    .having(func.count() > 1)
                )
            ]
            dead_rows = {x for x in c.execute(select(dead_letters.c.event_id)).scalars() if x}
            pending = int(c.execute(select(func.count()).select_from(events).where(events.c.status == EVENT_PENDING)).scalar_one())
        dead_queue: list[str] = []
        if self.amqp_url and self.prefix:
            dead_queue = broker_queue_message_ids(self.amqp_url, f"{self.prefix}.dead")
        return LedgerReport(accepted, delivered, dead_rows, dead_queue, dups, pending, score_rows)

    def count_dead_queue(self) -> int:
        """Ready messages in ``<prefix>.dead`` (0 without a broker)."""
        if not (self.amqp_url and self.prefix):
            return 0
        conn = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        try:
            return int(conn.channel().queue_declare(f"{self.prefix}.dead", passive=True).method.message_count)
        finally:
            conn.close()

    def wait_settled(self, expected_accepted: int, timeout: float, *, expected_dead: int = 0,
                     progress: Callable[[], str] | None = None) -> LedgerReport:
        """Wait until ``expected_accepted`` events are accepted, none is pending in the outbox, and
        at least ``expected_accepted - expected_dead`` are scored and ``expected_dead`` are dead.

        Raises:
            AssertionError: naming what did not happen within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            accepted, scored, pending = self.count_accepted(), self.count_scores(), self.count_pending()
            dead = self.count_dead_rows() + self.count_dead_queue() if expected_dead else 0
            last = (f"accepted={accepted}/{expected_accepted} scored={scored}/{expected_accepted - expected_dead} "
                    f"dead={dead}/{expected_dead} pending={pending}")
            if accepted >= expected_accepted and pending == 0 and scored >= expected_accepted - expected_dead \
                    and dead >= expected_dead:
                return self.read()
            if time.monotonic() > deadline:
                extra = f"; {progress()}" if progress else ""
                raise AssertionError(f"the pipeline did not settle within {timeout:.0f}s: {last}{extra}")
            time.sleep(0.25)

    def assert_holds(self, report: LedgerReport | None = None, *, expected: int | None = None,
                     allow_delivered_and_dead: frozenset[str] = frozenset()) -> LedgerReport:
        """Assert the ledger: accepted == delivered ∪ dead, no phantom, no duplicate score rows."""
        r = report or self.read()
        assert not r.duplicate_scores, f"duplicate score rows (event, model, count): {r.duplicate_scores[:10]} -- {r.summary()}"
        assert r.score_rows == len(r.delivered), f"score rows != distinct scored events -- {r.summary()}"
        assert not r.lost, f"{len(r.lost)} accepted events neither scored nor dead, e.g. {sorted(r.lost)[:5]} -- {r.summary()}"
        assert not r.phantom, f"scored/dead events that were never accepted: {sorted(r.phantom)[:5]} -- {r.summary()}"
        both = (r.delivered & r.dead) - allow_delivered_and_dead
        assert not both, f"events both scored and dead-lettered: {sorted(both)[:5]} -- {r.summary()}"
        assert len(r.dead_queue) == len(set(r.dead_queue)), f"an event is twice in the dead queue -- {r.summary()}"
        assert r.accepted == r.delivered | r.dead, r.summary()
        if expected is not None:
            assert len(r.accepted) == expected, f"expected {expected} accepted events -- {r.summary()}"
        return r
