"""End-to-end benchmark of the spine against raw pika baselines, measured in the same run.

1. raw one hop: pika SelectConnection publisher (persistent, confirms, window 1000) -> quorum queue
   -> pika consumer (prefetch 1000, ack multiple every 100). Throughput (first publish -> last
   message received) and per-message latency.
2. raw two hops: the gateway's topology with no logic. The same publisher -> quorum queue A -> a
   relay thread on one SelectConnection (consume A with prefetch 1000, republish each body to
   quorum queue B with confirms, ack A with multiple=True once the copies are confirmed) -> queue
   B -> the same consumer. The ceiling a well-built gateway is measured against (target 0.6-0.8).
3. gateway, full speed: N rows in a PostgreSQL legacy table -> SQL source -> outbox (PostgreSQL)
   -> relay -> RabbitMQ -> scorer -> scored exchange -> a raw consumer. Throughput (first accept to
   last scored event received) and latency (outbox acceptance -> scored event received).
4. gateway, paced: rows written at a fixed rate with updated_at = commit time; latency from the
   legacy row's timestamp to the scored event received (includes the source's idle poll interval).

For 1-3 (both gateway variants) a CPU split: utime + stime of RabbitMQ, PostgreSQL, each gateway
process (or the one process), the sink and the bench process, sampled from /proc every 0.1 s and
taken over the measurement window only; µs of CPU per event per component, and cores busy.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import signal
import subprocess
import tempfile
from collections.abc import Callable
from typing import Any
import multiprocessing
import json
import os
import statistics
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pika
from sqlalchemy import create_engine, insert, select, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.config import Settings  # noqa: E402
from gateway.runtime import Gateway, tune_process  # noqa: E402
from gateway.store.schema import events as events_table  # noqa: E402
from tests.legacy import META, ORDERS, source_settings  # noqa: E402

AMQP = os.environ.get("GATEWAY_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
PG = os.environ.get("GATEWAY_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


# --------------------------------------------------------------------------- CPU split
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

#: The components of the CPU split, in display order: key -> label.
CPU_COMPONENTS = {
    "rabbitmq": "RabbitMQ (beam.smp)",
    "postgres": "PostgreSQL (all postgres processes)",
    "bench_clients": "bench process: raw publisher and consumer threads (and the relay thread on two hops)",
    "gateway_in_process": "gateway in one process (sources, relay, scorer) + bench driver",
    "role_sources": "gateway process: sources role",
    "role_relay": "gateway process: relay role",
    "role_scorer": "gateway process: scorer role",
    "bench_driver": "bench driver process (per-role variant: only waits for the sink)",
    "sink": "sink consumer process (scored events)",
}
#: The paths with a CPU split: JSON key -> column title.
CPU_PATHS = {
    "raw": "raw one hop",
    "raw_two_hops": "raw two hops",
    "gateway": "gateway, one process",
    "gateway_processes": "gateway, one process per role",
}


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(start time, utime + stime) of a process in clock ticks, or None if it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        rest = data[data.rindex(b")") + 2 :].split()  # fields from the 3rd (state) on
        return int(rest[19]), int(rest[11]) + int(rest[12])
    except (OSError, ValueError, IndexError):
        return None


def _service_of(pid: int) -> str | None:
    """"rabbitmq" for a beam.smp process, "postgres" for a PostgreSQL process, else None."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_bytes().strip()
        if comm == b"beam.smp":
            return "rabbitmq"
        if comm.startswith(b"postgres") or comm == b"postmaster":
            return "postgres"
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
    except OSError:
        return None
    # A backend's process title ("postgres: 15/main: ...") or the server binary's path.
    return "postgres" if argv0.startswith(b"postgres") or os.path.basename(argv0) == b"postgres" else None


def _machine_busy() -> int | None:
    """Busy clock ticks of all CPUs together (/proc/stat: everything but idle and iowait)."""
    try:
        with open("/proc/stat", "rb") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal
    except (OSError, ValueError, IndexError):
        return None


def _interp(points: list[tuple[float, int]], t: float) -> float:
    """A cumulative counter at wall time t, linear between the samples bracketing t (flat outside)."""
    if t <= points[0][0]:
        return points[0][1]
    if t >= points[-1][0]:
        return points[-1][1]
    i = bisect.bisect_right(points, (t, float("inf")))
    (ta, va), (tb, vb) = points[i - 1], points[i]
    return va + (vb - va) * (t - ta) / (tb - ta) if tb > ta else vb


class CpuSampler:
    """Samples utime + stime of the broker, the database and named processes every ``interval`` s.

    A background thread reads /proc/<pid>/stat with a wall-clock timestamp: the RabbitMQ processes
    (beam.smp) and all PostgreSQL processes (re-scanned each time: backends come and go), and the
    processes ``tracked()`` names (component key -> pids; called each time, so pids known only
    later are picked up). ``split(t0, t1, events)`` then gives each component's CPU within the
    wall-clock window [t0, t1] only (interpolated between the samples bracketing it), so start-up
    before the window is excluded. Processes that exit or cannot be read are skipped silently; a
    process first seen after the first sample counts from 0 at its start time. Linux only: elsewhere
    the sampler does nothing and ``split`` returns None.
    """

    available = Path("/proc/self/stat").exists()

    def __init__(self, tracked: Any, interval: float = 0.1) -> None:
        self.tracked = tracked
        self.interval = interval
        self.samples: list[tuple[float, dict[tuple[str, int, int], int], int | None]] = []
        self._services: dict[int, str | None] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._own_cpu = 0.0
        self._own_wall = 0.0
        self.boot = 0.0
        if self.available:
            try:
                self.boot = time.time() - float(Path("/proc/uptime").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                self.available = False

    def start(self) -> CpuSampler:
        if self.available:
            self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(5)
            self._thread = None
            self._sample()  # one sample after the window's end

    def _run(self) -> None:
        c0, w0 = time.thread_time(), time.monotonic()
        while not self._stop.is_set():
            self._sample()
            self._own_cpu, self._own_wall = time.thread_time() - c0, time.monotonic() - w0
            self._stop.wait(self.interval)

    def _pids(self) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        with contextlib.suppress(Exception):  # a component not started yet
            for name, pids in list(self.tracked().items()):
                out += [(name, p) for p in pids if p]
        try:
            present = {int(e) for e in os.listdir("/proc") if e.isdigit()}
        except OSError:
            return out
        for pid in list(self._services):
            if pid not in present:
                del self._services[pid]
        for pid in present:
            if pid not in self._services:
                self._services[pid] = _service_of(pid)
            service = self._services[pid]
            if service is not None:
                out.append((service, pid))
        return out

    def _sample(self) -> None:
        with contextlib.suppress(Exception):  # a measurement aid never fails the run
            procs: dict[tuple[str, int, int], int] = {}
            for name, pid in self._pids():
                st = _proc_stat(pid)
                if st is not None:
                    procs[(name, pid, st[0])] = st[1]
            self.samples.append((time.time(), procs, _machine_busy()))

    def split(self, t0: float, t1: float, events: int) -> dict[str, Any] | None:
        """Each component's CPU within [t0, t1] (wall clock): seconds and µs per event; the totals."""
        if not self.samples or t1 <= t0 or events <= 0:
            return None
        first = self.samples[0][0]
        series: dict[tuple[str, int, int], list[tuple[float, int]]] = {}
        machine: list[tuple[float, int]] = []
        for t, procs, busy in self.samples:
            for key, ticks in procs.items():
                series.setdefault(key, []).append((t, ticks))
            if busy is not None:
                machine.append((t, busy))
        cpu: dict[str, float] = {}
        for (name, _pid, start), points in series.items():
            started = self.boot + start / CLK_TCK
            if first < started < points[0][0]:  # started while sampling: count from 0 at its start
                points.insert(0, (started, 0))
            cpu[name] = cpu.get(name, 0.0) + max(0.0, _interp(points, t1) - _interp(points, t0)) / CLK_TCK
        window = t1 - t0
        order = [k for k in CPU_COMPONENTS if k in cpu] + [k for k in cpu if k not in CPU_COMPONENTS]
        total = sum(cpu.values())
        own = self._own_cpu / self._own_wall * window if self._own_wall > 0 else None
        return {
            "window_s": window,
            "events": events,
            "interval_s": self.interval,
            "samples": len(self.samples),
            "components": {k: {"label": CPU_COMPONENTS.get(k, k), "cpu_s": cpu[k], "us_per_event": cpu[k] / events * 1e6}
                           for k in order},
            "total_cpu_s": total,
            "total_us_per_event": total / events * 1e6,
            "cores_busy": total / window,
            "machine_cores_busy": ((_interp(machine, t1) - _interp(machine, t0)) / CLK_TCK / window)
            if len(machine) >= 2 else None,
            "sampler_us_per_event": own / events * 1e6 if own is not None else None,
        }


def cpu_table(cpu: dict[str, dict[str, Any] | None]) -> list[str]:
    """The CPU split as a markdown table: component x path, µs of CPU per event."""
    paths = [p for p in CPU_PATHS if cpu.get(p)]
    if not paths:
        return []
    comps: dict[str, str] = {}
    for p in paths:
        for k, c in cpu[p]["components"].items():  # type: ignore[index]
            comps.setdefault(k, c["label"])
    comps = {k: comps[k] for k in [*CPU_COMPONENTS, *comps] if k in comps}
    lines = ["| component (µs of CPU per event) | " + " | ".join(CPU_PATHS[p] for p in paths) + " |",
             "|---|" + "---:|" * len(paths)]
    for k, label in comps.items():
        cells = [cpu[p]["components"].get(k) for p in paths]  # type: ignore[index]
        lines.append(f"| {label} | " + " | ".join("-" if c is None else f"{c['us_per_event']:,.1f}" for c in cells) + " |")

    def row(title: str, key: str, fmt: str) -> str:
        vals = [cpu[p].get(key) for p in paths]  # type: ignore[union-attr]
        return f"| {title} | " + " | ".join("-" if v is None else format(v, fmt) for v in vals) + " |"

    lines += [
        row("**total**", "total_us_per_event", ",.1f"),
        row("cores busy (total CPU / window)", "cores_busy", ".2f"),
        row("machine-wide cores busy (/proc/stat, every process)", "machine_cores_busy", ".2f"),
        row("window (s)", "window_s", ".2f"),
        row("events", "events", ","),
        row("of the bench/gateway process: the sampler thread itself", "sampler_us_per_event", ".1f"),
    ]
    return lines


# --------------------------------------------------------------------------- raw pika
def _raw_publish(queue: str, n: int, pad: str, t_first: list[float]) -> None:
    """Publish n persistent messages to queue with confirms in flight (window 1000); t_first gets the start."""
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


def _raw_consume(queue: str, n: int, latencies: list[float], last: list[float]) -> None:
    """Consume up to n messages (prefetch 1000, ack multiple every 100); latencies and the last arrival."""
    conn = pika.BlockingConnection(pika.URLParameters(AMQP))
    c = conn.channel()
    c.basic_qos(prefetch_count=1000)
    count = 0
    for method, _props, body in c.consume(queue, inactivity_timeout=30):
        if method is None:
            break
        now = time.perf_counter()
        latencies.append(now - json.loads(body)["t"])
        last[:] = [now]
        count += 1
        if count % 100 == 0 or count == n:
            c.basic_ack(method.delivery_tag, multiple=True)
        if count == n:
            break
    c.cancel()
    conn.close()


def _raw_result(name: str, n: int, latencies: list[float], t_first: list[float], last: list[float],
                sampler: CpuSampler) -> tuple[float, list[float], dict[str, Any] | None]:
    """Events/s from the first publish to the last message received, and the CPU split of that window."""
    got = len(latencies)
    if got < n:
        print(f"WARNING: {name}: received {got} of {n} messages", file=sys.stderr)
    if not t_first or not last:
        return 0.0, latencies, None
    wall = time.time() - time.perf_counter()  # perf_counter -> wall clock (the sampler's clock)
    return got / (last[0] - t_first[0]), latencies, sampler.split(t_first[0] + wall, last[0] + wall, got)


def _raw_relay(src: str, dst: str, ready: threading.Event, ctl: dict[str, Any]) -> None:
    """Consume src (prefetch 1000, manual ack) and republish each body to dst with confirms, on ONE
    SelectConnection. The src deliveries are acked (multiple) only once the confirms of their copies
    arrived: the highest src tag whose copies, and those of every earlier tag, are all confirmed. A
    nacked copy is published again. The prefetch bounds the copies in flight (the confirm window) at 1000.
    """
    props = pika.BasicProperties(delivery_mode=2)
    copies: OrderedDict[int, tuple[int, bytes]] = OrderedDict()  # publish seq -> (src tag, body)
    order: deque[int] = deque()  # src delivery tags not acked yet, in delivery order
    confirmed: set[int] = set()  # src tags whose copy is confirmed, not acked yet
    seq = [0]

    def republish(channel, tag: int, body: bytes) -> None:  # type: ignore[no-untyped-def]
        channel.basic_publish("", dst, body, props)
        seq[0] += 1
        copies[seq[0]] = (tag, body)

    def on_message(channel, method, _props, body) -> None:  # type: ignore[no-untyped-def]
        order.append(method.delivery_tag)
        republish(channel, method.delivery_tag, body)

    def on_confirm(frame) -> None:  # type: ignore[no-untyped-def]
        m = frame.method
        channel = ctl["channel"]
        if m.multiple:
            settled = []
            while copies and next(iter(copies)) <= m.delivery_tag:
                settled.append(copies.popitem(last=False)[1])
        else:
            settled = [copies.pop(m.delivery_tag)] if m.delivery_tag in copies else []
        if m.NAME == "Basic.Nack":
            ctl["nacked"] += len(settled)
            for tag, body in settled:
                republish(channel, tag, body)
            return
        confirmed.update(tag for tag, _ in settled)
        top = None
        while order and order[0] in confirmed:
            top = order.popleft()
            confirmed.discard(top)
            ctl["acked"] += 1
        if top is not None:
            channel.basic_ack(top, multiple=True)

    def on_channel(channel) -> None:  # type: ignore[no-untyped-def]
        ctl["channel"] = channel
        channel.confirm_delivery(on_confirm, lambda _f: channel.basic_qos(
            prefetch_count=1000,
            callback=lambda _f: channel.basic_consume(src, on_message, callback=lambda _f: ready.set()),
        ))

    conn = pika.SelectConnection(
        pika.URLParameters(AMQP),
        on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
        on_open_error_callback=lambda c, _e: c.ioloop.stop(),
        on_close_callback=lambda c, _reason: c.ioloop.stop(),
    )
    ctl["conn"] = conn
    conn.ioloop.start()


def raw_round_trip(n: int, size: int = 1024) -> tuple[float, list[float], dict[str, Any] | None]:
    """Publish n persistent messages with confirms in flight while consuming with manual acks."""
    return _raw_path(n, size, hops=1)


def raw_two_hops(n: int, size: int = 1024) -> tuple[float, list[float], dict[str, Any] | None]:
    """The gateway's topology with no logic: publisher -> quorum queue A -> relay -> quorum queue B -> consumer.

    Publisher and consumer as in raw_round_trip; the relay in its own thread (``_raw_relay``).
    Throughput: first publish to last message received from B; latency: publish -> received from B.
    """
    return _raw_path(n, size, hops=2)


def _raw_path(n: int, size: int, hops: int) -> tuple[float, list[float], dict[str, Any] | None]:
    """One raw path: publisher -> quorum queue [-> relay -> quorum queue] -> consumer (``hops`` 1 or 2)."""
    tag = uuid.uuid4().hex[:8]
    queues = [f"bench-raw{hops}-{tag}-{i}" for i in range(hops)]
    setup = pika.BlockingConnection(pika.URLParameters(AMQP))
    ch = setup.channel()
    for q in queues:
        ch.queue_declare(q, durable=True, arguments={"x-queue-type": "quorum"})
    pad = "x" * max(0, size - 60)
    latencies: list[float] = []
    t_first: list[float] = []
    last: list[float] = []
    sampler = CpuSampler(lambda: {"bench_clients": [os.getpid()]}).start()
    ctl: dict[str, Any] = {"acked": 0, "nacked": 0}
    rt: threading.Thread | None = None
    if hops == 2:
        ready = threading.Event()
        rt = threading.Thread(target=_raw_relay, args=(queues[0], queues[1], ready, ctl), daemon=True)
        rt.start()
        if not ready.wait(30):
            print("WARNING: raw two hops: the relay did not start consuming within 30 s", file=sys.stderr)
    ct = threading.Thread(target=_raw_consume, args=(queues[-1], n, latencies, last))
    ct.start()
    time.sleep(0.3)
    pt = threading.Thread(target=_raw_publish, args=(queues[0], n, pad, t_first))
    pt.start()
    pt.join()
    ct.join(120)
    if rt is not None:
        # The relay acks its last deliveries once their confirms arrive, right after the consumer got them.
        deadline = time.monotonic() + 10
        while ctl["acked"] < n and rt.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
    sampler.stop()
    if rt is not None:
        conn = ctl.get("conn")
        if conn is not None and rt.is_alive():
            conn.ioloop.add_callback_threadsafe(lambda: conn.close() if conn.is_open else None)
        rt.join(10)
        if ctl["acked"] < n:
            print(f"WARNING: raw two hops: the relay acked {ctl['acked']} of {n} deliveries", file=sys.stderr)
        if ctl["nacked"]:
            print(f"WARNING: raw two hops: {ctl['nacked']} copies nacked by the broker (published again)",
                  file=sys.stderr)
    for q in queues:
        ch.queue_delete(q)
    setup.close()
    return _raw_result(CPU_PATHS["raw" if hops == 1 else "raw_two_hops"], n, latencies, t_first, last, sampler)


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

    def start(self, n: int, timeout: float, linger: float = 0.0) -> None:
        self._proc = multiprocessing.Process(target=_drain, args=(self.queue, n, timeout, self._out, linger),
                                             daemon=True)
        self._proc.start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

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


def _drain(queue: str, n: int, timeout: float, out: multiprocessing.Queue, linger: float = 0.0) -> None:  # type: ignore[type-arg]
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
    time.sleep(linger)  # stay alive a while, so that a CPU sampler sees this process after its last event


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

    roles = ("scorer", "relay", "sources")

    def pids(self) -> dict[str, list[int]]:
        """CPU split components: role_<role> -> [pid]."""
        return {f"role_{role}": [p.pid] for role, p in zip(self.roles, self.procs, strict=False)}

    def start(self) -> None:
        exe = Path(sys.executable).with_name("gateway")
        for role in self.roles:
            self.procs.append(subprocess.Popen(
                [str(exe), "worker", "--role", role, "-c", str(self.config), "--log-level", "warning"]
            ))

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            p.wait(30)


def gateway_full_speed(n: int, processes: bool = False) -> tuple[float, list[float], dict[str, Any] | None]:
    db_url, handle = fresh_database()
    engine = create_engine(db_url)
    load_rows(engine, n)
    prefix = "bench-" + uuid.uuid4().hex[:8]
    sink = Sink(prefix)
    sink.start(n, timeout=60, linger=0.3)
    settings = settings_for(db_url, prefix, 0.05)
    me = os.getpid()
    if processes:
        from gateway.store import make_engine
        from gateway.store.migrate import upgrade

        upgrade(make_engine(db_url))
        gw: Any = RoleProcesses(settings, Path(tempfile.mkdtemp()))
    else:
        gw = Gateway(settings, roles=["sources", "relay", "scorer"])

    def tracked() -> dict[str, list[int | None]]:
        if processes:
            return {**gw.pids(), "sink": [sink.pid], "bench_driver": [me]}
        return {"gateway_in_process": [me], "sink": [sink.pid]}

    # Started after the sink's fork (no fork with the sampler's thread running); the role processes
    # are picked up as soon as they exist. Their start-up falls before the window and is excluded.
    sampler = CpuSampler(tracked).start()
    gw.start()
    if not processes:
        tune_process(settings.process)  # as `gateway run` does after start-up (the roles do it themselves)
    try:
        sink.wait()
    finally:
        sampler.stop()
        gw.stop()
    with engine.connect() as c:
        accepted = {r.id: r.accepted_at for r in c.execute(select(events_table.c.id, events_table.c.accepted_at))}
    # From the first acceptance (process start-up excluded) to the last scored event received.
    t0, t1 = min(a.timestamp() for a in accepted.values()), max(sink.received.values())
    elapsed = t1 - t0
    lat = [sink.received[i] - accepted[i].timestamp() for i in sink.received if i in accepted]
    got = len(sink.received)
    cpu = sampler.split(t0, t1, got)
    sink.close()
    engine.dispose()
    drop_database(handle)
    if got != n:
        print(f"WARNING: received {got} of {n} scored events")
    return got / elapsed, lat, cpu


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
        tune_process(settings.process)
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
    ap.add_argument("--rounds", type=int, default=1,
                    help="full-speed rounds (each runs the four full-speed paths back to back, the order "
                         "reversed every other round); the figures are the median round's, the ratios the "
                         "median of the per-round ratios")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = ap.parse_args()

    paths: dict[str, tuple[str, Callable[[], tuple[float, list[float], dict[str, Any] | None]]]] = {
        "raw": ("raw pika round trip", lambda: raw_round_trip(args.events)),
        "raw_two_hops": ("raw pika, two hops through a relay", lambda: raw_two_hops(args.events)),
        "gateway": ("gateway at full speed", lambda: gateway_full_speed(args.events)),
        "gateway_processes": ("gateway, one process per role",
                              lambda: gateway_full_speed(args.events, processes=True)),
    }
    results: dict[str, list[tuple[float, list[float], dict[str, Any] | None]]] = {k: [] for k in paths}
    for r in range(max(1, args.rounds)):
        order = list(paths) if r % 2 == 0 else list(reversed(paths))
        for key in order:
            label, run = paths[key]
            print(f"round {r + 1}: {label} ...", file=sys.stderr, flush=True)
            results[key].append(run())

    def median_round(key: str) -> tuple[float, list[float], dict[str, Any] | None]:
        runs = sorted(results[key], key=lambda x: x[0])
        return runs[(len(runs) - 1) // 2]

    def per_round_ratio(a: str, b: str) -> float | None:
        values = [x[0] / y[0] for x, y in zip(results[a], results[b]) if y[0]]
        return statistics.median(values) if values else None

    raw_rate, raw_lat, raw_cpu = median_round("raw")
    two_rate, two_lat, two_cpu = median_round("raw_two_hops")
    gw_rate, gw_lat, gw_cpu = median_round("gateway")
    mp_rate, mp_lat, mp_cpu = median_round("gateway_processes")
    print("gateway paced ...", file=sys.stderr, flush=True)
    paced = gateway_paced(args.paced_rate, args.paced_seconds)
    print("gateway paced, one process per role ...", file=sys.stderr, flush=True)
    paced_mp = gateway_paced(args.paced_rate, args.paced_seconds, processes=True)
    cpu = {"raw": raw_cpu, "raw_two_hops": two_cpu, "gateway": gw_cpu, "gateway_processes": mp_cpu}
    ms = 1000.0

    def lat_cells(lat: list[float]) -> str:
        return f"{statistics.median(lat) * ms:.1f} | {pct(lat, 99) * ms:.1f}" if lat else "- | -"

    rounds = len(results["raw"])
    ratios = {
        "ratio": per_round_ratio("gateway", "raw"),
        "ratio_processes": per_round_ratio("gateway_processes", "raw"),
        "ratio_two_hops": per_round_ratio("gateway", "raw_two_hops"),
        "ratio_two_hops_processes": per_round_ratio("gateway_processes", "raw_two_hops"),
        "two_hops_over_one_hop": per_round_ratio("raw_two_hops", "raw"),
    }

    def r2(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    print(f"\n## End-to-end benchmark ({args.events} events, {rounds} round(s), {time.strftime('%Y-%m-%d %H:%M')})\n")
    if rounds > 1:
        print("Full-speed rows: the median round of each path; ratios: the median of the per-round ratios "
              "(each round runs every path back to back).\n")
    print("| path | events/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|")
    print(f"| raw pika: publish (confirms, window 1000) -> quorum queue -> consume (ack/100) | {raw_rate:,.0f} | {lat_cells(raw_lat)} |")
    print(f"| raw pika, two hops: publish -> quorum queue A -> relay (consume, republish with confirms, ack A after the confirms) -> quorum queue B -> consume | {two_rate:,.0f} | {lat_cells(two_lat)} |")
    print(f"| gateway: PG table -> outbox -> relay -> RabbitMQ -> scorer -> scored exchange | {gw_rate:,.0f} | {lat_cells(gw_lat)} |")
    print(f"| same, one process per role (sources, relay, scorer) | {mp_rate:,.0f} | {lat_cells(mp_lat)} |")
    print(f"| gateway paced at {args.paced_rate}/s, row commit -> scored event received | {len(paced) / args.paced_seconds:,.0f} | {lat_cells(paced)} |")
    print(f"| same, one process per role | {len(paced_mp) / args.paced_seconds:,.0f} | {lat_cells(paced_mp)} |")
    print(f"\nratio gateway / raw round trip (throughput): **{r2(ratios['ratio'])}** in one process, "
          f"**{r2(ratios['ratio_processes'])}** with one process per role (goal >= 0.5)")
    print(f"\nratio gateway / raw two-hop relay (throughput): **{r2(ratios['ratio_two_hops'])}** in one process, "
          f"**{r2(ratios['ratio_two_hops_processes'])}** with one process per role (design target 0.6-0.8)")
    print(f"\nraw two hops / raw one hop: **{r2(ratios['two_hops_over_one_hop'])}** (the topology's own ceiling "
          "against the one-hop goal of 0.5)")
    if rounds > 1:
        print("\nevents/s per round: " + "; ".join(
            f"{k} " + ", ".join(f"{x[0]:,.0f}" for x in results[k]) for k in paths))
    table = cpu_table(cpu)
    if table:
        print("\n### Where the CPU goes (measurement window only: first publish or acceptance -> last received)\n")
        print("\n".join(table))
        print("\nPer process: utime + stime from /proc/<pid>/stat, sampled every 0.1 s, interpolated to the "
              "window. In the one-process variant the gateway's row also holds the bench driver (it only "
              "waits for the sink) and the sampler thread.")
    else:
        print("\n(CPU split omitted: needs Linux /proc)")
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
            **ratios,
            "raw_two_hops": figures(two_rate, two_lat),
            "rounds": {k: [x[0] for x in results[k]] for k in paths},
            "cpu": cpu,
            "cpu_components": CPU_COMPONENTS,
            "cpu_paths": CPU_PATHS,
        }, indent=2))

if __name__ == "__main__":
    main()
