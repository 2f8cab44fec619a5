"""SQL source extraction rate against a raw keyset fetch of the same rows, in the same run.

A scratch PostgreSQL database gets a ``legacy_orders`` table of ``--rows`` rows (built server-side
with ``INSERT ... SELECT generate_series``, indexed on ``(updated_at, id)``), and is dropped
afterwards. Each path then reads every row once, in batches of ``--batch``, in its own fresh
Python process (so each reports its own peak RSS):

* **raw tuples** -- SQLAlchemy Core keyset pagination, the adapter's query shape: the same columns,
  ``WHERE (updated_at, id) > (:ts, :id) ORDER BY updated_at, id LIMIT :batch``, rows as tuples;
* **raw dicts** -- the same, rows as dicts (what a mapper needs);
* **raw to outbox** -- the raw tuples fetch plus what the product must add, written by hand: a
  UUIDv5 id and an ``orjson`` CloudEvent envelope per row (the same attributes and lineage
  extensions as the gateway's, about 450 bytes), COPY into the gateway store's own
  ``events`` table (a fresh migrated database), one commit per batch -- the floor for the same
  output;
* **gateway** -- ``SourceRunner`` draining the table with the ``sql`` adapter into a fresh,
  migrated PostgreSQL gateway store (a second scratch database): fetch, map to CloudEvents with
  deterministic ids, write the outbox rows and the cursor in one transaction per batch;
* **dlt** (with ``--dlt``) -- ``sql_table`` with an incremental cursor on ``updated_at``, the
  default SQLAlchemy backend, extract step only (dlt's own files, no destination). dlt need not be
  in the gateway's environment: ``--dlt-python`` names an interpreter that has ``dlt[postgres]``,
  SQLAlchemy and psycopg.

The raw paths write nothing; the gateway's ratio to them is the whole cost of the product
(mapping, ids, JSON envelopes, the outbox and cursor commit). Not part of the test suite.

    .venv/bin/python bench/sql.py --rows 1000000 --batch 5000 [--dlt --dlt-python /path/to/python]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, Table, bindparam, create_engine, select, text, tuple_
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_PG = os.environ.get("GATEWAY_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
TABLE = "legacy_orders"
COLUMNS = ["id", "customer", "amount", "status", "updated_at"]
RAW_OUTBOX = "raw fetch + id + orjson envelope + COPY into the outbox table"
GATEWAY = "gateway: SourceRunner -> PostgreSQL outbox"


# --------------------------------------------------------------------------- scratch databases
def _admin(server_url: str) -> Any:
    return create_engine(server_url, isolation_level="AUTOCOMMIT")


def create_database(server_url: str, prefix: str) -> str:
    """Create an empty database on the server; returns its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = _admin(server_url)
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def new_store(server_url: str, created: list[str]) -> str:
    """A fresh gateway store database, migrated to head (appended to ``created``)."""
    from gateway.store import make_engine
    from gateway.store.migrate import upgrade

    url = create_database(server_url, "gw_bench_store")
    created.append(url)
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


def drop_database(server_url: str, url: str) -> None:
    admin = _admin(server_url)
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {make_url(url).database} WITH (FORCE)"))
    admin.dispose()


def fill_legacy(url: str, rows: int) -> float:
    """Create and fill the legacy table server-side; returns the seconds it took."""
    t = time.perf_counter()
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(
            f"CREATE TABLE {TABLE} (id integer PRIMARY KEY, customer varchar(40) NOT NULL, "
            "amount numeric(12,2) NOT NULL, status char(10) NOT NULL, updated_at timestamp NOT NULL)"
        ))
        # Four rows per millisecond: tie groups, as legacy tables have them.
        conn.execute(text(
            f"INSERT INTO {TABLE} SELECT i, 'C' || lpad((i % 97)::text, 4, '0'), (i % 1000) + 0.25, 'NEW', "
            "timestamp '2024-01-01 12:00:00' + (i / 4) * interval '1 millisecond' "
            "FROM generate_series(1, :n) AS i"
        ), {"n": rows})
        conn.execute(text(f"CREATE INDEX {TABLE}_cursor ON {TABLE} (updated_at, id)"))
        conn.execute(text(f"VACUUM ANALYZE {TABLE}"))
        conn.execute(text(f"SELECT count(*) FROM {TABLE}")).scalar_one()  # warm the buffer cache
    engine.dispose()
    return time.perf_counter() - t


# --------------------------------------------------------------------------- paths (child side)
def path_raw(legacy: str, batch: int, as_dicts: bool) -> int:
    """Keyset pagination with SQLAlchemy Core, the adapter's query shape."""
    engine = create_engine(legacy)
    t = Table(TABLE, MetaData(), autoload_with=engine)
    ts, key = t.c.updated_at, t.c.id
    first = select(*[t.c[c] for c in COLUMNS]).order_by(ts, key).limit(batch)
    after = first.where(tuple_(ts, key) > tuple_(bindparam("ts", type_=ts.type), bindparam("id", type_=key.type)))
    total = 0
    with engine.connect() as conn:
        start = time.perf_counter()
        result = conn.execute(first)
        while True:
            if as_dicts:
                got: list[Any] = [dict(r) for r in result.mappings()]
                last = (got[-1]["updated_at"], got[-1]["id"]) if got else None
            else:
                got = result.all()
                last = (got[-1][4], got[-1][0]) if got else None
            total += len(got)
            if len(got) < batch:
                break
            assert last is not None
            result = conn.execute(after, {"ts": last[0], "id": last[1]})
        _report(total, time.perf_counter() - start)
    engine.dispose()
    return total


def path_raw_outbox(legacy: str, store_url: str, batch: int) -> int:
    """Raw keyset fetch + hand-written id and envelope + COPY into the outbox table."""
    import uuid as uuid_
    from datetime import datetime

    import orjson
    import psycopg

    engine = create_engine(legacy)
    t = Table(TABLE, MetaData(), autoload_with=engine)
    ts, key = t.c.updated_at, t.c.id
    first = select(*[t.c[c] for c in COLUMNS]).order_by(ts, key).limit(batch)
    after = first.where(tuple_(ts, key) > tuple_(bindparam("ts", type_=ts.type), bindparam("id", type_=key.type)))
    ns = uuid_.UUID("6f1b8a1e-4c1e-5d6b-9a47-1e6c0b9d2a10")
    copy = ("COPY events (id, source_name, type, subject, time, envelope, status, attempts, accepted_at) "
            "FROM STDIN")
    utc = UTC
    total = 0
    out = psycopg.connect(make_url(store_url).set(drivername="postgresql").render_as_string(hide_password=False))
    with engine.connect() as conn:
        start = time.perf_counter()
        result = conn.execute(first)
        while True:
            got = result.all()
            now = datetime.now(utc)
            with out.cursor() as cur, cur.copy(copy) as cp:
                for id_, customer, amount, status, updated in got:
                    at = updated.replace(tzinfo=utc)
                    iso = at.isoformat(timespec="microseconds").replace("+00:00", "Z")
                    eid = str(uuid_.uuid5(ns, f"bench|order|{id_}|{iso}"))
                    envelope = orjson.dumps({
                        "specversion": "1.0", "id": eid, "source": "/legacy/bench", "type": "com.acme.order.changed",
                        "subject": f"order/{id_}", "time": iso, "datacontenttype": "application/json",
                        "sourcename": "bench", "sourceadapter": "sql",
                        "sourceposition": orjson.dumps({"ts": iso, "key": id_}).decode(),
                        "data": {"id": id_, "customer": customer, "amount": str(amount), "status": status.rstrip(" "),
                                 "updated_at": iso},
                    }).decode()
                    cp.write_row((eid, "bench", "com.acme.order.changed", f"order/{id_}", at, envelope, "pending", 0, now))
            out.commit()
            total += len(got)
            if len(got) < batch:
                break
            result = conn.execute(after, {"ts": got[-1][4], "id": got[-1][0]})
        _report(total, time.perf_counter() - start)
    out.close()
    engine.dispose()
    return total


def path_gateway(legacy: str, store_url: str, batch: int) -> int:
    """SourceRunner with the sql adapter into a PostgreSQL gateway store."""
    from gateway.config import ProcessSettings, SourceSettings
    from gateway.runtime import tune_process
    from gateway.sources.runner import SourceRunner
    from gateway.store import EventStore, make_engine
    from tests.legacy import source_settings

    engine = make_engine(store_url)
    runner = SourceRunner(SourceSettings.model_validate(source_settings(legacy, batch_size=batch)), EventStore(engine))
    runner.start()  # epoch, cursor, adapter open (reflection): not part of the rate
    tune_process(ProcessSettings())  # as the sources role does after start-up (gateway worker / run)
    start = time.perf_counter()
    while runner.run_once().has_more:
        pass
    _report(runner.status.events_accepted, time.perf_counter() - start,
            duplicates=runner.status.duplicates, rejected=runner.status.rejected)
    runner.close()
    engine.dispose()
    return runner.status.events_accepted


def path_dlt(legacy: str, batch: int) -> int:
    """dlt ``sql_table``, incremental on updated_at, extract step only."""
    import dlt
    from dlt.sources.sql_database import sql_table

    with tempfile.TemporaryDirectory() as work:
        resource_ = sql_table(
            credentials=legacy, table=TABLE, chunk_size=batch,
            incremental=dlt.sources.incremental("updated_at"),
        )
        pipeline = dlt.pipeline(pipeline_name="bench_sql", pipelines_dir=work)
        start = time.perf_counter()
        info = pipeline.extract(resource_)
        seconds = time.perf_counter() - start
        counts = info.metrics[info.loads_ids[0]][0]["table_metrics"][TABLE].items_count if info.loads_ids else 0
        _report(int(counts), seconds)
        return int(counts)


def _report(rows: int, seconds: float, **extra: Any) -> None:
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"rows": rows, "seconds": seconds, "peak_rss_mb": peak_kb / 1024, **extra}), flush=True)


# --------------------------------------------------------------------------- orchestration
def run_child(*args: str, python: str = sys.executable) -> dict[str, Any]:
    out = subprocess.run([python, __file__, "--child", *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"child {args[0]} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows in the legacy table")
    ap.add_argument("--batch", type=int, default=5000, help="rows per fetch (every path)")
    ap.add_argument("--pg-url", default=DEFAULT_PG, help="PostgreSQL server URL (scratch databases are created on it)")
    ap.add_argument("--dlt", action="store_true", help="also run dlt's sql_table extract (needs dlt[postgres])")
    ap.add_argument("--dlt-python", default=sys.executable, help="interpreter with dlt installed (default: this one)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        kind, legacy, *rest = args.child
        if kind == "raw":
            path_raw(legacy, args.batch, as_dicts=False)
        elif kind == "raw-dicts":
            path_raw(legacy, args.batch, as_dicts=True)
        elif kind == "raw-outbox":
            path_raw_outbox(legacy, rest[0], args.batch)
        elif kind == "gateway":
            path_gateway(legacy, rest[0], args.batch)
        elif kind == "dlt":
            path_dlt(legacy, args.batch)
        return

    server = args.pg_url
    legacy = create_database(server, "gw_bench_legacy")
    stores: list[str] = []
    try:
        fill_s = fill_legacy(legacy, args.rows)
        print(f"legacy table: {args.rows:,} rows built in {fill_s:.1f}s", file=sys.stderr)
        results: dict[str, dict[str, Any]] = {}
        batch = ["--batch", str(args.batch)]
        results["raw SQLAlchemy keyset fetch, tuples"] = run_child("raw", legacy, *batch)
        results["raw SQLAlchemy keyset fetch, dicts"] = run_child("raw-dicts", legacy, *batch)
        results[RAW_OUTBOX] = run_child("raw-outbox", legacy, new_store(server, stores), *batch)
        results[GATEWAY] = run_child("gateway", legacy, new_store(server, stores), *batch)
        if args.dlt:
            probe = subprocess.run([args.dlt_python, "-c", "import dlt; print(dlt.__version__)"],
                                   capture_output=True, text=True, check=False)
            if probe.returncode != 0:
                print(f"dlt not importable by {args.dlt_python}: skipped (pip install 'dlt[postgres]')", file=sys.stderr)
            else:
                name = f"dlt {probe.stdout.strip()} `sql_table` extract (SQLAlchemy backend)"
                results[name] = run_child("dlt", legacy, *batch, python=args.dlt_python)
    finally:
        for url in stores:
            drop_database(server, url)
        drop_database(server, legacy)

    raw = results["raw SQLAlchemy keyset fetch, tuples"]
    gw, floor = results[GATEWAY], results[RAW_OUTBOX]
    for name, r in results.items():
        if r["rows"] != args.rows:
            print(f"warning: {name} read {r['rows']:,} rows, expected {args.rows:,}", file=sys.stderr)
    print(f"\n## SQL source: {args.rows:,}-row PostgreSQL table, batch {args.batch:,}\n")
    print(f"Python {platform.python_version()}, {os.cpu_count()} CPUs; each path in its own process.\n")
    print("| path | rows | seconds | rows/s | ratio to raw tuples | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        rate = r["rows"] / r["seconds"]
        ratio = rate / (raw["rows"] / raw["seconds"])
        print(f"| {name} | {r['rows']:,} | {r['seconds']:.1f} | {rate:,.0f} | {ratio:.2f} | {r['peak_rss_mb']:.0f} |")
    def rate(r: dict[str, Any]) -> float:
        return float(r["rows"] / r["seconds"])

    def per_row(r: dict[str, Any]) -> float:
        return float(1e6 * r["seconds"] / max(r["rows"], 1))

    print(f"\nratio gateway / raw fetch: **{rate(gw) / rate(raw):.2f}**; gateway / raw to outbox: "
          f"**{rate(gw) / rate(floor):.2f}**; per row: gateway {per_row(gw):.1f} µs, raw to outbox "
          f"{per_row(floor):.1f} µs, raw fetch {per_row(raw):.1f} µs; gateway duplicates "
          f"{gw.get('duplicates')}, rejected {gw.get('rejected')}")
    for name, r in results.items():
        if name.startswith("dlt "):
            print(f"ratio gateway / {name}: **{rate(gw) / rate(r):.2f}** (per row: dlt {per_row(r):.1f} µs)")
    if args.json:
        paths = {name: {**r, "rows_per_s": rate(r), "us_per_row": per_row(r)} for name, r in results.items()}
        dlt_name = next((name for name in results if name.startswith("dlt ")), None)
        args.json.write_text(json.dumps({
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "args": {k: v for k, v in vars(args).items() if k != "child"} | {"json": str(args.json)},
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "paths": paths, "raw": "raw SQLAlchemy keyset fetch, tuples", "raw_outbox": RAW_OUTBOX,
            "gateway": GATEWAY, "dlt": dlt_name,
            "ratio_raw": rate(gw) / rate(raw), "ratio_raw_outbox": rate(gw) / rate(floor),
            "ratio_dlt": rate(gw) / rate(results[dlt_name]) if dlt_name else None,
        }, indent=2))


if __name__ == "__main__":
    main()
