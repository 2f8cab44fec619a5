"""A Hypothesis state machine drives the SQL source against a model of a live legacy table (SQLite).

The steps interleave, in any order:

* **insert** -- 1-5 rows sharing one timestamp (a tie group, sometimes joining an existing one
  with higher keys), written in the writer's open transaction on a connection of its own, and
  sometimes committed at once; a row is often stamped *earlier* than rows already committed (a
  late commit);
* **update** -- a committed or pending row gets a new version (a new timestamp), also inside the
  open transaction;
* **commit** (or, one time in four, **rollback**) of the open transaction;
* **poll** -- ``SourceRunner.run_once()`` with a batch size of 3, one time in four after a
  **restart** (the runner stops with ``close()``, releasing the source's lease, and a new
  ``SourceRunner`` with a new adapter starts on the same gateway store);
* **wait** -- real time passes, so stamped rows come out of the delay window mid-run.

SQLite allows one writer at a time, so there is at most one open transaction; the table is in WAL
mode, so polls read the last committed state while it is open.

**Time.** Late commits are the job of the adapter's ``delay_seconds`` (D): a poll reads only rows
older than its *horizon*, "now - D". The adapter's "now" is not patched: it is (or is being
changed to) the database's clock, and either way this machine's real clock. So rows are stamped
relative to real time, and the model keeps exactly the contract the delay relies on -- *at every
poll, every row stamped before the poll's horizon is committed*:

1. a new stamp is never below the horizon of a poll that already ran (``floor``: the time after
   the last poll returned, minus D, plus a few ms for a database clock read in milliseconds); it
   lies anywhere from there up to ``now - D + 0.2 s``;
2. before a poll, an open transaction holding a stamp that comes within 0.1 s of the horizon is
   committed first (the source's transactions are shorter than D).

The margin covers the time between that check and the adapter reading its clock (sub-ms: a
restart's ``start()`` runs before the check). A coarser database clock only moves the horizon
earlier, which reads less, never skips; the final drain waits for it.

**Invariant** (after every step):

1. every event in the sink is a committed (key, version) of the source -- never a version that
   only existed inside a transaction, never a rolled-back row -- and its id is the deterministic
   id of that (key, version);
2. no duplicates: each event id once, each (key, version) once, and no runner was ever offered a
   record it had already stored (``status.duplicates == 0``: nothing is re-read);
3. per key, the sink's versions appear in the order the source committed them.

**At teardown**, with everything committed and the delay elapsed, a final drain must make the
sink's *latest* version of every key (the last one accepted) equal the source's. Not every
committed version must be in the sink: a version overwritten before any poll could see it
legitimately yields only the newer one.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from sqlalchemy import (
    Connection,
    Engine,
    RootTransaction,
    create_engine,
    event,
    insert,
    update,
)

from gateway.config import SourceSettings
from gateway.events import format_time
from gateway.events.ids import event_id
from gateway.sources.runner import SourceRunner
from gateway.store import EventFilter, EventStore, make_engine
from gateway.store.migrate import upgrade
from tests.legacy import META, ORDERS, source_settings

_DELAY = timedelta(seconds=0.25)  # delay_seconds of the source
_MAX_LAG = timedelta(seconds=0.2)  # the newest stamp: now - delay + this
_MARGIN = timedelta(seconds=0.1)  # commit an open transaction this long before a stamp leaves the window
_SLACK = timedelta(milliseconds=5)  # above a past poll's horizon (a database clock read in ms)
_BATCH = 3
# The final drain's patience after the newest row left the window. The adapter's horizon errs early
# by its clock reading's round trip (DbClock keeps the fastest of up to 3, but on a loaded CI
# machine all can be slow); the drain ends as soon as the sink matches, so passing runs never wait.
_SETTLE = timedelta(seconds=2)
# Draws have the same shape whatever the state (which depends on real time): Hypothesis replays
# them exactly, so no rule has a precondition and a key or tie is picked by index modulo.
_TIE = st.none() | st.integers(0, 1000)
_WHERE = st.floats(0, 1)
_SOURCE = "orders"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _legacy_engine(url: str) -> Engine:
    engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def _wal(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.execute("PRAGMA journal_mode=WAL")
        dbapi_conn.execute("PRAGMA busy_timeout=10000")

    return engine


class SqlSourceMachine(RuleBasedStateMachine):
    """The legacy table (model: committed and pending versions) against the gateway's sink."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="sqlsm-"))
        self.legacy_url = f"sqlite:///{self.dir / 'legacy.db'}"
        self.legacy = _legacy_engine(self.legacy_url)
        META.create_all(self.legacy)
        self.writer: Connection = self.legacy.connect()  # the legacy application's connection
        self.tx: RootTransaction | None = None
        self.store_engine = make_engine(f"sqlite:///{self.dir / 'gateway.db'}")
        upgrade(self.store_engine)
        self.store = EventStore(self.store_engine)
        self.committed: dict[int, datetime] = {}  # key -> committed version
        self.pending: dict[int, datetime] = {}  # key -> version written in the open transaction
        self.history: dict[tuple[int, str], int] = {}  # every committed (key, version) -> commit no.
        self.commits = 0
        self.next_key = 1
        self.duplicates = 0  # summed over the runners that were replaced
        # No new stamp goes below this: above the horizon (now - delay) of every poll so far.
        self.floor = _now() - _DELAY
        self.runner = self._new_runner()

    # ------------------------------------------------------------------ helpers
    def _new_runner(self) -> SourceRunner:
        cfg = source_settings(
            self.legacy_url, name=_SOURCE, batch_size=_BATCH, delay_seconds=_DELAY.total_seconds()
        )
        runner = SourceRunner(SourceSettings.model_validate(cfg), self.store, sleep=lambda s: None)
        runner.start()  # as a restarted process does, before its first poll
        return runner

    def _stamp(self, tie: int | None, where: float) -> datetime:
        """A new version's timestamp: the ``tie``-th stamp still above every past poll's horizon
        (when there is one), else the point ``where`` between that floor and the newest allowed."""
        ties = sorted({v for v in (*self.committed.values(), *self.pending.values()) if v >= self.floor})
        if tie is not None and ties:
            return ties[tie % len(ties)]
        top = _now() - _DELAY + _MAX_LAG
        return self.floor + (top - self.floor) * where

    def _begin(self) -> None:
        if self.tx is None:
            self.tx = self.writer.begin()

    def _commit(self) -> None:
        assert self.tx is not None
        self.tx.commit()
        self.tx = None
        self.commits += 1
        for key, version in self.pending.items():
            self.committed[key] = version
            self.history.setdefault((key, format_time(version)), self.commits)
        self.pending = {}

    def _commit_if_due(self) -> None:
        """The source's transactions are shorter than the delay: commit one about to outlive it."""
        if self.pending and min(self.pending.values()) <= _now() - _DELAY + _MARGIN:
            self._commit()

    def _sink(self) -> list[tuple[str, int, str]]:
        """(event id, key, version) of every stored event, in acceptance order."""
        items = self.store.list_events(EventFilter(source_name=_SOURCE), limit=1_000_000)
        return [(i.event["id"], int(i.event["data"]["id"]), i.event["data"]["updated_at"]) for i in items]

    def _total_duplicates(self) -> int:
        return self.duplicates + self.runner.status.duplicates

    # ------------------------------------------------------------------ the source
    @rule(n=st.integers(1, 5), tie=_TIE, where=_WHERE, commit_now=st.booleans())
    def insert_rows(self, n: int, tie: int | None, where: float, commit_now: bool) -> None:
        self._begin()
        stamp = self._stamp(tie, where)
        rows = []
        for key in range(self.next_key, self.next_key + n):
            rows.append({"id": key, "customer": f"C{key}", "amount": key, "status": "NEW",
                         "updated_at": stamp.replace(tzinfo=None)})
            self.pending[key] = stamp
        self.next_key += n
        self.writer.execute(insert(ORDERS), rows)
        if commit_now:
            self._commit()

    @rule(pick=st.integers(0, 1000), tie=_TIE, where=_WHERE, commit_now=st.booleans())
    def update_row(self, pick: int, tie: int | None, where: float, commit_now: bool) -> None:
        keys = sorted(set(self.committed) | set(self.pending))
        if not keys:
            return
        key = keys[pick % len(keys)]
        self._begin()
        current = self.pending.get(key, self.committed.get(key))
        stamp = self._stamp(tie, where)
        if stamp == current:
            stamp += timedelta(microseconds=1)
        self.writer.execute(
            update(ORDERS).where(ORDERS.c.id == key).values(status="CHANGED", updated_at=stamp.replace(tzinfo=None))
        )
        self.pending[key] = stamp
        if commit_now:
            self._commit()

    @rule(outcome=st.sampled_from(["commit", "commit", "commit", "rollback"]))
    def end_transaction(self, outcome: str) -> None:
        if self.tx is None:
            return
        if outcome == "commit":
            self._commit()
            return
        assert self.tx is not None
        self.tx.rollback()
        self.tx = None
        self.pending = {}

    @rule(ms=st.integers(5, 60))
    def wait(self, ms: int) -> None:
        time.sleep(ms / 1000)

    # ------------------------------------------------------------------ the gateway
    @rule(restart_first=st.sampled_from([False, False, False, True]))
    def poll(self, restart_first: bool) -> None:
        if restart_first:
            self._restart()
        self._commit_if_due()
        self.runner.run_once()
        self.floor = max(self.floor, _now() - _DELAY + _SLACK)

    def _restart(self) -> None:
        """A new runner with a new adapter on the same store, from the committed cursor."""
        self.duplicates += self.runner.status.duplicates
        self.runner.close()
        self.runner = self._new_runner()

    # ------------------------------------------------------------------ checks
    @invariant()
    def sink_holds_only_committed_versions_once_and_in_order(self) -> None:
        sink = self._sink()
        ids = [i for i, _, _ in sink]
        assert len(ids) == len(set(ids)), "an event id stored twice"
        pairs = [(k, v) for _, k, v in sink]
        assert len(pairs) == len(set(pairs)), "a (key, version) stored under two ids"
        last_commit: dict[int, int] = {}
        for eid, key, version in sink:
            assert (key, version) in self.history, f"key {key} version {version} was never committed"
            assert eid == event_id(_SOURCE, "order", key, datetime.fromisoformat(version.replace("Z", "+00:00")))
            no = self.history[(key, version)]
            assert no > last_commit.get(key, 0), f"key {key}: version {version} emitted after a newer one"
            last_commit[key] = no
        assert self._total_duplicates() == 0, "a record was read again (the store dropped a repeat)"

    def teardown(self) -> None:
        try:
            if self.tx is not None:
                self._commit()
            expected = {k: format_time(v) for k, v in self.committed.items()}
            # Every row is out of the delay window by then (a coarser database clock: a bit later).
            ready_at = max(self.committed.values(), default=_now()) + _DELAY + _SETTLE
            latest: dict[int, str] = {}
            while True:
                for _ in range(1000):  # a cursor that never advances fails, not hangs
                    if not self.runner.run_once().has_more:
                        break
                else:
                    raise AssertionError("the source still has more after 1000 polls")
                latest = {k: v for _, k, v in self._sink()}  # acceptance order: the last one wins
                if latest == expected or _now() > ready_at:
                    break
                time.sleep(0.02)
            missing = {k: v for k, v in expected.items() if latest.get(k) != v}
            assert latest == expected, f"after the final drain the sink lags the source: {missing}"
            self.sink_holds_only_committed_versions_once_and_in_order()
        finally:
            self.runner.close()
            self.writer.close()
            self.legacy.dispose()
            self.store_engine.dispose()
            shutil.rmtree(self.dir, ignore_errors=True)


SqlSourceMachine.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestSqlSourceAgainstModel = SqlSourceMachine.TestCase
