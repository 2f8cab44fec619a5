"""The gateway's scorer against a FastStream consumer doing the same job, on the same RabbitMQ, in one run.

Not a test: a measurement (issue 7, "Benchmark": the ratio gateway / FastStream should be above 1).

Both sides get the same M events (default 10,000, so that a round takes about a minute: the
FastStream side does about 150-200 events/s here; the payment events of
``bench/scoring_quality.py``, seed 7, 2 % anomalies, as CloudEvents structured JSON, persistent)
pre-loaded into a quorum queue of their own *before* their clock starts, and both:

* parse each body with ``Event.from_json``;
* score with the built-in model built from the default settings
  (``scorer_from_settings(ScoringSettings())``: ``online-anomaly``, warm-up 30);
* store the score idempotently with the same ``EventStore.save_scores`` into a fresh PostgreSQL
  database (``--pg-url``, default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``; a new
  database per side, dropped afterwards) or, with ``--sqlite``, a fresh SQLite file;
* publish the scored CloudEvent (``scored_event(..., original_json=body)``, routing key = the
  original type, message id = the scored-event id, persistent, mandatory) to a topic exchange
  with one quorum queue bound to ``#`` (nobody consumes it; it is checked to hold M messages);
* wait for the publisher confirm, and only then ack the input message.

(a) **gateway**: ``Gateway(settings, roles=["scorer"])`` -- the product's scorer role as
    ``gateway worker --role scorer`` runs it, with the default settings (``scoring.workers`` 2,
    ``batch_max`` 500, ``batch_linger_ms`` 10, ``bus.prefetch`` 1000): micro-batches, one store
    commit, confirms in flight and one ``multiple`` ack per batch; also its dead-letter drain.
(b) **FastStream** (``faststream[rabbit]``, aio-pika underneath): one ``RabbitBroker`` with
    ``Channel(prefetch_count=1000)`` (``--fs-prefetch``), a subscriber on the input queue with
    ``AckPolicy.MANUAL``; the handler does the steps above for ONE message (FastStream has no
    batch subscriber for RabbitMQ), the store call through ``asyncio.to_thread`` (aio-pika runs one
    task per delivery, so up to the prefetch handlers are in flight; ``--fs-store-inline`` calls
    it on the event loop instead), and ``await broker.publish(...)``: FastStream's channels have ``publisher_confirms=True`` by
    default, so that await returns when the broker confirmed the message (aio-pika waits for
    the ``basic.ack``); a ``basic.return`` is not raised (``on_return_raises=False``). Then
    ``await message.ack()``. Per-message logging is off (``logger=None``), which only helps it.

Throughput = M / (time of the first delivery reaching the side's code -> time the M-th input
message was acked); start-up and pre-loading are outside it. Each side runs in its own spawned
process, one after the other (the order alternates per round with ``--rounds``); queues,
exchanges and databases are unique per run and deleted afterwards.

Usage::

    /work/venv/bin/python bench/scorer_throughput.py --events 10000 --rounds 2 --json /tmp/throughput.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pika

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

AMQP = os.environ.get("GATEWAY_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
PG = os.environ.get("GATEWAY_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
QUORUM = {"x-queue-type": "quorum"}


# --------------------------------------------------------------------------- shared helpers
def bodies(n: int, seed: int) -> list[tuple[str, bytes]]:
    from bench.scoring_quality import generate

    events, _labels, _kinds = generate(n, seed, 0.02)
    return [(e.id, e.to_json()) for e in events]


def preload(queue: str, items: list[tuple[str, bytes]]) -> None:
    """Publish the events persistently into ``queue`` (transactions of 1000: fast and safe)."""
    conn = pika.BlockingConnection(pika.URLParameters(AMQP))
    ch = conn.channel()
    ch.tx_select()
    for i, (mid, body) in enumerate(items, 1):
        ch.basic_publish("", queue, body, pika.BasicProperties(
            delivery_mode=2, content_type="application/cloudevents+json", message_id=mid))
        if i % 1000 == 0:
            ch.tx_commit()
    ch.tx_commit()
    conn.close()


def declare_sink(exchange: str, queue: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(AMQP))
    ch = conn.channel()
    ch.exchange_declare(exchange, "topic", durable=True)
    ch.queue_declare(queue, durable=True, arguments=QUORUM)
    ch.queue_bind(queue, exchange, "#")
    conn.close()


def depth(queue: str, expect: int, wait: float = 5.0) -> int:
    """Messages ready in ``queue`` (waits up to ``wait`` s for ``expect``: quorum counts lag a little)."""
    deadline = time.monotonic() + wait
    while True:
        conn = pika.BlockingConnection(pika.URLParameters(AMQP))
        n = conn.channel().queue_declare(queue, passive=True).method.message_count
        conn.close()
        if n >= expect or time.monotonic() > deadline:
            return n
        time.sleep(0.2)


def delete(queues: list[str], exchanges: list[str]) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(AMQP))
    ch = conn.channel()
    for q in queues:
        ch.queue_delete(q)
    for x in exchanges:
        ch.exchange_delete(x)
    conn.close()


class Store:
    """A fresh, migrated store: a new PostgreSQL database or a new SQLite file."""

    def __init__(self, pg_url: str, sqlite: bool) -> None:
        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        self._admin = None
        if sqlite:
            self._dir = tempfile.mkdtemp(prefix="gw-bench-")
            self.url = f"sqlite:///{self._dir}/store.db"
        else:
            url = make_url(pg_url)
            self._name = "gw_bench_" + uuid.uuid4().hex[:8]
            self._admin = create_engine(url, isolation_level="AUTOCOMMIT")
            with self._admin.connect() as c:
                c.execute(text(f"CREATE DATABASE {self._name}"))
            self.url = url.set(database=self._name).render_as_string(hide_password=False)

    def drop(self) -> None:
        from sqlalchemy import text

        if self._admin is not None:
            with self._admin.connect() as c:
                c.execute(text(f"DROP DATABASE IF EXISTS {self._name} WITH (FORCE)"))
            self._admin.dispose()


# --------------------------------------------------------------------------- (a) the gateway
def run_gateway(n: int, seed: int, pg_url: str, sqlite: bool, out: Any, *_fs_options: Any) -> None:
    from gateway.config import Settings
    from gateway.runtime import Gateway, tune_process
    from tests.rabbit import delete_broker_objects

    items = bodies(n, seed)
    store = Store(pg_url, sqlite)
    prefix = "bench-st-" + uuid.uuid4().hex[:8]
    sink = f"{prefix}.bench-sink"
    settings = Settings(
        profile="test",
        store={"url": store.url, "pool_size": 8},
        bus={"url": AMQP, "prefix": prefix},
    )
    gw = Gateway(settings, roles=["scorer"])
    result: dict[str, Any] = {"side": "gateway"}
    try:
        gw.bus.declare_topology()
        declare_sink(gw.topology.scored_exchange, sink)
        preload(gw.topology.scoring_queue, items)

        # Instrument the scoring queue's consumer (no product change): time of the first
        # non-empty batch and of the ack that completes M.
        marks: dict[str, float] = {}
        acked = [0]
        lock = threading.Lock()
        done = threading.Event()
        make_consumer = gw.bus.consumer

        def consumer(queue: str, prefetch: int) -> Any:
            c = make_consumer(queue, prefetch)
            if queue != gw.topology.scoring_queue:
                return c
            get_batch, ack = c.get_batch, c.ack

            def timed_get_batch(*a: Any, **k: Any) -> Any:
                batch = get_batch(*a, **k)
                if batch:
                    marks.setdefault("first", time.perf_counter())
                return batch

            def timed_ack(deliveries: Any) -> None:
                ack(deliveries)
                with lock:
                    acked[0] += len(deliveries)
                    if acked[0] >= n and "last" not in marks:
                        marks["last"] = time.perf_counter()
                        done.set()

            c.get_batch, c.ack = timed_get_batch, timed_ack
            return c

        gw.bus.consumer = consumer  # type: ignore[method-assign]
        gw.start()
        tune_process(settings.process)  # as `gateway worker --role scorer` does after start-up
        try:
            if not done.wait(300):
                result["error"] = f"timed out with {acked[0]} of {n} acked"
        finally:
            gw.stop()
        if "last" in marks:
            elapsed = marks["last"] - marks["first"]
            result.update(events=n, seconds=elapsed, events_per_s=n / elapsed)
        from gateway.store import EventStore, make_engine

        check = EventStore(make_engine(store.url))
        result["scores_stored"] = check.count_scores()
        check.engine.dispose()
        result["scored_published"] = depth(sink, n)
        result["batches"] = sum(w.batches for w in gw.scorers)
    finally:
        delete_broker_objects(AMQP, gw.topology, queues=[sink])
        store.drop()
    out.put(result)


# --------------------------------------------------------------------------- (b) FastStream
def run_faststream(
    n: int, seed: int, pg_url: str, sqlite: bool, out: Any, store_inline: bool = False, prefetch: int = 1000
) -> None:
    import asyncio

    from faststream import AckPolicy
    from faststream.rabbit import (
        Channel,
        ExchangeType,
        RabbitBroker,
        RabbitExchange,
        RabbitQueue,
    )
    from faststream.rabbit.annotations import RabbitMessage

    from gateway.config import ScoringSettings
    from gateway.events import CONTENT_TYPE, Event, utcnow
    from gateway.events.scored import scored_event
    from gateway.scoring import scorer_from_settings
    from gateway.store import EventStore, make_engine
    from gateway.store.migrate import upgrade
    from gateway.store.repository import ScoreRecord

    items = bodies(n, seed)
    store_db = Store(pg_url, sqlite)
    prefix = "bench-st-" + uuid.uuid4().hex[:8]
    in_q, scored_x, sink = f"{prefix}.fs-in", f"{prefix}.fs-scored", f"{prefix}.fs-sink"
    result: dict[str, Any] = {"side": "faststream"}
    try:
        engine = make_engine(store_db.url, pool_size=8)
        upgrade(engine)
        store = EventStore(engine)
        scorer = scorer_from_settings(ScoringSettings())
        conn = pika.BlockingConnection(pika.URLParameters(AMQP))
        conn.channel().queue_declare(in_q, durable=True, arguments=QUORUM)
        conn.close()
        declare_sink(scored_x, sink)
        preload(in_q, items)

        broker = RabbitBroker(AMQP, default_channel=Channel(prefetch_count=prefetch), logger=None)
        exchange = RabbitExchange(scored_x, type=ExchangeType.TOPIC, durable=True, declare=False)
        marks: dict[str, float] = {}
        count = [0]
        # Handler time per step, summed over handlers (they overlap: aio-pika runs one task per delivery).
        steps = [0.0, 0.0, 0.0, 0.0]  # parse+score, store commit, build+publish+confirm, ack
        finished = asyncio.Event()  # binds to the loop asyncio.run starts, at first use

        async def raw_body(msg: Any) -> bytes:
            return msg.body

        @broker.subscriber(
            RabbitQueue(in_q, durable=True, declare=False), ack_policy=AckPolicy.MANUAL, decoder=raw_body,
            no_reply=True,
        )
        async def handle(body: bytes, message: RabbitMessage) -> None:
            t0 = time.perf_counter()
            marks.setdefault("first", t0)
            ev = Event.from_json(body)
            res = scorer.score_batch([ev])[0]
            now = utcnow()
            t1 = time.perf_counter()
            record = ScoreRecord(
                event_id=ev.id, model_name=scorer.name, model_version=scorer.version, score=res.score,
                explanation=res.explanation, event_type=ev.type, source_name=ev.source_name or ev.source,
                event_time=ev.time, scored_at=now,
            )
            if store_inline:
                store.save_scores([record])  # blocks the event loop for the commit
            else:
                await asyncio.to_thread(store.save_scores, [record])
            t2 = time.perf_counter()
            se = scored_event(ev, score=res.score, model_name=scorer.name, model_version=scorer.version,
                              explanation=res.explanation, scored_at=now, original_json=body)
            await broker.publish(se.to_json(), exchange=exchange, routing_key=ev.type, message_id=se.id,
                                 content_type=CONTENT_TYPE, persist=True, mandatory=True)
            t3 = time.perf_counter()
            await message.ack()
            t4 = time.perf_counter()
            steps[0] += t1 - t0
            steps[1] += t2 - t1
            steps[2] += t3 - t2
            steps[3] += t4 - t3
            count[0] += 1
            if count[0] == n:
                marks["last"] = time.perf_counter()
                finished.set()

        async def main() -> None:
            async with broker:
                await broker.start()
                try:
                    await asyncio.wait_for(finished.wait(), 300)
                except TimeoutError:
                    result["error"] = f"timed out with {count[0]} of {n} acked"

        asyncio.run(main())
        if "last" in marks:
            elapsed = marks["last"] - marks["first"]
            result.update(events=n, seconds=elapsed, events_per_s=n / elapsed)
        result["store_call"] = "inline" if store_inline else "asyncio.to_thread"
        result["prefetch"] = prefetch
        result["handler_latency_us_per_event"] = {
            k: v / max(1, count[0]) * 1e6 for k, v in zip(("parse_score", "store", "publish_confirm", "ack"), steps)
        }
        result["scores_stored"] = store.count_scores()
        result["scored_published"] = depth(sink, n)
        engine.dispose()
    finally:
        delete([in_q, sink], [scored_x])
        store_db.drop()
    out.put(result)


def run_side(target: Any, args: argparse.Namespace) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(
        target=target, args=(args.events, args.seed, args.pg_url, args.sqlite, q, args.fs_store_inline, args.fs_prefetch),
    )
    p.start()
    try:
        res = q.get(timeout=600)
    finally:
        p.join(60)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=10_000, help="M, events pre-loaded per side (default 10,000)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds; the order of the sides alternates")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--pg-url", default=PG, help="PostgreSQL server for the fresh store databases")
    ap.add_argument("--sqlite", action="store_true", help="use a fresh SQLite file per side instead")
    ap.add_argument("--fs-prefetch", type=int, default=1000, help="FastStream channel prefetch (default 1000)")
    ap.add_argument("--fs-store-inline", action="store_true",
                    help="FastStream handler calls the store directly (blocking its event loop) instead of "
                    "asyncio.to_thread")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from importlib.metadata import version

    fs_version = version("faststream")
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = [("gateway", run_gateway), ("faststream", run_faststream)]
        if r % 2:
            order.reverse()
        got: dict[str, Any] = {}
        for name, target in order:
            print(f"round {r + 1}: {name} ...", file=sys.stderr, flush=True)
            got[name] = run_side(target, args)
            print(f"  {got[name]}", file=sys.stderr, flush=True)
        if "events_per_s" in got["gateway"] and "events_per_s" in got["faststream"]:
            got["ratio"] = got["gateway"]["events_per_s"] / got["faststream"]["events_per_s"]
        rounds.append(got)

    store = "SQLite" if args.sqlite else "PostgreSQL"
    print(f"\n## Scorer throughput ({args.events:,} events pre-loaded per side, {store} store, "
          f"FastStream {fs_version}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M')})\n")
    print("| round | gateway events/s | FastStream events/s | ratio gateway / FastStream | scores stored (gw / fs) | scored events published (gw / fs) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for i, g in enumerate(rounds, 1):
        a, b = g["gateway"], g["faststream"]
        print(f"| {i} | {a.get('events_per_s', float('nan')):,.0f} | {b.get('events_per_s', float('nan')):,.0f} | "
              f"{g.get('ratio', float('nan')):.2f} | {a.get('scores_stored')} / {b.get('scores_stored')} | "
              f"{a.get('scored_published')} / {b.get('scored_published')} |")
    ratios = [g["ratio"] for g in rounds if "ratio" in g]
    if ratios:
        med = statistics.median(ratios)
        print(f"\nratio gateway / FastStream (median of {len(ratios)}): **{med:.2f}** (goal > 1: {'MET' if med > 1 else 'NOT MET'})")
    for g in rounds:
        for side in ("gateway", "faststream"):
            if "error" in g[side]:
                print(f"WARNING {side}: {g[side]['error']}")
    if args.json:
        args.json.write_text(json.dumps({"args": {**vars(args), "json": str(args.json)}, "rounds": rounds,
                                         "faststream": fs_version, "cpus": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
