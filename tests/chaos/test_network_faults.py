"""REL-04 (broker restart mid-stream) and REL-05 (connection cuts and silent networks)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from gateway.config import Settings
from gateway.runtime import Gateway
from tests.chaos.harness import (
    Processes,
    ScoredSink,
    gateway_config,
    migrate,
    orders_source,
    restart_broker,
    wait_for,
)
from tests.chaos.ledger import Ledger
from tests.chaos.pipeline import Feeder, Pipeline, rng
from tests.chaos.proxy import ChaosProxy
from tests.legacy import make_orders

pytestmark = [pytest.mark.chaos, pytest.mark.integration]


@pytest.mark.slow
def test_broker_restart_mid_stream_loses_and_duplicates_nothing(
    tmp_path: Path, pg_db_url: str, amqp_url: str, chaos_bus: str, procs: Processes, ledger: Ledger,
    request: pytest.FixtureRequest,
) -> None:
    """REL-04: 1000 events flow while RabbitMQ restarts at about event 500; the ledger holds in 120 s."""
    n = 1000
    started = time.monotonic()
    pipe = Pipeline(tmp_path, pg_db_url, amqp_url, chaos_bus, procs, legacy_rows=0)
    sink = ScoredSink(amqp_url, chaos_bus)
    pipe.start_roles("scorer", "relay", "sources")
    feeder = Feeder(pg_db_url, total=n, batch=25, pause=0.1).start()  # ~4 s of stream
    request.addfinalizer(feeder.stop)
    wait_for(lambda: ledger.count_accepted() >= n // 2, 60, "500 accepted events before the restart")
    at = (ledger.count_accepted(), ledger.count_scores())
    took = restart_broker()
    feeder.join(60)
    report = ledger.wait_settled(n, max(10.0, 120 - (time.monotonic() - started)))
    elapsed = time.monotonic() - started
    ledger.assert_holds(report, expected=n)
    assert report.score_rows == n and not report.dead
    assert elapsed <= 120, f"REL-04 deadline: settled after {elapsed:.0f}s"
    assert at[1] < n, "the restart came after everything was scored: not mid-stream"
    sink.drain_until(n)
    assert len(sink.by_event) == n
    print(f"REL-04: restart at accepted={at[0]} scored={at[1]} took {took:.1f}s; all {n} settled in {elapsed:.1f}s; "
          f"scored events republished: {len(sink.republished)}")


class _Watch:
    """Polls the ``ready`` flag of a gateway's RabbitMQ clients; records when each went down and up."""

    def __init__(self, clients: dict[str, object]) -> None:
        self.clients = clients
        self.down: dict[str, list[float]] = {k: [] for k in clients}
        self.up: dict[str, list[float]] = {k: [] for k in clients}
        self._stop = threading.Event()
        self._state = {k: bool(c.ready) for k, c in clients.items()}
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            now = time.monotonic()
            for k, c in self.clients.items():
                ready = bool(c.ready)
                if ready != self._state[k]:
                    (self.up if ready else self.down)[k].append(now)
                    self._state[k] = ready

    def first_down_after(self, t: float) -> dict[str, float | None]:
        return {k: next((x - t for x in v if x >= t), None) for k, v in self.down.items()}

    def all_up(self) -> bool:
        return all(bool(c.ready) for c in self.clients.values())

    def stop(self) -> None:
        self._stop.set()
        self._t.join(2)


@pytest.mark.slow
def test_connection_cut_and_blackhole_are_survived_and_detected_by_heartbeat(
    tmp_path: Path, pg_db_url: str, amqp_url: str, chaos_bus: str, ledger: Ledger, amqp_proxy: ChaosProxy
) -> None:
    """REL-05: publisher and consumers through ChaosProxy, heartbeat 2 s: a cut at a random point,
    then a black hole for 3 x the heartbeat, then restore. Both sides reconnect (jittered backoff)
    within a bounded time, the dead connection is detected within 4 x the heartbeat, the ledger holds."""
    hb, n = 2, 3000
    r = rng()
    engine = make_orders(pg_db_url, 0)
    engine.dispose()
    migrate(pg_db_url)
    doc = gateway_config(pg_db_url, amqp_proxy.url_for(amqp_url), chaos_bus, sources=[orders_source(pg_db_url)],
                         bus={"heartbeat": hb, "reconnect_max_delay": 2.0, "publish_timeout": 5})
    settings = Settings(**doc)
    gw = Gateway(settings, roles=["sources", "relay", "scorer"])
    gw.start()
    feeder = Feeder(pg_db_url, total=n, batch=30, pause=0.05)
    watch: _Watch | None = None
    try:
        assert gw.relay is not None
        clients: dict[str, object] = {"relay-publisher": gw.relay.publisher, "scorer-publisher": gw.scorers[0].publisher}
        for i, w in enumerate(gw.scorers):
            clients[f"scorer-consumer-{i}"] = w.consumer
        wait_for(lambda: all(c.ready for c in clients.values()), 20, "every client connected")
        assert amqp_proxy.active >= len(clients)
        watch = _Watch(clients)
        feeder.start()

        # 1. cut() at a random point of the stream.
        at = int(n * r.uniform(0.1, 0.4))
        wait_for(lambda: ledger.count_scores() >= at, 60, f"{at} scores before the cut")
        connects = {k: c.connects for k, c in clients.items()}
        t_cut = time.monotonic()
        closed = amqp_proxy.cut()
        assert closed >= len(clients)
        wait_for(lambda: all(c.connects > connects[k] for k, c in clients.items()) and watch.all_up(),
                 15, "every client to reconnect after the cut")
        reconnect_cut = time.monotonic() - t_cut

        # 2. blackhole() for (at least) 3 x the heartbeat: silence, no FIN, no RST.
        connects = {k: c.connects for k, c in clients.items()}
        t_bh = time.monotonic()
        amqp_proxy.blackhole()
        # Wait for every client to notice (its connection closed on heartbeat timeout), for up to
        # 10 x the heartbeat so a miss is measured rather than guessed.
        try:
            wait_for(lambda: all(v is not None for v in watch.first_down_after(t_bh).values()), 10 * hb,
                     "every client to notice the black hole", interval=0.02)
        except AssertionError:
            pass
        remaining = 3 * hb - (time.monotonic() - t_bh)
        if remaining > 0:
            time.sleep(remaining)
        detected = watch.first_down_after(t_bh)
        t_restore = time.monotonic()
        amqp_proxy.restore()
        wait_for(lambda: all(c.connects > connects[k] for k, c in clients.items()) and watch.all_up(),
                 20, "every client to reconnect after the black hole")
        reconnect_bh = time.monotonic() - t_restore

        feeder.join(60)
        report = ledger.wait_settled(n, 90)
        ledger.assert_holds(report, expected=n)
        assert report.score_rows == n and not report.dead
        figures = {k: (None if v is None else round(v, 2)) for k, v in detected.items()}
        print(f"REL-05: cut at {at} scores closed {closed} connections, all back in {reconnect_cut:.2f}s; "
              f"black hole detected after {figures} s (heartbeat {hb}s); back {reconnect_bh:.2f}s after restore; "
              f"proxy accepted={amqp_proxy.accepted} dropped={amqp_proxy.bytes_dropped} bytes")
        assert reconnect_cut <= 15 and reconnect_bh <= 20
        missed = {k: v for k, v in detected.items() if v is None or v > 4 * hb}
        assert not missed, (
            f"dead connection not detected within 4 x heartbeat = {4 * hb}s (seconds from black hole to the "
            f"client closing it; None = not within {10 * hb}s): {figures}"
        )
    finally:
        if watch is not None:
            watch.stop()
        feeder.stop()
        gw.stop()
