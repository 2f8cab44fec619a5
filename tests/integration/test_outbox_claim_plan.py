"""The relay's claim on PostgreSQL reads the oldest pending rows in index order, whatever the statistics say.

With statistics that call pending rows rare -- a new table before its first ANALYZE, or a backlog
that built up since the last one -- PostgreSQL's cheapest-looking plan for
``WHERE status = 'pending' ... ORDER BY seq LIMIT n`` is a bitmap scan of every pending row and a
sort of them all (with the envelopes, spilling to disk), on every claim: the claim then costs more
the bigger the backlog, exactly when the relay must catch up. These tests replay the statements the
claim really runs, in one transaction, under EXPLAIN.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import event as sa_event

from gateway.events import Event, utcnow
from gateway.store import EventStore

pytestmark = pytest.mark.integration


def _backlog(store: EventStore, n: int) -> None:
    now = utcnow()
    for start in range(0, n, 2000):
        store.accept(
            [Event(id=str(uuid.uuid4()), source="/s", type="t.x", time=now, data={"i": i, "pad": "x" * 400})
             for i in range(start, min(n, start + 2000))],
            source_name="s",
        )


def _claim_statements(store: EventStore, limit: int) -> list[tuple[str, Any]]:
    seen: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        seen.append((statement, parameters))

    sa_event.listen(store.engine, "before_cursor_execute", record)
    try:
        rows = store.claim_pending("relay-1", limit, 60.0)
    finally:
        sa_event.remove(store.engine, "before_cursor_execute", record)
    assert len(rows) == limit
    return seen


def _plan_of_claim(store: EventStore, statements: list[tuple[str, Any]]) -> str:
    """EXPLAIN the claim's SELECT after the statements that ran before it in its transaction."""
    select_at = next(i for i, (s, _) in enumerate(statements) if s.lstrip().upper().startswith("SELECT"))
    with store.engine.begin() as conn:
        raw = conn.connection.driver_connection
        with raw.cursor() as cur:  # type: ignore[union-attr]
            for stmt, params in statements[:select_at]:
                cur.execute(stmt, params or None)
            stmt, params = statements[select_at]
            cur.execute("EXPLAIN " + stmt, params)
            plan = "\n".join(r[0] for r in cur.fetchall())
        conn.rollback()
    return plan


def test_claim_reads_the_index_in_order_with_stale_statistics(pg_store: EventStore) -> None:
    _backlog(pg_store, 6000)  # never analyzed: the planner guesses pending rows are rare
    statements = _claim_statements(pg_store, 500)
    plan = _plan_of_claim(pg_store, statements)
    assert "Index Scan" in plan and "Sort" not in plan, plan
    # The same SELECT without the claim's session setting is the plan the setting avoids (so this
    # test would fail if the claim lost it).
    bare = [(s, p) for s, p in statements if s.lstrip().upper().startswith("SELECT")]
    assert "Sort" in _plan_of_claim(pg_store, bare)


def test_claims_stay_in_order_and_disjoint(pg_store: EventStore) -> None:
    _backlog(pg_store, 3000)
    first = pg_store.claim_pending("relay-1", 1000, 60.0)
    second = pg_store.claim_pending("relay-2", 1000, 60.0)
    seqs = [r.seq for r in first + second]
    assert seqs == sorted(seqs) and len(set(seqs)) == 2000
    pg_store.mark_published([r.seq for r in first])
    third = pg_store.claim_pending("relay-1", 5000, 60.0)
    assert [r.seq for r in third] == sorted(r.seq for r in third) and len(third) == 1000
    assert min(r.seq for r in third) > max(seqs)
