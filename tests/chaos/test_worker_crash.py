"""REL-06 and REL-07: workers killed (kill -9, crash points) and restarted lose and duplicate nothing.

Every role runs as a ``gateway worker --role X`` subprocess on a PostgreSQL store and the test
RabbitMQ. A sink queue bound to ``<prefix>.scored`` sees every scored event the scorer publishes,
so a redelivery after a crash is *visible*: the same scored-event id arrives again, and it must
carry the same score (the scorer reuses the committed score, docs/consumers.md).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.chaos.harness import CRASH_ENV, CRASH_EXIT, Processes, ScoredSink, wait_for
from tests.chaos.ledger import Ledger
from tests.chaos.pipeline import Pipeline, event_ids_in_order, rng

pytestmark = [pytest.mark.chaos, pytest.mark.integration]


def _assert_sink_consistent(sink: ScoredSink, expected_events: int) -> None:
    sink.drain_until(expected_events)
    assert len(sink.by_event) == expected_events, (
        f"the scored exchange carried {len(sink.by_event)} distinct events, expected {expected_events}"
    )
    bad = sink.inconsistent()
    assert not bad, (
        f"{len(bad)} events were published as scored events with different content "
        f"(id, score, time) on redelivery/republication, e.g. {list(bad.items())[:2]}"
    )


def test_kill_9_of_the_scorer_at_a_random_time_and_restart_leaves_exactly_n_scores(
    tmp_path: Path, pg_db_url: str, amqp_url: str, chaos_bus: str, procs: Processes, ledger: Ledger
) -> None:
    """REL-06: kill -9 the scorer mid-stream, restart it: exactly N score rows, every event once."""
    n = 4000
    r = rng()
    pipe = Pipeline(tmp_path, pg_db_url, amqp_url, chaos_bus, procs, legacy_rows=n)
    sink = ScoredSink(amqp_url, chaos_bus)
    scorer = pipe.role("scorer").start()
    scorer.wait_ready()
    pipe.start_roles("sources", "relay")
    at = int(n * r.uniform(0.15, 0.6))
    wait_for(lambda: ledger.count_scores() >= at, 60, f"{at} scores before the kill")
    assert scorer.kill9() == -9
    killed_at = ledger.count_scores()
    assert killed_at < n, "the scorer finished before it was killed: the kill was not mid-stream"
    scorer.start()
    report = ledger.wait_settled(n, 90, progress=scorer.tail)
    ledger.assert_holds(report, expected=n)
    assert report.score_rows == n and not report.dead
    _assert_sink_consistent(sink, n)
    print(f"REL-06 kill -9: killed at {killed_at}/{n} scores; scored events republished after the restart: "
          f"{len(sink.republished)}")


def test_crash_after_commit_before_ack_redelivers_event_k(
    tmp_path: Path, pg_db_url: str, amqp_url: str, chaos_bus: str, procs: Processes, ledger: Ledger
) -> None:
    """REL-06: crash point ``scoring.after_commit_before_ack`` on event k: N rows, k redelivered."""
    n = 1000
    pipe = Pipeline(tmp_path, pg_db_url, amqp_url, chaos_bus, procs, legacy_rows=n)
    sink = ScoredSink(amqp_url, chaos_bus)
    pipe.start_roles("sources", "relay")
    wait_for(lambda: ledger.count_accepted() == n and ledger.count_pending() == 0, 60, f"{n} events relayed")
    k = event_ids_in_order(ledger)[rng().randrange(n // 4, 3 * n // 4)]
    scorer = pipe.role("scorer").start(**{CRASH_ENV: f"scoring.after_commit_before_ack={k}"})
    assert scorer.wait(60) == CRASH_EXIT, f"the scorer did not die at the crash point:\n{scorer.tail()}"
    assert f"crash point scoring.after_commit_before_ack ({k}) reached" in scorer.log_text()
    assert ledger.score_of(k) is not None, "event k's score was not committed before the crash point"
    sink.drain()
    first = list(sink.by_event.get(k, []))
    assert len(first) == 1, f"before the restart, k's scored event was published once (confirmed): {first}"

    scorer.start()  # no crash point now
    report = ledger.wait_settled(n, 60, progress=scorer.tail)
    ledger.assert_holds(report, expected=n)
    assert report.score_rows == n
    _assert_sink_consistent(sink, n)
    # The redelivery of k is observed: its scored event was published a second time by the
    # restarted scorer, identical (same id, score and time: the committed score was reused).
    # (k's score was committed before the crash, so "settled" does not wait for its redelivery.)
    wait_for(lambda: sink.drain(idle=0.3) >= 0 and len(sink.by_event[k]) >= 2, 30,
             f"event k ({k}) redelivered to the restarted scorer and its scored event published again")
    again = sink.by_event[k]
    assert len(set(again)) == 1
    print(f"REL-06 crash point: event k={k} delivered {len(again)} times to the scored exchange; "
          f"{len(sink.republished)} scored events republished in all")


@pytest.mark.parametrize("role", ["sources", "relay"])
def test_kill_9_of_another_role_and_restart_loses_and_duplicates_nothing(
    role: str, tmp_path: Path, pg_db_url: str, amqp_url: str, chaos_bus: str, procs: Processes, ledger: Ledger
) -> None:
    """kill -9 of the sources or relay role mid-stream, then a restart: the ledger holds."""
    # Enough rows, in small batches, that the kill lands mid-stream: the extract path reads a
    # few thousand rows in a fraction of a second.
    n = 20_000
    r = rng()
    pipe = Pipeline(tmp_path, pg_db_url, amqp_url, chaos_bus, procs, legacy_rows=n, source_batch=100,
                    relay={"batch_size": 200})
    sink = ScoredSink(amqp_url, chaos_bus)
    running = pipe.start_roles("scorer", "relay", "sources")
    victim = running[role]
    at = int(n * r.uniform(0.1, 0.5))
    wait_for(lambda: ledger.count_accepted() >= at if role == "sources" else ledger.count_scores() >= at, 60,
             f"{at} events before killing {role}")
    assert victim.kill9() == -9
    killed_at = ledger.count_accepted() if role == "sources" else ledger.count_scores()
    assert killed_at < n, f"{role} finished before it was killed"
    started = time.monotonic()
    victim.start()
    victim.wait_ready()
    report = ledger.wait_settled(n, 90, progress=victim.tail)
    ledger.assert_holds(report, expected=n)
    assert report.score_rows == n and not report.dead
    _assert_sink_consistent(sink, n)
    print(f"kill -9 {role}: at {killed_at}/{n}; settled {time.monotonic() - started:.1f}s after the restart; "
          f"scored events republished: {len(sink.republished)}")


@pytest.mark.slow
def test_crash_loop_on_one_event_is_stopped_by_the_delivery_limit(
    tmp_path: Path, pg_db_url: str, amqp_url: str, chaos_bus: str, procs: Processes, ledger: Ledger
) -> None:
    """REL-07: the scorer dies on one event every time; restarted each time, the event reaches the
    dead queue within delivery-limit + 1 deliveries and the other 99 are scored meanwhile."""
    n, limit = 100, 4  # the smallest limit allowed with max_attempts 3 (bus settings validation)
    pipe = Pipeline(tmp_path, pg_db_url, amqp_url, chaos_bus, procs, legacy_rows=n,
                    bus={"delivery_limit": limit, "max_attempts": 3})
    pipe.start_roles("sources", "relay")
    wait_for(lambda: ledger.count_accepted() == n and ledger.count_pending() == 0, 60, f"{n} events relayed")
    poison = event_ids_in_order(ledger)[rng().randrange(n)]
    scorer = pipe.role("scorer")
    crashes = 0
    deadline = time.monotonic() + 90
    while True:
        scorer.start(**{CRASH_ENV: f"scoring.before_score={poison}"})
        while scorer.alive and time.monotonic() < deadline:
            seen = ledger.read()
            if len(seen.delivered | seen.dead) >= n:  # every event scored or dead: the loop is over
                break
            time.sleep(0.3)
        if scorer.alive:
            break  # it survived: the poison is gone from the queue, or the deadline passed
        rc = scorer.poll()
        assert rc == CRASH_EXIT, f"the scorer died for another reason ({rc}):\n{scorer.tail()}"
        crashes += 1
        assert crashes <= limit + 1, (
            f"the scorer crashed {crashes} times on {poison}: the crash loop was not stopped by the "
            f"delivery limit {limit}; dead queue={ledger.count_dead_queue()} scores={ledger.count_scores()}"
        )
        assert time.monotonic() < deadline, "crash loop still running after 90 s"
    report = ledger.read()
    ledger.assert_holds(report, expected=n)
    innocent = report.dead - {poison}
    assert poison in report.dead, f"the poison event is not dead-lettered: {report.summary()}"
    assert not innocent, (
        f"{len(innocent)} of the {n - 1} other events were dead-lettered with the poison instead of being scored "
        f"({crashes} crashes): {report.summary()}"
    )
    assert report.score_rows == n - 1
    print(f"REL-07 crash loop: {crashes} crashes (delivery limit {limit}); poison in the dead queue; "
          f"{report.score_rows} others scored")
