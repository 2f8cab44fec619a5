"""PikaConsumer on a real RabbitMQ: pause/resume, the liveness watchdog, slow handlers, hygiene (REL-05, REL-10).

Every test uses its own ``bus_prefix`` (connection names start with it) and deletes its queues
and exchanges afterwards. Connection faults close only this test's connections with
``rabbitmqctl close_connection``; the broker itself is never stopped. The thread-ownership guard
is on for every pika object.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pytest
from pydantic import SecretStr

from gateway.bus import Delivery, Outcome, Topology
from gateway.bus.pika_consumer import PikaConsumer
from gateway.bus.rabbitmq import RabbitBus
from gateway.config import BusSettings
from tests.bus_contract import drain, make_messages

pytestmark = pytest.mark.integration


def _settings(amqp_url: str, prefix: str, **kw: object) -> BusSettings:
    base: dict[str, object] = {"url": SecretStr(amqp_url), "prefix": prefix, "heartbeat": 10,
                               "reconnect_max_delay": 1.0, "publish_timeout": 10.0}
    base.update(kw)
    return BusSettings(**base)  # type: ignore[arg-type]


def _ctl(*args: str) -> Any:
    done = subprocess.run(["rabbitmqctl", "-q", *args, "--formatter", "json"],
                          capture_output=True, text=True, timeout=30, check=True)
    return json.loads(done.stdout or "[]")


def _connections(prefix: str) -> dict[str, dict[str, Any]]:
    """This test's connections by their client-provided name: pid and negotiated heartbeat."""
    out = {}
    for row in _ctl("list_connections", "pid", "client_properties", "timeout"):
        props = {k: v for k, _t, v in row["client_properties"]}
        name = str(props.get("connection_name", ""))
        if name.startswith(prefix + "-"):
            out[name] = row
    return out


def _close_connection(name: str) -> None:
    """Force-close one of this test's connections (by its unique name) from the broker side."""
    def run(*args: str) -> str:
        return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout

    # close_connection wants the pid as the plain listing prints it (not the JSON form).
    listing = run("list_connections", "pid", "client_properties", "--no-table-headers")
    pids = [line.partition("\t")[0] for line in listing.splitlines() if f'{{"connection_name","{name}"}}' in line]
    assert len(pids) == 1, f"expected one connection named {name!r}, found {len(pids)}"
    run("close_connection", pids[0], "test cut")


def _channels_of(pid: str) -> list[dict[str, Any]]:
    return [c for c in _ctl("list_channels", "connection", "confirm", "prefetch_count", "consumer_count")
            if c["connection"] == pid]


class _Queue:
    """Broker-side view of one queue through passive declares (its own short connection)."""

    def __init__(self, amqp_url: str, name: str) -> None:
        self.url, self.name = amqp_url, name

    def counts(self) -> tuple[int, int]:
        """(ready messages, consumers)."""
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            ok = conn.channel().queue_declare(self.name, passive=True).method
            return int(ok.message_count), int(ok.consumer_count)
        finally:
            conn.close()

    def subscriptions(self) -> list[dict[str, Any]]:
        """Active subscriptions (``rabbitmqctl list_consumers``) with their prefetch."""
        rows = _ctl("list_consumers", "queue_name", "consumer_tag", "prefetch_count")
        return [r for r in rows if r["queue_name"] == self.name]

    def unacked(self) -> int:
        """Unacked messages from the queue statistics (refreshed every few seconds: poll it)."""
        rows = _ctl("list_queues", "name", "messages_unacknowledged")
        return next(int(r["messages_unacknowledged"]) for r in rows if r["name"] == self.name)


def _until(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``cond`` until true; return the seconds it took, fail naming ``what`` after ``timeout``."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def _take(con: PikaConsumer, n: int, timeout: float = 10.0) -> list[Delivery]:
    out: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out.extend(con.get_batch(n - len(out), 0.5, 0.05))
    return out


@pytest.fixture(autouse=True)
def _delete_broker_objects(amqp_url: str, bus_prefix: str) -> Iterator[None]:
    yield
    topo = Topology(bus_prefix)
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        ch = conn.channel()
        for spec in topo.queues():
            ch.queue_delete(spec.name)
        for name, _ in topo.exchanges():
            ch.exchange_delete(name)
    finally:
        conn.close()


@pytest.fixture
def make_bus(amqp_url: str, bus_prefix: str) -> Iterator[Callable[..., RabbitBus]]:
    buses: list[RabbitBus] = []

    def make(**kw: object) -> RabbitBus:
        s = _settings(amqp_url, bus_prefix, **kw)
        bus = RabbitBus(s, Topology.from_settings(s), thread_guard=True)
        bus.declare_topology()
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        bus.close()


def test_pause_returns_buffered_keeps_handed_out_and_resume_honours_new_prefetch(
    make_bus: Callable[..., RabbitBus], amqp_url: str
) -> None:
    bus = make_bus(watchdog_interval=1.0)
    t = bus.topology
    q = _Queue(amqp_url, t.scoring_queue)
    pub = bus.publisher()
    con = bus.consumer(t.scoring_queue, 10)
    assert pub.publish(t.events_exchange, make_messages(20)).result(10) == [Outcome.ACK] * 20
    _until(lambda: q.unacked() == 10, 15, "a full prefetch of 10 sent to the consumer")
    handed = _take(con, 3)
    assert len(handed) == 3

    con.pause()
    assert con.get_batch(10, 0.3, 0.05) == []  # the 7 buffered ones are not handed out any more
    _until(lambda: q.counts()[0] == 17 and q.subscriptions() == [], 10,
           "no subscription and the 7 buffered messages back in the queue")
    # A quorum queue still counts a cancelled consumer while it holds unacked messages (3.10):
    # the handed-out three are still ours, and acking them works while paused.
    _until(lambda: q.unacked() == 3, 15, "3 unacked (the broker's queue statistics lag a few seconds)")
    con.ack(handed)
    _until(lambda: q.unacked() == 0, 15, "the handed-out deliveries acked while paused")
    _until(lambda: q.counts() == (17, 0), 10, "0 consumers on the queue")

    # New messages stay in the queue; several watchdog intervals pass without a re-subscribe.
    assert pub.publish(t.events_exchange, make_messages(5, start=100)).result(10) == [Outcome.ACK] * 5
    assert con.get_batch(10, 3.5, 0.05) == []
    assert q.counts() == (22, 0)
    assert con.watchdog_resubscribes == 0 and con.connects == 1
    ok, detail = con.liveness()
    assert ok and "paused" in detail

    con.resume(prefetch=2)
    _until(lambda: q.counts()[1] == 1, 10, "the consumer subscribed again")
    assert [c["prefetch_count"] for c in q.subscriptions()] == [2]
    received: list[Delivery] = []
    while True:
        batch = con.get_batch(10, 2.0, 0.3)
        if not batch:
            break
        extra = con.get_batch(10, 0.3, 0.0)
        if len(batch) == 2:
            assert extra == []  # with 2 unacked, the broker sends nothing more until we ack
        batch += extra
        assert len(batch) <= 2
        received.extend(batch)
        con.ack(batch)
    ids = [d.message_id for d in received]
    expected = {f"m{i}" for i in range(3, 20)} | {f"m{i}" for i in range(100, 105)}
    assert sorted(ids) == sorted(expected)  # each exactly once; the acked three never came back
    assert q.counts() == (0, 1)


def test_resume_changes_the_prefetch_of_a_running_consumer(make_bus: Callable[..., RabbitBus], amqp_url: str) -> None:
    bus = make_bus()
    t = bus.topology
    q = _Queue(amqp_url, t.scoring_queue)
    pub = bus.publisher()
    con = bus.consumer(t.scoring_queue, 10)
    _until(lambda: [c["prefetch_count"] for c in q.subscriptions()] == [10], 10, "the first subscription")
    con.resume(prefetch=2)  # not paused: only the prefetch changes
    _until(lambda: [c["prefetch_count"] for c in q.subscriptions()] == [2], 10, "a subscription with prefetch 2")
    assert pub.publish(t.events_exchange, make_messages(6)).result(10) == [Outcome.ACK] * 6
    first = _take(con, 6, timeout=3.0)
    assert len(first) == 2
    con.ack(first)
    rest = drain(con, idle=1.0)
    assert sorted(d.message_id for d in first + rest) == [f"m{i}" for i in range(6)]


def test_pause_survives_a_forced_connection_close(
    make_bus: Callable[..., RabbitBus], amqp_url: str, bus_prefix: str
) -> None:
    bus = make_bus()
    t = bus.topology
    q = _Queue(amqp_url, t.scoring_queue)
    pub = bus.publisher()
    con = bus.consumer(t.scoring_queue, 5)
    con.pause()
    _until(lambda: q.counts()[1] == 0, 10, "the pause to cancel the subscription")
    assert pub.publish(t.events_exchange, make_messages(4)).result(10) == [Outcome.ACK] * 4

    _close_connection(con.name)
    _until(lambda: con.connects >= 2 and con.ready, 20, "the consumer to reconnect")
    assert con.name in _connections(bus_prefix)
    # Recovered (topology re-declared, QoS set) but still not subscribed.
    for _ in range(10):
        assert q.counts() == (4, 0)
        time.sleep(0.1)
    assert con.get_batch(10, 0.5, 0.05) == []

    con.resume()
    got = _take(con, 4)
    con.ack(got)
    assert sorted(d.message_id for d in got) == [f"m{i}" for i in range(4)]
    _until(lambda: q.counts() == (0, 1), 10, "the queue drained")


def test_watchdog_resubscribes_a_silently_stopped_consumer(make_bus: Callable[..., RabbitBus], amqp_url: str) -> None:
    interval = 1.0
    bus = make_bus(watchdog_interval=interval)
    t = bus.topology
    q = _Queue(amqp_url, t.scoring_queue)
    pub = bus.publisher()
    con = bus.consumer(t.scoring_queue, 10)
    assert pub.publish(t.events_exchange, make_messages(1)).result(10) == [Outcome.ACK]
    con.ack(_take(con, 1))

    # Simulate a consumer that stopped after a reconnect: the broker drops the subscription but
    # the consumer's own state still says "consuming".
    def silent_cancel() -> None:
        con._channel.basic_cancel(con._consumer_tag)

    assert con.call_threadsafe(silent_cancel)
    _until(lambda: q.counts()[1] == 0, 10, "the broker to drop the subscription")
    assert con._consuming  # the consumer did not notice

    assert pub.publish(t.events_exchange, make_messages(5, start=10)).result(10) == [Outcome.ACK] * 5
    published = time.monotonic()
    got = _take(con, 5, timeout=20.0)
    detected_after = time.monotonic() - published
    con.ack(got)
    assert sorted(d.message_id for d in got) == [f"m{i}" for i in range(10, 15)]
    assert con.watchdog_resubscribes == 1
    # Requirement: detected within about two intervals; slack for the check's phase, the channel
    # re-open and a loaded 2-core machine.
    assert detected_after < 3 * interval + 3.0
    _until(lambda: q.counts() == (0, 1), 10, "the queue drained by the new subscription")
    ok, detail = con.liveness()
    assert ok and "1 watchdog re-subscribes" in detail


def test_watchdog_leaves_a_slow_handler_with_a_full_prefetch_alone(
    make_bus: Callable[..., RabbitBus], amqp_url: str
) -> None:
    bus = make_bus(watchdog_interval=1.0)
    t = bus.topology
    q = _Queue(amqp_url, t.scoring_queue)
    pub = bus.publisher()
    con = bus.consumer(t.scoring_queue, 3)
    assert pub.publish(t.events_exchange, make_messages(10)).result(10) == [Outcome.ACK] * 10
    held = _take(con, 3)
    assert len(held) == 3
    time.sleep(4.5)  # several intervals with ready messages, no delivery and a full prefetch held
    assert q.counts() == (7, 1)
    assert con.watchdog_resubscribes == 0 and con.connects == 1
    con.ack(held)
    rest = drain(con, idle=1.0)
    assert sorted(d.message_id for d in held + rest) == sorted(f"m{i}" for i in range(10))
    assert not any(d.redelivered for d in rest)  # the held ones were never requeued


def test_slow_handler_does_not_trip_heartbeats(make_bus: Callable[..., RabbitBus], amqp_url: str, bus_prefix: str) -> None:
    heartbeat = 2
    bus = make_bus(heartbeat=heartbeat)
    t = bus.topology
    q = _Queue(amqp_url, t.scoring_queue)
    pub = bus.publisher()
    con = bus.consumer(t.scoring_queue, 1)
    conns = _connections(bus_prefix)
    assert conns[con.name]["timeout"] == heartbeat  # the broker negotiated our heartbeat
    pid = conns[con.name]["pid"]
    assert pub.publish(t.events_exchange, make_messages(1)).result(10) == [Outcome.ACK]
    [delivery] = _take(con, 1)

    time.sleep(3 * heartbeat)  # the "handler" runs long in this (worker) thread
    con.ack([delivery])

    _until(lambda: q.unacked() == 0, 15, "the ack to land")
    assert q.counts() == (0, 1)
    assert con.get_batch(5, 1.0, 0.05) == []  # no redelivery
    assert con.connects == 1 and con.last_error == ""  # no recovery happened
    assert _connections(bus_prefix)[con.name]["pid"] == pid  # the very same connection


def test_publisher_and_consumer_have_own_connections_and_recover_confirms_and_qos(
    make_bus: Callable[..., RabbitBus], amqp_url: str, bus_prefix: str
) -> None:
    bus = make_bus(heartbeat=7)
    t = bus.topology
    q = _Queue(amqp_url, t.scoring_queue)
    pub = bus.publisher()
    con = bus.consumer(t.scoring_queue, 3)

    def check_connections() -> None:
        conns = _connections(bus_prefix)
        assert set(conns) == {pub.name, con.name} and pub.name != con.name
        assert all(c["timeout"] == 7 for c in conns.values())
        [pub_ch] = _channels_of(conns[pub.name]["pid"])
        [con_ch] = _channels_of(conns[con.name]["pid"])
        assert pub_ch["confirm"] is True and pub_ch["consumer_count"] == 0
        assert con_ch["confirm"] is False and con_ch["consumer_count"] == 1 and con_ch["prefetch_count"] == 3

    check_connections()
    _close_connection(pub.name)
    _close_connection(con.name)
    _until(lambda: pub.connects >= 2 and con.connects >= 2 and pub.ready and con.ready, 20, "both to reconnect")
    _until(lambda: q.counts()[1] == 1, 10, "the consumer to subscribe again")
    check_connections()

    # Confirms are on again: ACK is only ever the broker's basic.ack.
    assert pub.publish(t.events_exchange, make_messages(10)).result(10) == [Outcome.ACK] * 10
    # The prefetch is honoured again: 3 at a time until acked.
    first = _take(con, 10, timeout=3.0)
    assert len(first) == 3
    _until(lambda: q.unacked() == 3, 15, "3 unacked")
    con.ack(first)
    rest = drain(con, idle=1.0)
    assert sorted(d.message_id for d in first + rest) == sorted(f"m{i}" for i in range(10))

    health = bus.health()
    assert health.ok and "1 consumers live (0 paused)" in health.detail
