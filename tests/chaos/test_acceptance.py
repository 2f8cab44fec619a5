"""The acceptance chaos run: 20,000 events through every fault at once, 0 lost, 0 duplicated.

PostgreSQL legacy table -> ``sources`` -> outbox -> ``relay`` -> RabbitMQ -> ``scorer`` (through a
ChaosProxy) -> scores, each role a ``gateway worker`` subprocess. During the stream: a cut of the
scorer's connections, a ``kill -9`` of the scorer (restarted), and a RabbitMQ restart.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.chaos.harness import Processes, ScoredSink, restart_broker, wait_for
from tests.chaos.ledger import Ledger
from tests.chaos.pipeline import Feeder, Pipeline, rng
from tests.chaos.proxy import ChaosProxy

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.slow]

N = 20_000


def test_20000_events_through_a_cut_a_kill_and_a_broker_restart_arrive_exactly_once(
    tmp_path: Path, pg_db_url: str, amqp_url: str, chaos_bus: str, procs: Processes, ledger: Ledger,
    amqp_proxy: ChaosProxy, request: pytest.FixtureRequest,
) -> None:
    r = rng()
    started = time.monotonic()
    preload = 8_000  # the rest arrives as a live stream while the faults happen
    pipe = Pipeline(tmp_path, pg_db_url, amqp_url, chaos_bus, procs, legacy_rows=preload, source_batch=1000)
    scorer_cfg = pipe.write("scorer.yaml", amqp_url=amqp_proxy.url_for(amqp_url))
    sink = ScoredSink(amqp_url, chaos_bus)
    scorer = pipe.role("scorer", scorer_cfg).start()
    scorer.wait_ready()
    pipe.start_roles("relay", "sources")
    # The last 2,000 rows wait until the broker restart, so it always happens mid-stream.
    feeder = Feeder(pg_db_url, total=N - preload, start=preload + 1, batch=100, pause=0.1, hold_back=2_000).start()
    request.addfinalizer(feeder.stop)
    faults: list[str] = []

    def at(fraction: float) -> int:
        mark = int(N * fraction)
        wait_for(lambda: ledger.count_scores() >= mark, 120, f"{mark} scores")
        return ledger.count_scores()

    # 1. A connection cut between the scorer and RabbitMQ.
    s = at(r.uniform(0.05, 0.2))
    closed = amqp_proxy.cut()
    assert closed >= 2, f"the scorer had only {closed} connections through the proxy"
    faults.append(f"cut at {s} scores ({closed} connections)")
    # 2. kill -9 of the scorer, restarted at once.
    s = at(r.uniform(0.3, 0.45))
    assert scorer.kill9() == -9
    scorer.start()
    faults.append(f"kill -9 of the scorer at {s} scores")
    # 3. A broker restart (every role loses its connections).
    s = at(r.uniform(0.55, 0.7))
    accepted = ledger.count_accepted()
    assert s < N and accepted < N, f"the stream ended before the last fault (scored {s}, accepted {accepted})"
    took = restart_broker()
    faults.append(f"broker restart at {s} scores, {accepted} accepted ({took:.1f}s)")
    feeder.release()
    feeder.join(120)

    report = ledger.wait_settled(N, 180, progress=scorer.tail)
    elapsed = time.monotonic() - started
    ledger.assert_holds(report, expected=N)
    assert report.score_rows == N and len(report.delivered) == N and not report.dead
    sink.drain_until(N, timeout=180)
    republished = sink.republished
    print(
        f"ACCEPTANCE: events={N} scored={report.score_rows} distinct={len(report.delivered)} lost={len(report.lost)} "
        f"duplicate_rows={len(report.duplicate_scores)} dead={len(report.dead)} elapsed={elapsed:.1f}s "
        f"scorer_starts={scorer.starts} proxy_connections={amqp_proxy.accepted} "
        f"scored_events_seen={sum(sink.seen.values())} redeliveries_seen={sum(v - 1 for v in republished.values())} "
        f"faults: {'; '.join(faults)}"
    )
    assert len(sink.by_event) == N, f"the scored exchange carried {len(sink.by_event)} distinct events, expected {N}"
    bad = sink.inconsistent()
    assert not bad, f"{len(bad)} events republished with different content, e.g. {list(bad.items())[:2]}"
