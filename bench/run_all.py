"""Run every benchmark in bench/ and write one markdown report of figures and ratios.

Each benchmark runs as a subprocess of this interpreter with ``--json``; the runner reads the JSON
and writes the report (default ``docs/performance.md``): machine facts, per benchmark its figures
and its ratio to the raw baseline or the peer measured in the same run, and a summary table of the
ratios with their goals. A benchmark that fails (exit code, timeout, no JSON) is reported as failed
with the tail of its stderr; the runner goes on with the next one.

    python bench/run_all.py                    # full mode: the documented sizes (10-20 minutes)
    python bench/run_all.py --quick --out /tmp/perf.md   # smoke run: small sizes, about 2 minutes
    python bench/run_all.py --only e2e soap --lock /tmp/gw-services.lock

``--lock PATH`` holds an exclusive ``flock`` on PATH while each benchmark runs, as ``flock PATH cmd``
would (the services are shared with other test runs on this machine); the wait is reported.
``--render-only --json-dir DIR`` rewrites the report from the results a run left in DIR. A section of the existing report between ``<!-- notes:begin -->`` and
``<!-- notes:end -->`` (a hand-written interpretation) is kept when the report is rewritten.
Not part of the test suite: the benchmarks measure speed, the tests never do.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
AMQP = os.environ.get("GATEWAY_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
PG = os.environ.get("GATEWAY_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
NOTES_BEGIN, NOTES_END = "<!-- notes:begin -->", "<!-- notes:end -->"


# --------------------------------------------------------------------------- what to run
@dataclass
class Bench:
    name: str
    script: str
    title: str
    full: list[str]
    quick: list[str]


BENCHES = [
    Bench("e2e", "e2e.py", "End to end: PostgreSQL table -> outbox -> RabbitMQ -> scorer -> scored exchange",
          ["--events", "50000", "--rounds", "3", "--paced-rate", "1000", "--paced-seconds", "10"],
          ["--events", "5000", "--paced-rate", "500", "--paced-seconds", "3"]),
    Bench("scorer", "scorer_throughput.py", "Scorer role against a FastStream scorer",
          ["--events", "10000", "--rounds", "2"],
          ["--events", "1000", "--rounds", "1"]),
    Bench("sql", "sql.py", "SQL extraction into the outbox against raw SQLAlchemy and dlt",
          ["--rows", "1000000", "--batch", "5000", "--dlt"],
          ["--rows", "50000", "--batch", "5000", "--dlt"]),
    Bench("soap", "soap.py", "SOAP adapter against a raw zeep call",
          ["--page", "100", "--rounds", "60"],
          ["--page", "100", "--rounds", "10"]),
    Bench("soap-canned", "soap.py", "SOAP adapter against raw zeep, one recorded response (`--canned`)",
          ["--page", "100", "--rounds", "60", "--canned"],
          ["--page", "100", "--rounds", "10", "--canned"]),
    Bench("quality", "scoring_quality.py", "Built-in model against IsolationForest, and its speed on one core",
          ["--events", "100000", "--speed-rounds", "3"],
          ["--events", "20000", "--speed-rounds", "1"]),
]


@dataclass
class Outcome:
    bench: Bench
    argv: list[str]
    seconds: float = 0.0
    returncode: int | None = None
    data: dict[str, Any] | None = None
    stdout: str = ""
    stderr: str = ""
    error: str | None = None
    lock_wait: float = 0.0


@dataclass
class Ratio:
    what: str
    value: float | None
    goal: str
    met: bool | None  # None: no goal
    note: str = ""


@dataclass
class Section:
    lines: list[str] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)


def run_bench(b: Bench, quick: bool, workdir: Path, lock: str | None, timeout: float) -> Outcome:
    out_json = workdir / f"{b.name}.json"
    out_json.unlink(missing_ok=True)
    argv = [sys.executable, str(BENCH / b.script), *(b.quick if quick else b.full), "--json", str(out_json)]
    o = Outcome(b, argv)
    print(f"[run_all] {b.name}: {' '.join(argv)}", file=sys.stderr, flush=True)
    with _locked(lock) as waited:
        o.lock_wait = waited
        t = time.monotonic()
        try:
            proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
            o.returncode, o.stdout, o.stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            o.error = f"timed out after {timeout:.0f} s"
            o.stdout = _text(exc.stdout)
            o.stderr = _text(exc.stderr)
        o.seconds = time.monotonic() - t
    (workdir / f"{b.name}.stdout").write_text(o.stdout)
    (workdir / f"{b.name}.stderr").write_text(o.stderr)
    if o.error is None and o.returncode != 0:
        o.error = f"exit code {o.returncode}"
    if o.error is None:
        _load(o, out_json)
    (workdir / f"{b.name}.meta.json").write_text(json.dumps(
        {"argv": argv, "seconds": o.seconds, "lock_wait": o.lock_wait, "returncode": o.returncode, "error": o.error}))
    print(f"[run_all] {b.name}: {'ok' if o.error is None else 'FAILED: ' + o.error} in {o.seconds:.0f} s"
          f" (+{o.lock_wait:.0f} s waiting for the lock)", file=sys.stderr, flush=True)
    return o


def _load(o: Outcome, out_json: Path) -> None:
    try:
        o.data = json.loads(out_json.read_text())
    except (OSError, ValueError) as exc:
        o.error = f"no JSON result ({exc})"


def load_bench(b: Bench, workdir: Path, quick: bool) -> Outcome:
    """An earlier run's results from --json-dir (for --render-only)."""
    try:
        meta = json.loads((workdir / f"{b.name}.meta.json").read_text())
    except (OSError, ValueError):
        meta = {"argv": [sys.executable, str(BENCH / b.script), *(b.quick if quick else b.full)], "seconds": 0.0, "returncode": None, "error": None}
        if not (workdir / f"{b.name}.json").exists():
            meta["error"] = "no result in --json-dir"
    o = Outcome(b, meta["argv"], seconds=meta["seconds"], returncode=meta["returncode"], error=meta["error"],
                lock_wait=meta.get("lock_wait", 0.0))
    for attr in ("stdout", "stderr"):
        f = workdir / f"{b.name}.{attr}"
        setattr(o, attr, f.read_text() if f.exists() else "")
    if o.error is None:
        _load(o, workdir / f"{b.name}.json")
    return o


@contextlib.contextmanager
def _locked(lock: str | None) -> Iterator[float]:
    """Hold an exclusive flock(2) on LOCK (the same lock as `flock LOCK cmd`); yield the seconds waited."""
    if not lock:
        yield 0.0
        return
    t = time.monotonic()
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield time.monotonic() - t
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _text(v: Any) -> str:
    if v is None:
        return ""
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


# --------------------------------------------------------------------------- machine facts
def _pkg(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"


def machine_facts() -> list[tuple[str, str]]:
    facts = [
        ("CPUs", str(os.cpu_count())),
        ("CPU model", _cpu_model()),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("Python", f"{platform.python_version()} ({sys.executable})"),
        ("RabbitMQ", _rabbitmq_version()),
        ("PostgreSQL", _postgres_version()),
        ("load average at start (1/5/15 min)", " / ".join(f"{x:.2f}" for x in os.getloadavg())),
        ("packages", ", ".join(f"{p} {_pkg(p)}" for p in (
            "pika", "SQLAlchemy", "psycopg", "orjson", "zeep", "numpy", "scikit-learn", "dlt", "faststream"))),
    ]
    return facts


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "-"


def _rabbitmq_version() -> str:
    try:
        import pika

        params = pika.URLParameters(AMQP)
        params.socket_timeout = params.blocked_connection_timeout = 5
        conn = pika.BlockingConnection(params)
        try:
            props = conn._impl.server_properties  # the broker's connection.start properties
            v = props.get("version", b"?")
            return v.decode() if isinstance(v, bytes) else str(v)
        finally:
            conn.close()
    except Exception as exc:  # noqa: BLE001 -- a fact, not a requirement
        return f"unknown ({type(exc).__name__})"


def _postgres_version() -> str:
    try:
        from sqlalchemy import create_engine, text

        engine = create_engine(PG, connect_args={"connect_timeout": 5})
        try:
            with engine.connect() as c:
                return str(c.execute(text("SHOW server_version")).scalar())
        finally:
            engine.dispose()
    except Exception as exc:  # noqa: BLE001
        return f"unknown ({type(exc).__name__})"


# --------------------------------------------------------------------------- per benchmark
def _n(v: Any, digits: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, int | float):
        return f"{v:,.{digits}f}"
    return str(v)


def _met(met: bool | None) -> str:
    return "-" if met is None else ("**MET**" if met else "**NOT MET**")


E2E_CPU_PATHS = {"raw": "raw one hop", "raw_two_hops": "raw two hops", "gateway": "gateway, one process",
                 "gateway_processes": "gateway, one process per role"}


def _e2e_cpu_table(d: dict[str, Any]) -> list[str]:
    """e2e's CPU split (component x path, µs of CPU per event), as e2e.py prints it; [] if absent."""
    cpu = d.get("cpu") or {}
    names = d.get("cpu_paths") or E2E_CPU_PATHS
    paths = [p for p in names if cpu.get(p)]
    if not paths:
        return []
    comps: dict[str, str] = {}
    for k, label in (d.get("cpu_components") or {}).items():
        if any(k in cpu[p]["components"] for p in paths):
            comps[k] = label
    for p in paths:
        for k, c in cpu[p]["components"].items():
            comps.setdefault(k, c.get("label", k))
    lines = ["| component (µs of CPU per event) | " + " | ".join(names[p] for p in paths) + " |",
             "|---|" + "---:|" * len(paths)]
    for k, label in comps.items():
        cells = [cpu[p]["components"].get(k) for p in paths]
        lines.append(f"| {label} | " + " | ".join("-" if c is None else _n(c["us_per_event"], 1) for c in cells) + " |")
    for title, key, digits in (
        ("**total**", "total_us_per_event", 1),
        ("cores busy (total CPU / window)", "cores_busy", 2),
        ("machine-wide cores busy (/proc/stat, every process)", "machine_cores_busy", 2),
        ("window (s)", "window_s", 2),
        ("events", "events", 0),
    ):
        lines.append(f"| {title} | " + " | ".join(_n(cpu[p].get(key), digits) for p in paths) + " |")
    return lines


def sec_e2e(d: dict[str, Any]) -> Section:
    a = d["args"]
    s = Section()
    two = d.get("raw_two_hops")  # absent in results from before the two-hop baseline
    s.lines += [
        f"{a['events']:,} events at full speed; paced run at {a['paced_rate']:,} events/s for {a['paced_seconds']:g} s.",
        ("Throughput: first acceptance (or first publish) to the last scored event (or message) received; "
        "latency: outbox acceptance (raw: publish) -> scored event (raw: message) received (paced: legacy row "
        "commit -> scored event received). The raw two-hop relay is the gateway's topology with no logic: "
        "publish -> quorum queue A -> a relay (consume with prefetch 1000, republish with confirms, ack A "
        "after the confirms) -> quorum queue B -> consume."),
        "",
        "| path | events/s | p50 ms | p99 ms | events received | ratio to raw one hop | ratio to raw two hops |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    raw = d["raw"]["events_per_s"]
    two_rate = two["events_per_s"] if two else None
    rows = [
        ("raw pika: publish (confirms, window 1000) -> quorum queue -> consume (ack/100)", d["raw"], True),
        ("raw pika, two hops: publish -> quorum queue A -> relay -> quorum queue B -> consume", two, True),
        ("gateway, one process: PG table -> outbox -> relay -> RabbitMQ -> scorer -> scored exchange", d["gateway"], True),
        ("gateway, one process per role (sources, relay, scorer)", d["gateway_processes"], True),
        (f"gateway paced at {a['paced_rate']:,}/s, one process", d["paced"], False),
        (f"gateway paced at {a['paced_rate']:,}/s, one process per role", d["paced_processes"], False),
    ]
    for name, f, full_speed in rows:
        if f is None:
            continue
        r1 = f"{f['events_per_s'] / raw:.2f}" if full_speed and raw else "-"
        r2 = f"{f['events_per_s'] / two_rate:.2f}" if full_speed and two_rate else "-"
        s.lines.append(f"| {name} | {_n(f['events_per_s'])} | {_n(f['p50_ms'], 1)} | {_n(f['p99_ms'], 1)} | "
                       f"{_n(f['received'])} | {r1} | {r2} |")
    per_round = d.get("rounds") or {}
    if any(len(v) > 1 for v in per_round.values()):
        names = d.get("cpu_paths") or E2E_CPU_PATHS
        s.lines += [
            "",
            (f"{len(next(iter(per_round.values())))} rounds, each running the four full-speed paths back to back "
             "(the order reversed every other round): the rows above are each path's median round (their ratio "
             "columns divide those), and the summary's ratios are the medians of the per-round ratios. Events/s "
             "per round: "
             + "; ".join(f"{names.get(k, k)} " + ", ".join(_n(x) for x in v) for k, v in per_round.items()) + "."),
        ]
    expected = a["events"]
    for key in ("raw", "raw_two_hops", "gateway", "gateway_processes"):
        if d.get(key) and d[key]["received"] != expected:
            what = "messages" if key.startswith("raw") else "scored events"
            s.lines.append(f"\nWARNING: {key} received {d[key]['received']:,} of {expected:,} {what}.")
    cpu = _e2e_cpu_table(d)
    if cpu:
        s.lines += [
            "",
            ("Where the CPU goes, in the measurement window only (first publish or acceptance -> last received; "
             "process start-up excluded): utime + stime per process from `/proc/<pid>/stat`, sampled every 0.1 s. "
             "In the one-process variant the gateway's row also holds the bench driver, which only waits for the "
             "sink, and the sampler thread."),
            "",
            *cpu,
        ]
    s.ratios += [
        Ratio("end to end / raw pika round trip, one process", d["ratio"], ">= 0.5", d["ratio"] >= 0.5),
        Ratio("end to end / raw pika round trip, one process per role", d["ratio_processes"], ">= 0.5",
              d["ratio_processes"] >= 0.5),
    ]
    if two:
        goal = ">= 0.6 (design target 0.6-0.8)"
        for what, key in (("one process", "ratio_two_hops"), ("one process per role", "ratio_two_hops_processes")):
            v = d.get(key)
            s.ratios.append(Ratio(f"end to end / raw two-hop relay, {what}", v, goal, None if v is None else v >= 0.6))
        s.ratios.append(Ratio("raw two hops / raw one hop (the topology's ceiling against the 0.5 goal)",
                              d.get("two_hops_over_one_hop"), "-", None))
    return s


def sec_scorer(d: dict[str, Any]) -> Section:
    a = d["args"]
    s = Section()
    store = "SQLite" if a.get("sqlite") else "PostgreSQL"
    s.lines += [
        (f"{a['events']:,} events pre-loaded per side, {store} store, FastStream {d.get('faststream')}, "
        f"{a['rounds']} round(s), the order of the sides alternating."),
        "",
        "| round | gateway events/s | FastStream events/s | ratio gateway / FastStream | scores stored (gw / fs) | scored events published (gw / fs) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = []
    for i, g in enumerate(d["rounds"], 1):
        gw, fs = g["gateway"], g["faststream"]
        if "ratio" in g:
            ratios.append(g["ratio"])
        s.lines.append(f"| {i} | {_n(gw.get('events_per_s'))} | {_n(fs.get('events_per_s'))} | {_n(g.get('ratio'), 2)} | "
                       f"{_n(gw.get('scores_stored'))} / {_n(fs.get('scores_stored'))} | "
                       f"{_n(gw.get('scored_published'))} / {_n(fs.get('scored_published'))} |")
        for side in ("gateway", "faststream"):
            if "error" in g[side]:
                s.lines.append(f"\nWARNING round {i} {side}: {g[side]['error']}")
    med = sorted(ratios)[len(ratios) // 2] if len(ratios) % 2 else (
        sum(sorted(ratios)[len(ratios) // 2 - 1: len(ratios) // 2 + 1]) / 2 if ratios else None)
    s.ratios.append(Ratio("scorer role / FastStream scorer (events/s, median of rounds)", med, "> 1",
                          None if med is None else med > 1))
    return s


def sec_sql(d: dict[str, Any]) -> Section:
    a = d["args"]
    s = Section()
    s.lines += [
        f"{a['rows']:,}-row PostgreSQL table, batch {a['batch']:,}; each path in its own process.",
        "",
        "| path | rows | seconds | rows/s | µs per row | ratio gateway / this path | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    gw = d["paths"][d["gateway"]]
    for name, r in d["paths"].items():
        bold = "**" if name == d["gateway"] else ""
        s.lines.append(f"| {bold}{name}{bold} | {r['rows']:,} | {r['seconds']:.1f} | {r['rows_per_s']:,.0f} | "
                       f"{r['us_per_row']:.1f} | {gw['rows_per_s'] / r['rows_per_s']:.2f} | {r['peak_rss_mb']:.0f} |")
    for name, r in d["paths"].items():
        if r["rows"] != a["rows"]:
            s.lines.append(f"\nWARNING: {name} read {r['rows']:,} rows, expected {a['rows']:,}.")
    s.lines.append(f"\nGateway duplicates {gw.get('duplicates')}, rejected {gw.get('rejected')}.")
    if d.get("ratio_dlt") is not None:
        s.ratios.append(Ratio("SQL extraction: gateway / dlt `sql_table` extract (rows/s)", d["ratio_dlt"],
                              "> 1 (well ahead of dlt)", d["ratio_dlt"] > 1))
    else:
        s.ratios.append(Ratio("SQL extraction: gateway / dlt `sql_table` extract (rows/s)", None,
                              "> 1 (well ahead of dlt)", None, "dlt not run (not importable)"))
    s.ratios += [
        Ratio("SQL extraction: gateway / raw fetch + id + envelope + COPY into the outbox", d["ratio_raw_outbox"], "-", None),
        Ratio("SQL extraction: gateway / raw SQLAlchemy keyset fetch (tuples, writes nothing)", d["ratio_raw"], "-", None),
    ]
    return s


def _sec_soap(d: dict[str, Any], label: str) -> Section:
    a = d["args"]
    s = Section()
    answer = "one recorded response served for every call" if a.get("canned") else "the simulator builds each answer"
    s.lines += [
        f"{a['page']} records per call, {a['rounds']} alternating rounds, median; {answer}; zeep {d.get('zeep')}.",
        "",
        "| path | µs per record |",
        "|---|---:|",
        f"| raw zeep call (zeep objects) | {d['raw_us_per_record']:.1f} |",
        f"| gateway SOAP adapter fetch (JSON-safe records, hardened) | {d['adapter_us_per_record']:.1f} |",
        "",
        (f"Ratio adapter / raw zeep (cost per record): **{d['ratio']:.2f}**; median of per-round ratios "
        f"{d['ratio_paired_median']:.2f}; ratio of the fastest rounds {d['ratio_fastest']:.2f}."),
    ]
    s.ratios.append(Ratio(f"SOAP{label}: adapter / raw zeep, cost per record (median of per-round ratios)",
                          d["ratio_paired_median"], "<= 1.2", d["ratio_paired_median"] <= 1.2,
                          f"ratio of medians {d['ratio']:.2f}"))
    return s


def sec_soap(d: dict[str, Any]) -> Section:
    return _sec_soap(d, "")


def sec_soap_canned(d: dict[str, Any]) -> Section:
    return _sec_soap(d, " (`--canned`)")


def sec_quality(d: dict[str, Any]) -> Section:
    s = Section()
    data = d["data"]
    res = d["results"]
    kinds = list(next(iter(res.values()))["auc_by_kind_after_warmup"].keys())
    s.lines += [
        (f"{data['events']:,} generated payment events, {data['anomalies']:,} anomalies, seed {d['args']['seed']}; "
        f"warm-up skip {d['args']['skip']:,}. CPU only."),
        "",
        "| model | ROC-AUC overall | ROC-AUC after warm-up | " + " | ".join(kinds) + " |",
        "|---|---:|---:|" + "---:|" * len(kinds),
    ]
    for name, r in res.items():
        by = r["auc_by_kind_after_warmup"]
        s.lines.append(f"| {name} | {r['auc_overall']:.3f} | {r['auc_after_warmup']:.3f} | "
                       + " | ".join(f"{by.get(k, float('nan')):.3f}" for k in kinds) + " |")
    sp = d["online_speed"]
    s.lines += [
        "",
        (f"Built-in model alone on one core (CPU {sp.get('pinned_cpu')}): median {sp['events_per_s_median']:,.0f} "
        f"events/s, best {sp['events_per_s_best']:,.0f}."),
    ]
    best = d["reference_forest"]
    gap = d["difference_builtin_minus_forest"][best]["after_warmup"]
    s.ratios += [
        Ratio(f"scoring quality: built-in AUC minus {best} AUC (after warm-up)", gap, ">= -0.05", gap >= -0.05),
        Ratio("scoring speed: built-in model events/s on one core / 20,000", sp["events_per_s_median"] / 20_000,
              ">= 1", sp["events_per_s_median"] >= 20_000, f"{sp['events_per_s_median']:,.0f} events/s"),
    ]
    return s


SECTIONS: dict[str, Callable[[dict[str, Any]], Section]] = {
    "e2e": sec_e2e, "scorer": sec_scorer, "sql": sec_sql, "soap": sec_soap, "soap-canned": sec_soap_canned,
    "quality": sec_quality,
}


# --------------------------------------------------------------------------- the report
def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def kept_notes(path: Path) -> str | None:
    try:
        old = path.read_text()
    except OSError:
        return None
    m = re.search(re.escape(NOTES_BEGIN) + r".*?" + re.escape(NOTES_END), old, re.DOTALL)
    return m.group(0) if m else None


def report(outcomes: list[Outcome], facts: list[tuple[str, str]], quick: bool, started: str,
           total_s: float, notes: str | None, cmdline: str) -> str:
    out: list[str] = ["# Performance", ""]
    out += [
        (f"Generated by `{cmdline}` on {started} ({'QUICK mode: small sizes, a smoke run, not the documented figures' if quick else 'full mode: the documented sizes'}; "
        f"{total_s / 60:.1f} minutes). Every ratio compares the gateway with the raw library or the peer "
        "doing the same job **in the same run** on the same machine; absolute figures depend on the machine "
        "and its load, the ratios much less. Earlier figures and what each benchmark measures: "
        "[bench/README.md](../bench/README.md)."),
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
    ]
    out += [f"| {k} | {v} |" for k, v in facts]
    out.append("")

    sections: dict[str, Section] = {}
    for o in outcomes:
        if o.data is not None:
            try:
                sections[o.bench.name] = SECTIONS[o.bench.name](o.data)
            except Exception as exc:  # noqa: BLE001 -- a malformed result is a failed benchmark, not a crash
                o.error = f"unexpected JSON ({type(exc).__name__}: {exc})"

    out += ["## Summary", "", "| benchmark | ratio | value | goal | result |", "|---|---|---:|---|---|"]
    for o in outcomes:
        if o.bench.name in sections and o.error is None:
            for r in sections[o.bench.name].ratios:
                value = "-" if r.value is None else f"{r.value:+.3f}" if r.goal.startswith(">= -") else f"{r.value:.2f}"
                note = f" ({r.note})" if r.note else ""
                out.append(f"| {o.bench.name} | {r.what}{note} | {value} | {r.goal} | {_met(r.met)} |")
        else:
            out.append(f"| {o.bench.name} | {o.bench.title} | - | - | **FAILED** ({o.error}) |")
    out.append("")

    if notes:
        out += [notes, ""]

    for o in outcomes:
        wait = f", after {o.lock_wait:.0f} s waiting for the services lock" if o.lock_wait >= 1 else ""
        took = f" ({o.seconds:.0f} s{wait})" if o.seconds else ""
        out += [f"## {o.bench.title}", "", f"`{_cmd(o.argv)}`{took}", ""]
        if o.error is None and o.bench.name in sections:
            out += sections[o.bench.name].lines
            out += ["", "<details><summary>the script's own output</summary>", "", _demote(o.stdout.strip()), "",
                    "</details>"]
        else:
            out += [f"**FAILED**: {o.error}.", "", "stderr (tail):", "", "```text", tail(o.stderr) or "(empty)", "```"]
            if o.stdout.strip():
                out += ["", "stdout (tail):", "", "```text", tail(o.stdout), "```"]
        out.append("")

    out += [
        "## How to reproduce",
        "",
        ("With RabbitMQ and PostgreSQL on localhost (`GATEWAY_BENCH_AMQP_URL`, `GATEWAY_BENCH_POSTGRES_URL`, "
        "`GATEWAY_TEST_POSTGRES_URL` as in [bench/README.md](../bench/README.md)) and the `bench` extra plus "
        "`dlt[postgres]` installed:"),
        "",
        "```bash",
        "python bench/run_all.py                         # full mode, writes docs/performance.md (10-20 minutes)",
        "python bench/run_all.py --quick --out /tmp/perf.md   # smoke run with small sizes",
        "python bench/run_all.py --only e2e scorer      # a subset; --lock FILE runs each under flock FILE",
        "```",
        "",
        ("Each benchmark also runs on its own and prints markdown (`--json PATH` for the figures); the "
        "command of each is above its section. Run on an otherwise idle machine: the broker, the database "
        "and the clients share the cores."),
        "",
    ]
    return "\n".join(out)


def _demote(md: str) -> str:
    """A script's own markdown inside the report: its headings become bold lines (no duplicate sections)."""
    return re.sub(r"^#+ (.*)$", r"**\1**", md, flags=re.MULTILINE)


def _cmd(argv: list[str]) -> str:
    parts = ["python", os.path.relpath(argv[1], ROOT), *argv[2:]]
    if "--json" in parts:
        i = parts.index("--json")
        del parts[i : i + 2]
    return " ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run), not the documented ones")
    ap.add_argument("--only", nargs="+", choices=[b.name for b in BENCHES], help="run only these benchmarks")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md", help="report (default docs/performance.md)")
    ap.add_argument("--json-dir", type=Path, default=None, help="keep each benchmark's JSON here (default: a temp dir)")
    ap.add_argument("--lock", default=None, help="hold an exclusive flock on LOCK while each benchmark runs, as "
                    "`flock LOCK cmd` would (services shared with other runs); the wait is reported")
    ap.add_argument("--render-only", action="store_true",
                    help="run nothing: rewrite the report from the results an earlier run left in --json-dir")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per benchmark (default 1800, quick 600)")
    args = ap.parse_args()
    timeout = args.timeout or (600.0 if args.quick else 1800.0)

    started = time.strftime("%Y-%m-%d %H:%M %Z")
    t0 = time.monotonic()
    facts = machine_facts()
    if args.render_only and not args.json_dir:
        ap.error("--render-only needs --json-dir")
    workdir = args.json_dir or Path(tempfile.mkdtemp(prefix="gw-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    chosen = [b for b in BENCHES if not args.only or b.name in args.only]
    if args.render_only:
        outcomes = [load_bench(b, workdir, args.quick) for b in chosen]
        whens = sorted(o.data["when"] for o in outcomes if o.data and o.data.get("when"))
        started = f"{whens[0]} (results re-rendered {started})" if whens else started
    else:
        outcomes = [run_bench(b, args.quick, workdir, args.lock, timeout) for b in chosen]
    facts.append(("load average at end (1/5/15 min)", " / ".join(f"{x:.2f}" for x in os.getloadavg())))

    cmdline = "python bench/run_all.py" + (" --quick" if args.quick else "") + (
        f" --only {' '.join(args.only)}" if args.only else "") + (f" --lock {args.lock}" if args.lock else "")
    total_s = sum(o.seconds + o.lock_wait for o in outcomes) if args.render_only else time.monotonic() - t0
    text = report(outcomes, facts, args.quick, started, total_s, kept_notes(args.out), cmdline)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"[run_all] wrote {args.out}; JSON in {workdir}", file=sys.stderr)
    failed = [o.bench.name for o in outcomes if o.error]
    if failed:
        print(f"[run_all] failed: {', '.join(failed)}", file=sys.stderr)


if __name__ == "__main__":
    main()
