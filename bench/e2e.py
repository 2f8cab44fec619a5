"""End-to-end benchmark of the spine against the raw pika round trip, measured in the same run.

1. raw: pika SelectConnection publisher (persistent, confirms, window 1000) -> quorum queue ->
   pika consumer (prefetch 1000, ack multiple every 100). Throughput and per-message latency.
2. gateway, full speed: N rows in a PostgreSQL legacy table -> SQL source -> outbox (PostgreSQL)
   -> relay -> RabbitMQ -> scorer -> scored exchange -> a raw consumer. Throughput (first accept to
   last scored event received) and latency (outbox acceptance -> scored event received).
3. gateway, paced: rows written at a fixed rate with updated_at = commit time; latency from the
   legacy row's timestamp to the scored event received (includes the source's idle poll interval).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import tempfile
from typing import Any
import multiprocessing
import json
import os
import statistics
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pika
from sqlalchemy import create_engine, insert, select, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.config import Settings  # noqa: E402
from gateway.runtime import Gateway  # noqa: E402
from gateway.store.schema import events as events_table  # noqa: E402
from tests.legacy import META, ORDERS, source_settings  # noqa: E402

AMQP = os.environ.get("GATEWAY_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
PG = os.environ.get("GATEWAY_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


# --------------------------------------------------------------------------- raw pika
def raw_round_trip(n: int, size: int = 1024) -> tuple[float, list[float]]:
    """Publish n persistent messages with confirms in flight while consuming with manual acks."""
    queue = "bench-raw-" + uuid.uuid4().hex[:8]
    setup = pika.BlockingConnection(pika.URLParameters(AMQP))
    ch = setup.channel()
    ch.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    pad = "x" * max(0, size - 60)
    latencies: list[float] = []
    done = threading.Event()
    t_first: list[float] = []

    def consume() -> None:
        conn = pika.BlockingConnection(pika.URLParameters(AMQP))
        c = conn.channel()
        c.basic_qos(prefetch_count=1000)
        count = 0
        for method, _props, body in c.consume(queue, inactivity_timeout=30):
            if method is None:
                break
            now = time.perf_counter()
            latencies.append(now - json.loads(body)["t"])
            count += 1
            if count % 100 == 0 or count == n:
                c.basic_ack(method.delivery_tag, multiple=True)
            if count == n:
                break
        c.cancel()
        conn.close()
        done.set()

    def publish() -> None:
        params = pika.URLParameters(AMQP)
        state = {"sent": 0, "acked": 0, "outstanding": 0}
        window = 1000

        def pump(channel) -> None:  # type: ignore[no-untyped-def]
            while state["sent"] < n and state["outstanding"] < window:
                body = json.dumps({"i": state["sent"], "t": time.perf_counter(), "pad": pad})
                channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2))
                state["sent"] += 1
                state["outstanding"] += 1

        def on_open(conn) -> None:  # type: ignore[no-untyped-def]
            conn.channel(on_open_callback=on_channel)

        def on_channel(channel) -> None:  # type: ignore[no-untyped-def]
            acked_tag = {"t": 0}

            def on_confirm(frame) -> None:  # type: ignore[no-untyped-def]
                tag = frame.method.delivery_tag
                k = tag - acked_tag["t"] if frame.method.multiple else 1
                acked_tag["t"] = max(acked_tag["t"], tag)
                state["acked"] += k
                state["outstanding"] -= k
                if state["acked"] >= n:
                    channel.connection.close()
                else:
                    pump(channel)

            channel.confirm_delivery(on_confirm, lambda *_: pump(channel))
            t_first.append(time.perf_counter())
            pump(channel)

        conn = pika.SelectConnection(
            params, on_open_callback=on_open, on_close_callback=lambda c, _reason: c.ioloop.stop()
        )
        conn.ioloop.start()

    ct = threading.Thread(target=consume)
    ct.start()
    time.sleep(0.3)
    pt = threading.Thread(target=publish)
    pt.start()
    pt.join()
    done.wait(120)
    elapsed = time.perf_counter() - t_first[0]
    ch.queue_delete(queue)
    setup.close()
    return n / elapsed, latencies


# --------------------------------------------------------------------------- gateway
def fresh_database() -> tuple[str, object]:
    url = make_url(PG)
    name = "gw_bench_" + uuid.uuid4().hex[:8]
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f"CREATE DATABASE {name}"))
    return url.set(database=name).render_as_string(hide_password=False), (admin, name)


def drop_database(handle: object) -> None:
    admin, name = handle  # type: ignore[misc]
    with admin.connect() as c:  # type: ignore[attr-defined]
        c.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


class Sink:
    """A queue consumer of scored events in its own process (as real consumers are)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        conn = pika.BlockingConnection(pika.URLParameters(AMQP))
        ch = conn.channel()
        self.queue = f"{prefix}.bench-sink"
        ch.exchange_declare(f"{prefix}.scored", "topic", durable=True)
        ch.queue_declare(self.queue, durable=True, arguments={"x-queue-type": "quorum"})
        ch.queue_bind(self.queue, f"{prefix}.scored", "#")
        conn.close()
        self.received: dict[str, float] = {}
        self.event_time: dict[str, datetime] = {}
        self._proc: multiprocessing.Process | None = None
        self._out = multiprocessing.Queue()

    def start(self, n: int, timeout: float) -> None:
        self._proc = multiprocessing.Process(target=_drain, args=(self.queue, n, timeout, self._out), daemon=True)
        self._proc.start()

    def wait(self) -> None:
        received, times = self._out.get()
        self._proc.join()  # type: ignore[union-attr]
        self.received = received
        self.event_time = {k: datetime.fromisoformat(v.replace("Z", "+00:00")) for k, v in times.items()}

    def close(self) -> None:
        conn = pika.BlockingConnection(pika.URLParameters(AMQP))
        ch = conn.channel()
        for q in ("bench-sink", "scoring", "dead"):
            ch.queue_delete(f"{self.prefix}.{q}")
        for x in ("events", "scored", "dlx"):
            ch.exchange_delete(f"{self.prefix}.{x}")
        conn.close()


def _drain(queue: str, n: int, timeout: float, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    conn = pika.BlockingConnection(pika.URLParameters(AMQP))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=1000)
    received: dict[str, float] = {}
    times: dict[str, str] = {}
    count = 0
    for method, _p, body in ch.consume(queue, inactivity_timeout=timeout):
        if method is None:
            break
        now = time.time()
        ev = json.loads(body)["data"]["event"]
        received.setdefault(ev["id"], now)
        times[ev["id"]] = ev["time"]
        count += 1
        done = len(received) >= n
        if count % 100 == 0 or done:
            ch.basic_ack(method.delivery_tag, multiple=True)
        if done:
            break
    ch.cancel()
    conn.close()
    out.put((received, times))


def settings_for(db_url: str, prefix: str, interval: float) -> Settings:
    src = source_settings(db_url, batch_size=2000)
    src["interval"] = interval
    return Settings(
        profile="test",
        store={"url": db_url, "pool_size": 8},
        bus={"url": AMQP, "prefix": prefix},
        relay={"batch_size": 1000, "in_flight_batches": 3, "idle_wait": 0.01},
        scoring={"warmup": 50, "batch_max": 200, "batch_linger_ms": 10},
        sources=[src],
    )


def load_rows(engine, n: int) -> None:  # type: ignore[no-untyped-def]
    META.drop_all(engine)
    META.create_all(engine)
    t0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
    rows = [
        {"id": i, "customer": f"C{i % 97:04d}", "amount": f"{i % 1000}.25", "status": "NEW",
         "updated_at": (t0 + timedelta(microseconds=i * 10)).replace(tzinfo=None)}
        for i in range(1, n + 1)
    ]
    with engine.begin() as c:
        for k in range(0, n, 10000):
            c.execute(insert(ORDERS), rows[k : k + 10000])
        c.execute(text("CREATE INDEX IF NOT EXISTS legacy_orders_cursor ON legacy_orders (updated_at, id)"))


class RoleProcesses:
    """``gateway worker --role X`` for sources, relay and scorer: one process per role."""

    def __init__(self, settings: Settings, workdir: Path) -> None:
        import yaml

        data = settings.model_dump(mode="json")
        data["store"]["url"] = settings.store.url.get_secret_value()
        data["bus"]["url"] = settings.bus.url.get_secret_value() if settings.bus.url else None
        self.config = workdir / "gateway.yaml"
        self.config.write_text(yaml.safe_dump(data))
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        exe = Path(sys.executable).with_name("gateway")
        for role in ("scorer", "relay", "sources"):
            self.procs.append(subprocess.Popen(
                [str(exe), "worker", "--role", role, "-c", str(self.config), "--log-level", "warning"]
            ))

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            p.wait(30)


def gateway_full_speed(n: int, processes: bool = False) -> tuple[float, list[float]]:
    db_url, handle = fresh_database()
    engine = create_engine(db_url)
    load_rows(engine, n)
    prefix = "bench-" + uuid.uuid4().hex[:8]
    sink = Sink(prefix)
    sink.start(n, timeout=60)
    settings = settings_for(db_url, prefix, 0.05)
    if processes:
        from gateway.store import make_engine
        from gateway.store.migrate import upgrade

        upgrade(make_engine(db_url))
        gw: Any = RoleProcesses(settings, Path(tempfile.mkdtemp()))
    else:
        gw = Gateway(settings, roles=["sources", "relay", "scorer"])
    gw.start()
    try:
        sink.wait()
    finally:
        gw.stop()
    with engine.connect() as c:
        accepted = {r.id: r.accepted_at for r in c.execute(select(events_table.c.id, events_table.c.accepted_at))}
    # From the first acceptance (process start-up excluded) to the last scored event received.
    elapsed = max(sink.received.values()) - min(a.timestamp() for a in accepted.values())
    lat = [sink.received[i] - accepted[i].timestamp() for i in sink.received if i in accepted]
    got = len(sink.received)
    sink.close()
    engine.dispose()
    drop_database(handle)
    if got != n:
        print(f"WARNING: received {got} of {n} scored events")
    return got / elapsed, lat


def gateway_paced(rate: int, seconds: float, processes: bool = False) -> list[float]:
    db_url, handle = fresh_database()
    engine = create_engine(db_url)
    load_rows(engine, 0)
    prefix = "bench-" + uuid.uuid4().hex[:8]
    sink = Sink(prefix)
    total = int(rate * seconds)
    sink.start(total, timeout=30)
    settings = settings_for(db_url, prefix, 0.01)
    if processes:
        from gateway.store import make_engine
        from gateway.store.migrate import upgrade

        upgrade(make_engine(db_url))
        gw: Any = RoleProcesses(settings, Path(tempfile.mkdtemp()))
        gw.start()
        time.sleep(3)  # let the role processes start before the clock runs
    else:
        gw = Gateway(settings, roles=["sources", "relay", "scorer"])
        gw.start()
    stop = threading.Event()

    def writer() -> None:
        tick = 0.01
        per_tick = max(1, int(rate * tick))
        i = 1
        start = time.perf_counter()
        while i <= total and not stop.is_set():
            now = datetime.now(timezone.utc).replace(tzinfo=None)
            with engine.begin() as c:
                c.execute(insert(ORDERS), [
                    {"id": j, "customer": f"C{j % 97:04d}", "amount": f"{j % 1000}.25", "status": "NEW", "updated_at": now}
                    for j in range(i, min(total, i + per_tick - 1) + 1)
                ])
            i += per_tick
            next_at = start + (i - 1) / rate
            time.sleep(max(0.0, next_at - time.perf_counter()))

    wt = threading.Thread(target=writer)
    wt.start()
    try:
        sink.wait()
    finally:
        stop.set()
        wt.join()
        gw.stop()
    lat = [sink.received[i] - sink.event_time[i].timestamp() for i in sink.received]
    sink.close()
    engine.dispose()
    drop_database(handle)
    return lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--paced-rate", type=int, default=1000)
    ap.add_argument("--paced-seconds", type=float, default=10.0)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = ap.parse_args()

    print("raw pika round trip ...", file=sys.stderr, flush=True)
    raw_rate, raw_lat = raw_round_trip(args.events)
    print("gateway at full speed ...", file=sys.stderr, flush=True)
    gw_rate, gw_lat = gateway_full_speed(args.events)
    print("gateway, one process per role ...", file=sys.stderr, flush=True)
    mp_rate, mp_lat = gateway_full_speed(args.events, processes=True)
    print("gateway paced ...", file=sys.stderr, flush=True)
    paced = gateway_paced(args.paced_rate, args.paced_seconds)
    print("gateway paced, one process per role ...", file=sys.stderr, flush=True)
    paced_mp = gateway_paced(args.paced_rate, args.paced_seconds, processes=True)
    ms = 1000.0
    print(f"\n## End-to-end benchmark ({args.events} events, {time.strftime('%Y-%m-%d %H:%M')})\n")
    print("| path | events/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|")
    print(f"| raw pika: publish (confirms, window 1000) -> quorum queue -> consume (ack/100) | {raw_rate:,.0f} | {statistics.median(raw_lat) * ms:.1f} | {pct(raw_lat, 99) * ms:.1f} |")
    print(f"| gateway: PG table -> outbox -> relay -> RabbitMQ -> scorer -> scored exchange | {gw_rate:,.0f} | {statistics.median(gw_lat) * ms:.1f} | {pct(gw_lat, 99) * ms:.1f} |")
    print(f"| same, one process per role (sources, relay, scorer) | {mp_rate:,.0f} | {statistics.median(mp_lat) * ms:.1f} | {pct(mp_lat, 99) * ms:.1f} |")
    print(f"| gateway paced at {args.paced_rate}/s, row commit -> scored event received | {len(paced) / args.paced_seconds:,.0f} | {statistics.median(paced) * ms:.1f} | {pct(paced, 99) * ms:.1f} |")
    print(f"| same, one process per role | {len(paced_mp) / args.paced_seconds:,.0f} | {statistics.median(paced_mp) * ms:.1f} | {pct(paced_mp, 99) * ms:.1f} |")
    print(f"\nratio gateway / raw round trip (throughput): **{gw_rate / raw_rate:.2f}** in one process, "
          f"**{mp_rate / raw_rate:.2f}** with one process per role")
    if args.json:
        def figures(rate: float, lat: list[float], received: int | None = None) -> dict[str, Any]:
            return {"events_per_s": rate, "p50_ms": statistics.median(lat) * ms if lat else None,
                    "p99_ms": pct(lat, 99) * ms if lat else None, "received": len(lat) if received is None else received}

        paced_fig = [figures(len(lat) / args.paced_seconds, lat) for lat in (paced, paced_mp)]
        args.json.write_text(json.dumps({
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "args": {**vars(args), "json": str(args.json)},
            "raw": figures(raw_rate, raw_lat),
            "gateway": figures(gw_rate, gw_lat),
            "gateway_processes": figures(mp_rate, mp_lat),
            "paced": paced_fig[0],
            "paced_processes": paced_fig[1],
            "ratio": gw_rate / raw_rate,
            "ratio_processes": mp_rate / raw_rate,
        }, indent=2))


if __name__ == "__main__":
    main()
