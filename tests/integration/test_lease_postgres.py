"""REL-15 on PostgreSQL: one active poller per source across two replicas, failover within the lease
TTL after the holder's database sessions are killed, and the stale holder fenced on its cursor write."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import create_engine, distinct, func, select, text
from sqlalchemy.engine import make_url

from gateway.config import SourceSettings
from gateway.errors import FencingError
from gateway.events import utcnow
from gateway.sources.runner import SourceRunner, build_adapter
from gateway.store import EventStore, make_engine
from gateway.store.migrate import upgrade
from gateway.store.schema import events
from tests.legacy import add_orders, make_orders, source_settings

pytestmark = pytest.mark.integration

# B retries every TTL/3 (1 s) and right at the expiry it saw; the bounds below leave 0.6 s of
# scheduling slack for a loaded 2-core CI box and still tell "at expiry" from "at the next tick".
TTL = 3.0
SLACK = 0.6


class Gate:
    """Wraps an adapter: counts ``open``/``fetch`` calls; ``block_next()`` makes the next fetch read
    its batch and then hang (a stuck network read) until ``release`` is set."""

    def __init__(self, adapter: Any) -> None:
        self.opens = self.calls = 0
        self._block = threading.Event()
        self.blocked = threading.Event()
        self.release = threading.Event()
        real_open, real_fetch = adapter.open, adapter.fetch

        def open_() -> None:
            self.opens += 1
            real_open()

        def fetch(cursor: Any, limit: int) -> Any:
            self.calls += 1
            batch = real_fetch(cursor, limit)
            if self._block.is_set():
                self._block.clear()
                self.blocked.set()
                self.release.wait(30)
            return batch

        adapter.open, adapter.fetch = open_, fetch

    def block_next(self) -> None:
        self._block.set()


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``check`` every 20 ms; returns the monotonic time it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_two_replicas_one_poller_failover_within_the_ttl_and_the_stale_one_fenced(pg_db_url: str) -> None:
    legacy = make_orders(pg_db_url, 200)  # the legacy table lives in PostgreSQL too
    url = make_url(pg_db_url)

    def replica_engine(name: str) -> Any:
        return make_engine(url.update_query_dict({"application_name": name}).render_as_string(hide_password=False))

    engine_a, engine_b = replica_engine("gw-replica-a"), replica_engine("gw-replica-b")
    upgrade(engine_a)
    store_a, store_b = EventStore(engine_a), EventStore(engine_b)  # two replicas: two engines
    cfg = SourceSettings.model_validate(
        {**source_settings(pg_db_url, batch_size=20), "lease_ttl": TTL, "status_interval": 0.2, "interval": 0.05}
    )
    adapter_a, adapter_b = build_adapter(cfg), build_adapter(cfg)
    gate_a, gate_b = Gate(adapter_a), Gate(adapter_b)
    runner_a = SourceRunner(cfg, store_a, adapter=adapter_a, owner="replica-a")
    runner_b = SourceRunner(cfg, store_b, adapter=adapter_b, owner="replica-b")
    fenced: list[tuple[float, int]] = []  # (when, A's fetch calls by then)
    real_accept = store_a.accept

    def accept_a(*args: Any, **kwargs: Any) -> Any:
        try:
            return real_accept(*args, **kwargs)
        except FencingError:
            fenced.append((time.monotonic(), gate_a.calls))
            raise

    store_a.accept = accept_a  # type: ignore[method-assign]
    stop_a, stop_b = threading.Event(), threading.Event()
    thread_a = threading.Thread(target=runner_a.run, args=(stop_a,), daemon=True)
    thread_b = threading.Thread(target=runner_b.run, args=(stop_b,), daemon=True)
    stored = lambda: store_b.stats()["events"]  # noqa: E731
    admin = create_engine(pg_db_url, isolation_level="AUTOCOMMIT")
    t_start = time.monotonic()
    try:
        thread_a.start()
        wait_for(lambda: stored() == 200, 10, "replica A to read the 200 rows")
        thread_b.start()
        time.sleep(TTL * 0.75)  # B tries the lease twice meanwhile (every ttl/3)

        # (1) Only A emits: B is standby and never even opened its adapter.
        assert (gate_b.opens, gate_b.calls) == (0, 0) and runner_b.status.state == "standby"
        assert runner_b.status.lease_holder == "replica-a" and runner_b.status.events_accepted == 0
        assert {(r.owner, r.state) for r in store_b.list_runners("orders")} >= {("replica-b", "standby")}
        cur = store_b.get_cursor("orders")
        assert cur is not None and (cur.lease_owner, cur.epoch) == ("replica-a", 1)

        # (2) A's next fetch reads new rows and hangs past the TTL, and its DB sessions are killed.
        add_orders(legacy, 50, start=201)
        gate_a.block_next()
        assert gate_a.blocked.wait(5), "replica A did not poll the new rows"
        with admin.connect() as conn:
            killed = conn.execute(
                text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'gw-replica-a'")
            ).scalar_one()
        t_kill = time.monotonic()
        expiry = store_b.get_cursor("orders").lease_until  # type: ignore[union-attr]
        assert killed >= 1 and expiry is not None

        # (3) B takes over within the lease TTL, measured from the kill (A renewed its lease before
        # the fetch that hung; B tries again right when the lease it saw expires).
        t_takeover = wait_for(
            lambda: store_b.get_cursor("orders").lease_owner == "replica-b",  # type: ignore[union-attr]
            TTL * 3, "replica B to take the lease over",
        )
        took = t_takeover - t_kill
        after_expiry = (utcnow() - expiry).total_seconds()
        print(f"\nfailover: B took over {took:.2f} s after the kill, {after_expiry:.2f} s after A's lease expired (TTL {TTL} s)")
        assert took <= TTL + SLACK, took
        assert -0.05 <= after_expiry <= SLACK, after_expiry  # not before A's lease expired, then at once
        cur = store_b.get_cursor("orders")
        assert cur is not None and cur.epoch == 2

        # (4) A wakes up: its cursor write (epoch 1) affects 0 rows -> FencingError; it stops polling.
        gate_a.release.set()
        wait_for(lambda: bool(fenced), 10, "replica A's fenced cursor write")
        wait_for(lambda: runner_a.status.state == "standby", 5, "replica A to go standby")
        calls_at_fence = fenced[0][1]
        time.sleep(TTL / 2)
        assert gate_a.calls == calls_at_fence, "the fenced replica polled again"
        assert runner_a.status.lease_holder == "replica-b" and "refused" in (runner_a.status.last_error or "")

        # (5) B reads on from the committed cursor: every row exactly once.
        wait_for(lambda: stored() == 250, 10, "replica B to read the 50 new rows")
        time.sleep(0.3)
    finally:
        gate_a.release.set()
        stop_a.set()
        stop_b.set()
        thread_a.join(10)
        thread_b.join(10)
    assert not thread_a.is_alive() and not thread_b.is_alive()
    with engine_b.connect() as conn:
        total, subjects = conn.execute(select(func.count(), func.count(distinct(events.c.subject)))).one()
    assert (total, subjects) == (250, 250)
    cur = store_b.get_cursor("orders")
    assert cur is not None and cur.lease_owner is None and cur.epoch == 2  # B released on stop
    assert gate_a.calls == calls_at_fence and runner_b.status.events_accepted == 50
    assert time.monotonic() - t_start < 15
    for e in (engine_a, engine_b, admin, legacy):
        e.dispose()
