"""PikaConsumer without a broker: pause/resume, the hand-out decision, the watchdog, liveness (REL-10).

The I/O-thread callbacks are driven directly from the test with a recording fake channel, so
every frame the consumer would send is visible and ordered. The real broker behaviour is proven
in ``tests/integration/test_consumer_liveness.py``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import SecretStr

from gateway.bus import Topology
from gateway.bus.pika_consumer import DeliveryTag, PikaConsumer
from gateway.bus.pika_params import connection_parameters
from gateway.bus.rabbitmq import RabbitBus
from gateway.config import BusSettings


class FakeChannel:
    """Records the frames a consumer sends; RPC callbacks are kept for the test to answer."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.is_open = True
        self.qos_callbacks: list[Any] = []
        self.declare_callbacks: list[Any] = []
        self._tags = 0

    def basic_qos(self, prefetch_count: int, callback: Any) -> None:
        self.calls.append(("qos", prefetch_count))
        self.qos_callbacks.append(callback)

    def add_on_cancel_callback(self, _cb: Any) -> None:
        pass

    def basic_consume(self, queue: str, _on_message: Any, auto_ack: bool) -> str:
        assert auto_ack is False
        self._tags += 1
        self.calls.append(("consume", queue))
        return f"ctag{self._tags}"

    def basic_cancel(self, tag: str, callback: Any = None) -> None:
        self.calls.append(("cancel", tag))

    def basic_reject(self, delivery_tag: int, requeue: bool) -> None:
        self.calls.append(("reject", delivery_tag, requeue))

    def basic_ack(self, delivery_tag: int, multiple: bool) -> None:
        self.calls.append(("ack", delivery_tag, multiple))

    def queue_declare(self, queue: str, passive: bool, callback: Any) -> None:
        assert passive is True
        self.calls.append(("declare", queue))
        self.declare_callbacks.append(callback)

    def close(self) -> None:
        self.calls.append(("close",))
        self.is_open = False

    def kinds(self) -> list[Any]:
        return [c[0] for c in self.calls]


def _settings(**kw: object) -> BusSettings:
    return BusSettings(url=SecretStr("amqp://gw:pw@127.0.0.1:1/%2F"), **kw)  # type: ignore[arg-type]


@pytest.fixture
def consumer() -> Iterator[PikaConsumer]:
    s = _settings(watchdog_interval=5.0)
    con = PikaConsumer(s, Topology.from_settings(s), "gateway.scoring", 10, thread_guard=False)
    yield con
    con._ioloop.close()  # never started: release the loop's file descriptors


def _set_up(con: PikaConsumer, channel: FakeChannel) -> None:
    """Run the consumer's I/O-thread set-up on ``channel`` (as after a (re)connect)."""
    con._channel = con._raw_channel = channel
    con._on_setup(channel)
    channel.qos_callbacks.pop()(None)


def _deliver(con: PikaConsumer, *tags: int) -> None:
    for tag in tags:
        method = SimpleNamespace(delivery_tag=tag, routing_key="a.b", redelivered=False)
        props = SimpleNamespace(headers=None, message_id=f"m{tag}", content_type="application/json")
        con._on_message(None, method, props, b"{}")


def _lose(con: PikaConsumer) -> None:
    con._ready.clear()
    con._channel = con._raw_channel = None
    con._on_lost()


def test_setup_sets_qos_then_subscribes(consumer: PikaConsumer) -> None:
    ch = FakeChannel()
    _set_up(consumer, ch)
    assert ch.calls == [("qos", 10), ("consume", "gateway.scoring")]
    assert consumer.ready and consumer._consuming
    ok, detail = consumer.liveness()
    assert ok and "consuming (prefetch 10)" in detail and "no delivery yet" in detail


def test_pause_cancels_first_then_returns_only_what_was_not_handed_out(consumer: PikaConsumer) -> None:
    ch = FakeChannel()
    _set_up(consumer, ch)
    _deliver(consumer, 1, 2, 3, 4, 5)
    handed = consumer.get_batch(2, 1.0, 0.0)
    assert [d.tag.delivery_tag for d in handed] == [1, 2]
    ch.calls.clear()

    consumer.pause()
    assert consumer.paused
    assert consumer.get_batch(10, 0.05, 0.0) == []  # 3, 4, 5 were taken back: never handed out
    consumer._reconcile()  # what the I/O thread runs after pause()
    assert ch.calls == [("cancel", "ctag1"), ("reject", 3, True), ("reject", 4, True), ("reject", 5, True)]
    assert not consumer._consuming and consumer._outstanding == {1, 2}

    # Handed-out deliveries stay valid: one multiple ack covers both.
    ch.calls.clear()
    consumer._do_ack([d.tag for d in handed])
    assert ch.calls == [("ack", 2, True)]
    # A returned delivery cannot be acked any more (it is back in the queue).
    consumer._do_ack([DeliveryTag(consumer._owner, consumer._generation, 3)])
    assert ch.calls == [("ack", 2, True)]

    ok, detail = consumer.liveness()
    assert ok and "paused" in detail


def test_pause_is_idempotent_and_a_late_delivery_goes_straight_back(consumer: PikaConsumer) -> None:
    ch = FakeChannel()
    _set_up(consumer, ch)
    consumer.pause()
    consumer.pause()
    consumer._reconcile()
    consumer._reconcile()
    assert [c for c in ch.calls if c[0] == "cancel"] == [("cancel", "ctag1")]
    ch.calls.clear()
    _deliver(consumer, 7)  # was in flight when the cancel went out
    assert ch.calls == [("reject", 7, True)]
    assert consumer.get_batch(5, 0.05, 0.0) == []


def test_resume_subscribes_again_with_the_new_prefetch(consumer: PikaConsumer) -> None:
    ch = FakeChannel()
    _set_up(consumer, ch)
    consumer.pause()
    consumer._reconcile()
    ch.calls.clear()
    consumer.resume(prefetch=2)
    consumer._reconcile()
    assert ch.calls == [("qos", 2), ("consume", "gateway.scoring")]
    assert consumer.prefetch == 2 and not consumer.paused
    ch.calls.clear()
    consumer.resume()  # idempotent: nothing to do
    consumer.resume(2)
    consumer._reconcile()
    assert ch.calls == []


def test_changing_prefetch_of_a_running_consumer_restarts_the_subscription(consumer: PikaConsumer) -> None:
    # RabbitMQ applies a per-consumer basic.qos only to consumers started after it.
    ch = FakeChannel()
    _set_up(consumer, ch)
    _deliver(consumer, 1)
    ch.calls.clear()
    consumer.resume(50)
    consumer._reconcile()
    assert ch.calls == [("qos", 50), ("cancel", "ctag1"), ("consume", "gateway.scoring")]
    got = consumer.get_batch(5, 0.5, 0.0)
    assert [d.tag.delivery_tag for d in got] == [1]  # still valid: same channel
    consumer._do_ack([d.tag for d in got])
    assert ch.calls[-1] == ("ack", 1, True)


def test_resume_validates_prefetch(consumer: PikaConsumer) -> None:
    for bad in (0, -1, 65536, 2.5, True):
        with pytest.raises(ValueError, match="prefetch"):
            consumer.resume(bad)  # type: ignore[arg-type]
    assert consumer.prefetch == 10


def test_pause_survives_a_reconnect(consumer: PikaConsumer) -> None:
    ch = FakeChannel()
    _set_up(consumer, ch)
    _deliver(consumer, 1, 2)
    consumer.pause()
    _lose(consumer)  # the connection dropped before the I/O thread ran the pause
    consumer._reconcile()  # no channel: nothing to send
    assert ch.calls == [("qos", 10), ("consume", "gateway.scoring")]
    ch2 = FakeChannel()
    _set_up(consumer, ch2)
    assert ch2.calls == [("qos", 10)]  # re-set QoS, but no subscription while paused
    assert consumer.ready and not consumer._consuming
    consumer.resume()
    consumer._reconcile()
    assert ch2.calls == [("qos", 10), ("consume", "gateway.scoring")]
    # Deliveries of the dead channel are neither handed out nor acked on the new one.
    assert consumer.get_batch(5, 0.05, 0.0) == []


def test_recovery_resets_the_prefetch_asked_for_last(consumer: PikaConsumer) -> None:
    _set_up(consumer, FakeChannel())
    consumer.resume(3)
    _lose(consumer)
    ch = FakeChannel()
    _set_up(consumer, ch)
    assert ch.calls == [("qos", 3), ("consume", "gateway.scoring")]


def test_hand_out_and_pause_race_never_loses_or_doubles_a_delivery(consumer: PikaConsumer) -> None:
    """Each delivery is either handed out (and stays ackable) or given back, never both or neither."""
    ch = FakeChannel()
    _set_up(consumer, ch)
    n = 2000
    _deliver(consumer, *range(1, n + 1))
    handed: list[int] = []
    started = threading.Barrier(2)

    def worker() -> None:
        started.wait()
        while True:
            batch = consumer.get_batch(7, 0.05, 0.0)
            if not batch:
                return
            handed.extend(d.tag.delivery_tag for d in batch)
            time.sleep(0.0005)  # the handler's work; lets the pause land mid-stream

    t = threading.Thread(target=worker)
    t.start()
    started.wait()
    while not handed:
        pass
    consumer.pause()
    t.join()
    consumer._reconcile()
    returned = [c[1] for c in ch.calls if c[0] == "reject"]
    assert handed and returned, "the pause should have landed mid-stream"
    assert sorted(handed + returned) == list(range(1, n + 1))
    assert consumer._outstanding == set(handed)


def _tick(con: PikaConsumer, ch: FakeChannel, ready: int) -> None:
    """One watchdog check, answered with ``ready`` messages when it asks the broker."""
    before = len(ch.declare_callbacks)
    con._watchdog_tick()
    if len(ch.declare_callbacks) > before:
        ch.declare_callbacks[-1](SimpleNamespace(method=SimpleNamespace(message_count=ready)))


def test_watchdog_resubscribes_a_consumer_that_gets_nothing_while_messages_wait(consumer: PikaConsumer) -> None:
    ch = FakeChannel()
    _set_up(consumer, ch)
    _tick(consumer, ch, ready=5)
    assert ("close",) not in ch.calls and consumer.watchdog_resubscribes == 0  # one strike only
    _tick(consumer, ch, ready=5)
    assert ch.calls[-1] == ("close",)
    assert consumer.watchdog_resubscribes == 1


@pytest.mark.parametrize("case", ["empty queue", "deliveries flowing", "unacked held", "paused"])
def test_watchdog_leaves_healthy_consumers_alone(consumer: PikaConsumer, case: str) -> None:
    ch = FakeChannel()
    _set_up(consumer, ch)
    if case == "unacked held":
        _deliver(consumer, 1, 2)
        consumer.get_batch(2, 0.1, 0.0)  # a slow handler sits on them
    if case == "paused":
        consumer.pause()
        consumer._reconcile()
    for i in range(6):
        if case == "deliveries flowing":
            _deliver(consumer, i + 1)
            consumer._do_ack([d.tag for d in consumer.get_batch(1, 0.1, 0.0)])
        _tick(consumer, ch, ready=0 if case == "empty queue" else 100)
    assert ("close",) not in ch.calls
    assert consumer.watchdog_resubscribes == 0
    if case in ("unacked held", "paused"):
        assert ("declare", "gateway.scoring") not in ch.calls  # not even asked


def test_watchdog_strikes_reset_on_progress(consumer: PikaConsumer) -> None:
    ch = FakeChannel()
    _set_up(consumer, ch)
    _tick(consumer, ch, ready=5)
    _deliver(consumer, 1)
    consumer._do_ack([d.tag for d in consumer.get_batch(1, 0.1, 0.0)])
    _tick(consumer, ch, ready=5)  # a delivery arrived since the last check: not suspicious
    _tick(consumer, ch, ready=5)  # first strike again
    assert ("close",) not in ch.calls
    _tick(consumer, ch, ready=5)
    assert ch.calls[-1] == ("close",)


@pytest.mark.parametrize("interval", [0.0, 2.5])
def test_watchdog_is_armed_after_set_up_unless_disabled(interval: float) -> None:
    s = _settings(watchdog_interval=interval)
    con = PikaConsumer(s, Topology.from_settings(s), "q", 1, thread_guard=False)
    timers: list[tuple[float, Any]] = []
    con._ioloop.call_later = lambda delay, cb: timers.append((delay, cb))  # type: ignore[method-assign]
    try:
        _set_up(con, FakeChannel())
        _set_up(con, FakeChannel())  # a recovery does not arm a second timer chain
        ticks = [d for d, cb in timers if getattr(cb, "__name__", "") == "_watchdog_tick"]
        assert ticks == ([] if interval == 0 else [interval])
    finally:
        del con._ioloop.call_later
        con._ioloop.close()


def test_liveness_down_closed_and_grace() -> None:
    s = _settings(socket_timeout=1.0, reconnect_max_delay=1.0)
    con = PikaConsumer(s, Topology.from_settings(s), "q", 1, thread_guard=False)
    try:
        ok, detail = con.liveness()
        assert ok and "disconnected for" in detail  # within the grace of a first attempt
        con._down_since -= 60  # type: ignore[operator]
        ok, detail = con.liveness()
        assert not ok and "disconnected for 6" in detail
    finally:
        con._ioloop.close()
    con._close_requested = True
    assert con.liveness() == (False, "q: closed")


def test_every_connection_is_built_from_settings_and_publisher_consumer_are_separate(monkeypatch: pytest.MonkeyPatch) -> None:
    """REL-10: the bus's clients each get their own parameters (and so connection) from settings."""
    s = _settings(heartbeat=13, blocked_connection_timeout=21.0, socket_timeout=4.0)
    built: list[Any] = []
    monkeypatch.setattr("gateway.bus.pika_params.connection_parameters",
                        lambda st, name="gateway": built.append((st, name)) or connection_parameters(st, name))
    bus = RabbitBus(s, Topology.from_settings(s))
    started: list[Any] = []
    monkeypatch.setattr("gateway.bus.pika_params.IOThreadClient.start", lambda self, wait: started.append(self))
    pub = bus.publisher()
    con = bus.consumer(bus.topology.scoring_queue, 5)
    try:
        assert pub is not con and pub._ioloop is not con._ioloop
        names = [name for _st, name in built]
        assert pub.name in names and con.name in names and pub.name != con.name
        for client in (pub, con):
            p = client._params
            assert (p.heartbeat, p.blocked_connection_timeout, p.socket_timeout, p.stack_timeout) == (13, 21.0, 4.0, 9.0)
            assert p.client_properties["connection_name"] == client.name
    finally:
        bus.close()
        pub._ioloop.close()
        con._ioloop.close()
