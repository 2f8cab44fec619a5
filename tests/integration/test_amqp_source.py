"""The legacy-queue adapter against the local RabbitMQ: mixed formats, poison messages, broker restart, crash."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any, Self

import pika
import pytest

from adapters.amqp import AmqpSource
from gateway.codecs import codec_from_config
from gateway.config import SourceSettings
from gateway.errors import ConfigurationError, StoreUnavailableError
from gateway.resilience import RetryPolicy
from gateway.sources.runner import SourceRunner
from gateway.store import EventFilter, EventStore

pytestmark = pytest.mark.integration

FIXED = {
    "format": "fixed", "encoding": "cp037", "record_length": 33,
    "layout": [{"name": "id", "pic": "9(8)"}, {"name": "customer", "pic": "X(20)"}, {"name": "amount", "pic": "S9(7)V99 COMP-3"}],
}
CSV = {"format": "csv", "columns": ["id", "customer", "amount"], "header": False}
MAPPING = {"type": "com.acme.legacy.order", "entity": "order", "key": ["id"], "subject": "order/{id}"}


def legacy_config(url: str, queue: str, **over: Any) -> dict[str, Any]:
    return {
        "url": url, "queue": queue, "prefetch": 500, "batch_size": 500, "max_wait": 0.2,
        "codec": {"format": "json"},
        "codecs_by_content_type": {"text/csv": CSV, "application/x-ebcdic-fixed": FIXED},
        "delivery_limit": 3, "reconnect_max_delay": 2.0, "heartbeat": 10, **over,
    }


def make_runner(store: EventStore, cfg: dict[str, Any], name: str = "legacy-queue") -> SourceRunner:
    settings = SourceSettings.model_validate(
        {"name": name, "adapter": "amqp", "interval": 0.01, "config": cfg, "mapping": MAPPING, "status_interval": 0.5, "lease_ttl": 2}
    )
    adapter = AmqpSource(AmqpSource.parse_config(settings.config), source_name=name)  # type: ignore[arg-type]
    return SourceRunner(settings, store, adapter=adapter, retry=RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.2, deadline=5))


@pytest.fixture
def legacy_queue(amqp_url: str) -> Iterator[str]:
    """A durable classic queue on the 'legacy' broker (the local RabbitMQ), deleted afterwards."""
    name = f"legacy-orders-{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    conn.channel().queue_declare(name, durable=True)
    conn.close()
    yield name
    conn = _connect(amqp_url)
    conn.channel().queue_delete(name)
    conn.close()


def _connect(url: str, tries: int = 60) -> pika.BlockingConnection:
    for _ in range(tries):
        try:
            return pika.BlockingConnection(pika.URLParameters(url))
        except pika.exceptions.AMQPConnectionError:
            time.sleep(0.5)
    raise AssertionError("RabbitMQ did not come back")


def publish(url: str, queue: str, messages: list[tuple[bytes, str, str | None]]) -> None:
    """Persistent messages with publisher confirms: (body, content_type, message_id)."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.confirm_delivery()
    for body, ctype, mid in messages:
        ch.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2, content_type=ctype, message_id=mid))
    conn.close()


def queue_counts(url: str, queue: str) -> tuple[int, int]:
    """(ready, consumers) of the queue."""
    conn = _connect(url)
    ok = conn.channel().queue_declare(queue, passive=True)
    conn.close()
    return ok.method.message_count, ok.method.consumer_count


def mixed_messages(n: int) -> list[tuple[bytes, str, str | None]]:
    """``n`` records: JSON (one record per message), CSV (5 per message), EBCDIC fixed (4 per message)."""
    fixed = codec_from_config(FIXED)
    out: list[tuple[bytes, str, str | None]] = []
    i = 1
    while i <= n:
        kind = (i // 9) % 3
        if kind == 0:
            out.append((json.dumps({"id": i, "customer": f"C{i}", "amount": f"{i}.25"}).encode(), "application/json", f"j-{i}"))
            i += 1
        elif kind == 1:
            ids = range(i, min(i + 5, n + 1))
            body = "".join(f"{k},C{k},{k}.50\r\n" for k in ids).encode()
            out.append((body, "text/csv", f"c-{i}"))
            i += len(ids)
        else:
            ids = range(i, min(i + 4, n + 1))
            recs = [{"id": k, "customer": f"C{k}", "amount": Decimal(f"-{k}.75")} for k in ids]
            out.append((fixed.encode(recs), "application/x-ebcdic-fixed", None))  # no message id: body hash
            i += len(ids)
    return out


def poison(n: int) -> list[tuple[bytes, str, str | None]]:
    return [(b'{"id": ' + str(k).encode() + b', "broken', "application/json", f"bad-{k}") for k in range(n)]


def stored_ids(store: EventStore) -> list[int]:
    return [int(e.event["data"]["id"]) for e in store.list_events(EventFilter(), limit=100_000)]


class Running:
    def __init__(self, runner: SourceRunner) -> None:
        self.runner = runner
        self.stop = threading.Event()
        self.thread = threading.Thread(target=runner.run, args=(self.stop,), daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


@pytest.mark.chaos
@pytest.mark.slow
def test_20000_mixed_messages_with_poison_and_a_broker_restart_become_20000_events_once(
    sqlite_store: EventStore, amqp_url: str, legacy_queue: str
) -> None:
    messages = mixed_messages(20_000)
    bad = poison(100)
    mixed = [m for pair in zip(messages, bad) for m in pair] + messages[len(bad):]
    publish(amqp_url, legacy_queue, mixed)
    runner = make_runner(sqlite_store, legacy_config(amqp_url, legacy_queue))
    adapter: AmqpSource = runner.adapter  # type: ignore[assignment]
    with Running(runner):
        # rabbitmqctl takes a second or two to act, and the source keeps committing meanwhile: asked at
        # 2,000 events the broker went down at about 12,000 (at 5,000: about 18,500) of the 20,000.
        wait_for(lambda: sqlite_store.stats()["events"] >= 2_000, 120, "2,000 events")
        rabbitmqctl("stop_app")  # mid-way: the consumer loses its connection
        time.sleep(2)
        during_outage = sqlite_store.stats()["events"]
        consumer = adapter._consumer
        assert consumer is not None and not consumer.ready  # it noticed the loss
        rabbitmqctl("start_app")
        rabbitmqctl("await_startup")  # fully up before later tests use the broker
        wait_for(lambda: sqlite_store.stats()["events"] >= 20_000 and sqlite_store.stats()["dead_letters"] >= 100,
                 240, "every event and dead letter after the restart")
        wait_for(lambda: queue_counts(amqp_url, legacy_queue)[0] == 0, 30, "an empty legacy queue")
        # The same consumer reconnected by itself: nothing in this test re-opened it.
        assert adapter._consumer is consumer and consumer.connects >= 2 and consumer.liveness()[0]
    # The restart really was mid-run: records were still to come while the broker was down.
    assert during_outage < 20_000, during_outage
    ids = stored_ids(sqlite_store)
    assert len(ids) == 20_000 and sorted(ids) == list(range(1, 20_001))  # each once
    dead = sqlite_store.list_dead_letters(limit=1000)
    raw = {mid: body for body, _ctype, mid in bad}
    assert len(dead) == 100 and sorted(d.headers["message_id"] for d in dead if d.headers) == sorted(raw)  # each once
    for d in dead:
        assert d.stage == "source" and d.error_class == "DecodeError"  # never DeliveryLimitExceeded here
        assert d.headers is not None and d.payload == raw[d.headers["message_id"]].decode()  # the raw body, exactly
        assert d.headers["content_type"] == "application/json" and d.headers["position"]["queue"] == legacy_queue
        assert "legacy-queue" in d.reason and ("JSON" in d.reason or "json" in d.reason)  # the error, named
        assert 1 <= d.attempts <= 3  # never delivered more often than delivery_limit


@pytest.fixture
def quorum_queue(amqp_url: str) -> Iterator[str]:
    """A quorum queue on the 'legacy' broker: it reports x-delivery-count."""
    name = f"legacy-quorum-{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    conn.channel().queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"})
    conn.close()
    yield name
    conn = _connect(amqp_url)
    conn.channel().queue_delete(name)
    conn.close()


def test_no_message_is_processed_more_often_than_the_delivery_limit(
    sqlite_store: EventStore, amqp_url: str, quorum_queue: str
) -> None:
    """A message that kept coming back (consumers died before acking) goes to dead letters at the limit."""
    legacy_queue = quorum_queue
    publish(amqp_url, legacy_queue, [(b'{"id": 1}', "application/json", "m-1")])
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    for _ in range(3):  # three deliveries that never got acked (a consumer died each time)
        method, _props, _body = ch.basic_get(legacy_queue)
        assert method is not None
        ch.basic_nack(method.delivery_tag, requeue=True)
    conn.close()
    runner = make_runner(sqlite_store, legacy_config(amqp_url, legacy_queue, delivery_limit=3))
    batch = runner.run_once()
    assert batch.records == [] and sqlite_store.stats()["events"] == 0
    (dead,) = sqlite_store.list_dead_letters()
    assert dead.error_class == "DeliveryLimitExceeded" and "delivery_limit 3" in dead.reason
    runner.adapter.close()
    assert queue_counts(amqp_url, legacy_queue)[0] == 0  # acked after the dead letter was committed


def test_on_a_classic_queue_the_gateway_counts_the_redeliveries_it_sees(
    sqlite_store: EventStore, amqp_url: str, legacy_queue: str
) -> None:
    """Every commit of the message fails: it is requeued, comes back, and stops at the limit."""
    publish(amqp_url, legacy_queue, [(b'{"id": 1}', "application/json", "m-1")])
    runner = make_runner(sqlite_store, legacy_config(amqp_url, legacy_queue, delivery_limit=3))
    real_accept = sqlite_store.accept
    failing = True

    def accept(*args: Any, **kwargs: Any) -> Any:
        if failing and kwargs.get("rejects") == [] and args[0]:
            raise StoreUnavailableError("store down")
        return real_accept(*args, **kwargs)

    sqlite_store.accept = accept  # type: ignore[method-assign]
    for _ in range(3):
        with pytest.raises(StoreUnavailableError):
            runner.run_once()  # fetched, not committed, requeued (released)
    batch = runner.run_once()  # the 4th delivery: past the limit
    assert batch.records == [] and len(batch.rejects) == 1
    (dead,) = sqlite_store.list_dead_letters()
    assert dead.error_class == "DeliveryLimitExceeded" and dead.attempts == 4
    runner.adapter.close()
    assert queue_counts(amqp_url, legacy_queue)[0] == 0


def test_a_crash_between_the_outbox_commit_and_the_ack_leaves_each_event_once(
    sqlite_store: EventStore, amqp_url: str, legacy_queue: str
) -> None:
    publish(amqp_url, legacy_queue, mixed_messages(300))
    first = make_runner(sqlite_store, legacy_config(amqp_url, legacy_queue, prefetch=100, batch_size=100))
    first.adapter.committed = lambda batch: None  # type: ignore[method-assign]  # dies before acking
    first.run_once()
    committed = sqlite_store.stats()["events"]
    assert committed > 0
    first.adapter.close()  # the crash: the connection goes, the broker requeues the unacked messages
    second = make_runner(sqlite_store, legacy_config(amqp_url, legacy_queue))
    with Running(second):
        wait_for(lambda: sqlite_store.stats()["events"] >= 300, 60, "300 events")
        wait_for(lambda: queue_counts(amqp_url, legacy_queue)[0] == 0, 30, "an empty queue")
    ids = stored_ids(sqlite_store)
    assert sorted(ids) == list(range(1, 301))  # redelivered messages were duplicates, ignored
    assert second.status.duplicates >= committed


def test_the_legacy_topology_is_left_alone_and_a_missing_queue_is_a_configuration_error(
    sqlite_store: EventStore, amqp_url: str
) -> None:
    missing = f"no-such-queue-{uuid.uuid4().hex[:6]}"
    runner = make_runner(sqlite_store, legacy_config(amqp_url, missing))
    with pytest.raises(ConfigurationError, match=f"config.queue: queue '{missing}' does not exist on the legacy broker"):
        runner.adapter.open()
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="NOT_FOUND"):
        conn.channel().queue_declare(missing, passive=True)  # the gateway did not create it
    conn.close()


def test_declare_creates_the_configured_queue_and_binding(sqlite_store: EventStore, amqp_url: str) -> None:
    name = f"legacy-declared-{uuid.uuid4().hex[:6]}"
    cfg = legacy_config(amqp_url, name, declare={"exchange": f"{name}.x", "exchange_type": "topic", "routing_keys": ["orders.#"]})
    runner = make_runner(sqlite_store, cfg)
    runner.adapter.open()
    try:
        conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish(f"{name}.x", "orders.new", b'{"id": 7}', pika.BasicProperties(content_type="application/json"))
        conn.close()
        wait_for(lambda: bool(runner.run_once().records) or sqlite_store.stats()["events"] == 1, 10, "the routed message")
        assert stored_ids(sqlite_store) == [7]
    finally:
        runner.adapter.close()
        conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        ch = conn.channel()
        ch.queue_delete(name)
        ch.exchange_delete(f"{name}.x")
        conn.close()


def test_manual_acks_and_prefetch_bound_what_the_source_holds(sqlite_store: EventStore, amqp_url: str, legacy_queue: str) -> None:
    """The broker sends at most ``prefetch`` unacked messages; none is acked before a commit."""
    publish(amqp_url, legacy_queue, [(json.dumps({"id": i}).encode(), "application/json", f"m-{i}") for i in range(50)])
    runner = make_runner(sqlite_store, legacy_config(amqp_url, legacy_queue, prefetch=7, batch_size=100))
    adapter: AmqpSource = runner.adapter  # type: ignore[assignment]
    try:
        batch = adapter.fetch(None, 100)
        assert len(batch.records) == 7  # the batch is cut at the prefetch
        wait_for(lambda: queue_counts(amqp_url, legacy_queue)[0] == 43, 10, "43 ready, 7 unacked")
    finally:
        adapter.close()  # never committed: the 7 go back to the queue
    wait_for(lambda: queue_counts(amqp_url, legacy_queue)[0] == 50, 10, "all 50 ready again")
    assert sqlite_store.stats()["events"] == 0


def test_sources_test_on_a_queue_source_needs_allow_redelivery_and_leaves_the_messages(
    amqp_url: str, legacy_queue: str, tmp_path: Any
) -> None:
    """A dry run of a consuming source takes the messages and hands them back: the CLI says so and
    asks for --allow-redelivery; with it the events and the rejects are printed and the queue keeps
    every message."""
    import json

    from typer.testing import CliRunner

    from gateway.cli import app

    publish(amqp_url, legacy_queue, [
        (json.dumps({"id": i, "customer": f"c{i}", "amount": "1.00"}).encode(), "application/json", f"m-{i}")
        for i in range(3)
    ] + [(b'{"id": 9, "broken', "application/json", "bad-1")])
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(json.dumps({
        "profile": "test", "store": {"url": f"sqlite:///{tmp_path / 'g.db'}"},
        "sources": [{"name": "legacy-queue", "adapter": "amqp", "config": legacy_config(amqp_url, legacy_queue),
                     "mapping": MAPPING}],
    }))
    runner = CliRunner()
    refused = runner.invoke(app, ["sources", "test", "legacy-queue", "-c", str(cfg)])
    assert refused.exit_code == 2 and "--allow-redelivery" in refused.output and "delivery_limit" in refused.output
    assert queue_counts(amqp_url, legacy_queue)[0] == 4
    ran = runner.invoke(app, ["sources", "test", "legacy-queue", "-c", str(cfg), "--allow-redelivery", "--limit", "10"])
    assert ran.exit_code == 0, ran.output
    events = [json.loads(line) for line in ran.stdout.splitlines() if line.startswith("{")]
    assert sorted(e["subject"] for e in events) == ["order/0", "order/1", "order/2"]
    assert "rejected (would go to dead letters): DecodeError" in ran.stdout
    deadline = time.monotonic() + 10
    while queue_counts(amqp_url, legacy_queue)[0] != 4:  # handed back, nothing consumed
        assert time.monotonic() < deadline, "the dry run did not hand the messages back"
        time.sleep(0.1)
