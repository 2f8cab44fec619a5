"""REL-02 (a crash between the outbox commit and the source ack) and the graceful stop (SIGTERM)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
from sqlalchemy import func, select

from gateway.events.ids import event_id
from gateway.store.schema import events, source_cursors, source_status
from tests.chaos.harness import (
    CRASH_ENV,
    CRASH_EXIT,
    SOURCE_NAME,
    Processes,
    ScoredSink,
    gateway_config,
    migrate,
    wait_for,
    write_config,
)
from tests.chaos.ledger import Ledger
from tests.chaos.pipeline import Pipeline, rng

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

LEGACY = "legacy-queue"


@pytest.fixture
def legacy_queue(amqp_url: str, chaos_bus: str) -> Iterator[str]:
    """A quorum queue standing in for the legacy system's queue; deleted afterwards."""
    name = f"{chaos_bus}.legacy-in"
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    conn.channel().queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"})
    conn.close()
    yield name
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    conn.channel().queue_delete(name)
    conn.close()


def _publish(amqp_url: str, queue: str, n: int) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    ch.confirm_delivery()
    for i in range(1, n + 1):
        body = json.dumps({"id": i, "customer": f"C{i % 97}", "amount": f"{i % 1000}.25"}).encode()
        ch.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2, content_type="application/json",
                                                                message_id=f"m-{i}"))
    conn.close()


def _queue_depth(amqp_url: str, queue: str) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        conn.close()


def test_crash_after_outbox_commit_before_source_ack_redelivers_and_stores_each_event_once(
    tmp_path: Path, pg_db_url: str, amqp_url: str, chaos_bus: str, procs: Processes, ledger: Ledger, legacy_queue: str
) -> None:
    """REL-02: the legacy-queue source dies after committing a batch, before acking it. After the
    restart the broker redelivers the batch, and the outbox holds exactly one row per event id."""
    n = 600
    _publish(amqp_url, legacy_queue, n)
    migrate(pg_db_url)
    source = {
        "name": LEGACY, "adapter": "amqp", "interval": 0.01, "status_interval": 0.5, "lease_ttl": 3,
        "config": {"url": amqp_url, "queue": legacy_queue, "prefetch": 200, "batch_size": 100, "max_wait": 0.3,
                   "codec": {"format": "json"}, "delivery_limit": 5, "reconnect_max_delay": 2.0},
        "mapping": {"type": "com.acme.legacy.order", "entity": "order", "key": ["id"], "subject": "order/{id}"},
    }
    cfg = write_config(tmp_path / "gateway.yaml", gateway_config(pg_db_url, amqp_url, chaos_bus, sources=[source]))
    k = event_id(LEGACY, "order", rng().randint(1, n // 2), None)
    gw = procs.run(cfg)
    gw.start(**{CRASH_ENV: f"source.after_outbox_commit_before_source_ack={k}"})
    assert gw.wait(60) == CRASH_EXIT, f"the source did not die at the crash point:\n{gw.tail()}"
    assert f"crash point source.after_outbox_commit_before_source_ack ({k}) reached" in gw.log_text()
    committed = ledger.count_accepted()
    assert committed >= 1 and k in ledger.read().accepted, "the batch with k was not committed before the crash"
    assert committed < n, "everything was committed before the crash: nothing to redeliver"
    # The crashed batch was never acked: it is back in the legacy queue.
    # (one message per record: more than n - committed ready messages means committed ones came back)
    wait_for(lambda: _queue_depth(amqp_url, legacy_queue) >= n - committed + 1, 30,
             "the unacked batch back in the legacy queue")
    back = _queue_depth(amqp_url, legacy_queue) - (n - committed)

    gw.start()
    wait_for(lambda: ledger.count_accepted() >= n and _queue_depth(amqp_url, legacy_queue) == 0, 60,
             f"all {n} messages accepted and acked after the restart")
    report = ledger.wait_settled(n, 60, progress=gw.tail)
    ledger.assert_holds(report, expected=n)
    with ledger.engine.connect() as c:
        doubled = c.execute(select(events.c.id).group_by(events.c.id).having(func.count() > 1)).scalars().all()
    assert doubled == [], f"event ids twice in the outbox: {doubled[:5]}"
    assert len(report.accepted) == n

    def seen_duplicates() -> int:
        with ledger.engine.connect() as c:
            return int(c.execute(select(source_status.c.duplicates)
                                 .where(source_status.c.source_name == LEGACY)).scalar() or 0)

    # The restarted runner read the crashed batch again (the redelivery) and found its events
    # already stored: its status counts them as duplicates (written every status_interval).
    duplicates = wait_for(seen_duplicates, 5, "the restarted source to report the redelivered events as duplicates")
    print(f"REL-02: {committed} events committed before the crash, {back} of them back in the legacy queue; "
          f"after the restart {duplicates} redelivered "
          f"records were recognised as duplicates; outbox {len(report.accepted)} rows for {n} messages")


def _lease(ledger: Ledger) -> tuple[str | None, object]:
    with ledger.engine.connect() as c:
        row = c.execute(select(source_cursors.c.lease_owner, source_cursors.c.lease_until)
                        .where(source_cursors.c.source_name == SOURCE_NAME)).one()
    return row[0], row[1]


def test_sigterm_mid_stream_stops_cleanly_and_a_restart_loses_and_duplicates_nothing(
    tmp_path: Path, pg_db_url: str, amqp_url: str, chaos_bus: str, procs: Processes, ledger: Ledger
) -> None:
    """Graceful stop: SIGTERM to ``gateway run`` mid-stream exits 0 within 30 s, logs a clean stop,
    releases the source lease; the restart takes over at once and the ledger holds."""
    n = 6000
    # lease_ttl 30 s: if the stop did not release the lease, the restart would wait ~30 s for it.
    pipe = Pipeline(tmp_path, pg_db_url, amqp_url, chaos_bus, procs, legacy_rows=n, lease_ttl=30.0, source_batch=200)
    sink = ScoredSink(amqp_url, chaos_bus)
    gw = procs.run(pipe.config).start()
    gw.wait_ready()
    at = int(n * rng().uniform(0.1, 0.4))
    wait_for(lambda: ledger.count_scores() >= at, 60, f"{at} scores before SIGTERM")
    old_owner, _ = _lease(ledger)
    assert old_owner, "the running source holds no lease"
    t0 = time.monotonic()
    gw.terminate()
    rc = gw.wait(30)
    stop_took = time.monotonic() - t0
    assert rc == 0, f"gateway run exited {rc} after SIGTERM:\n{gw.tail()}"
    log = gw.log_text()
    assert "stopping: finishing in-flight work" in log
    assert "Traceback" not in log and "crashed" not in log, gw.tail(60)
    owner, _ = _lease(ledger)
    assert owner is None, f"the source lease was not released on the graceful stop (held by {owner})"
    stopped_at = (ledger.count_accepted(), ledger.count_scores())
    assert stopped_at[1] < n, "the stream was finished before SIGTERM: not mid-stream"

    t1 = time.monotonic()
    gw.start()
    gw.wait_ready()
    new_owner = wait_for(lambda: _lease(ledger)[0], 5, "the restarted runner to take the lease at once")
    takeover = time.monotonic() - t1
    assert new_owner != old_owner
    report = ledger.wait_settled(n, 90, progress=gw.tail)
    ledger.assert_holds(report, expected=n)
    assert report.score_rows == n and not report.dead
    sink.drain_until(n)
    assert len(sink.by_event) == n and not sink.inconsistent()
    print(f"graceful stop: SIGTERM at accepted={stopped_at[0]} scored={stopped_at[1]}; exit 0 after {stop_took:.1f}s; "
          f"lease released; restart held the lease after {takeover:.1f}s; all {n} settled")

