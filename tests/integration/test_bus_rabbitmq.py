"""The bus contract against a real RabbitMQ, plus RabbitMQ-only behaviour (REL-01/03/05/07/10).

Every test uses its own ``bus_prefix`` and deletes its queues and exchanges afterwards. The
thread-ownership guard is on for every pika object (REL-10). Connection cuts close only this
test's connections (``rabbitmqctl close_connection``), never the broker.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future

import pika
import pytest
from pydantic import SecretStr

from gateway.bus import Bus, Message, Outcome, Topology, bus_from_settings
from gateway.bus.pika_params import ThreadOwnershipError
from gateway.bus.rabbitmq import RabbitBus
from gateway.config import BusSettings
from gateway.errors import ConfigurationError
from tests.bus_contract import BusContract, drain, make_messages, wait_for
from tests.rabbit import delete_broker_objects

pytestmark = pytest.mark.integration


def settings_for(amqp_url: str, prefix: str, **kw: object) -> BusSettings:
    base: dict[str, object] = {"url": SecretStr(amqp_url), "prefix": prefix, "heartbeat": 10,
                               "reconnect_max_delay": 1.0, "publish_timeout": 10.0}
    base.update(kw)
    return BusSettings(**base)  # type: ignore[arg-type]


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=30, check=True)
    return done.stdout


def close_connections(prefix: str) -> int:
    """Force-close (from the broker) every connection whose name starts with ``prefix``."""
    out = rabbitmqctl("list_connections", "pid", "client_properties", "--no-table-headers")
    closed = 0
    for line in out.splitlines():
        pid, _, props = line.partition("\t")
        if f'{{"connection_name","{prefix}-' in props:
            rabbitmqctl("close_connection", pid, "test cut")
            closed += 1
    return closed


@pytest.fixture(autouse=True)
def _delete_broker_objects(amqp_url: str, bus_prefix: str) -> Iterator[None]:
    """After the test (and after its buses closed): delete this prefix's queues and exchanges."""
    yield
    delete_broker_objects(amqp_url, Topology.from_settings(BusSettings(prefix=bus_prefix)))


class TestRabbitBusContract(BusContract):
    @pytest.fixture(autouse=True)
    def _url(self, amqp_url: str) -> None:
        self.amqp_url = amqp_url

    def make_bus(self, prefix: str, *, delivery_limit: int = 5, max_queue_length: int | None = None) -> Bus:
        # max_attempts (the gateway's count) must stay below the broker's delivery limit.
        settings = settings_for(self.amqp_url, prefix, delivery_limit=delivery_limit,
                                max_attempts=min(3, delivery_limit - 1), max_queue_length=max_queue_length)
        return RabbitBus(settings, Topology.from_settings(settings), thread_guard=True)


@pytest.fixture
def settings(amqp_url: str, bus_prefix: str) -> BusSettings:
    return settings_for(amqp_url, bus_prefix)


@pytest.fixture
def rabbit(settings: BusSettings) -> Iterator[RabbitBus]:
    bus = RabbitBus(settings, Topology.from_settings(settings), thread_guard=True)
    bus.declare_topology()
    yield bus
    bus.close()


def test_bus_from_settings_builds_rabbitbus(settings: BusSettings) -> None:
    bus = bus_from_settings(settings)
    assert isinstance(bus, RabbitBus) and bus.kind == "rabbitmq"
    assert isinstance(bus, Bus)
    bus.close()


def test_queue_arguments_are_exactly_the_topology(rabbit: RabbitBus, bus_prefix: str) -> None:
    listed = json.loads(rabbitmqctl("list_queues", "name", "arguments", "durable", "type",
                                    "--vhost", "/", "--formatter", "json"))
    mine = {q["name"]: q for q in listed if q["name"].startswith(bus_prefix + ".")}
    expected = {spec.name: spec.arguments for spec in rabbit.topology.queues()}
    assert set(mine) == set(expected)
    for name, args in expected.items():
        assert {key: value for key, _type, value in mine[name]["arguments"]} == args
        assert mine[name]["durable"] is True
        assert mine[name]["type"] == "quorum"
    scoring = expected[rabbit.topology.scoring_queue]
    assert scoring["x-overflow"] == "reject-publish"
    assert scoring["x-dead-letter-strategy"] == "at-least-once"
    assert scoring["x-dead-letter-exchange"] == rabbit.topology.dead_letter_exchange


def test_mismatched_queue_fails_with_precondition_failed(settings: BusSettings, amqp_url: str) -> None:
    topo = Topology.from_settings(settings)
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    conn.channel().queue_declare(topo.scoring_queue, durable=True,
                                 arguments={"x-queue-type": "quorum", "x-delivery-limit": 99})
    conn.close()
    bus = RabbitBus(settings, topo, thread_guard=True)
    with pytest.raises(ConfigurationError) as err:
        bus.declare_topology()
    assert "PRECONDITION_FAILED" in str(err.value)
    assert topo.scoring_queue in str(err.value)
    bus.close()


def test_declare_topology_is_idempotent(rabbit: RabbitBus) -> None:
    rabbit.declare_topology()
    rabbit.declare_topology()


def test_consumer_and_publisher_recover_after_broker_closes_connections(rabbit: RabbitBus, bus_prefix: str) -> None:
    t = rabbit.topology
    pub = rabbit.publisher()
    con = rabbit.consumer(t.scoring_queue, 500)
    assert pub.ready and con.ready
    assert pub.publish(t.events_exchange, make_messages(10)).result(10) == [Outcome.ACK] * 10
    first = wait_for(con, 10)
    assert len(first) == 10

    # Publish continuously (two batches in flight) while the broker cuts both connections.
    stop = threading.Event()
    futures: list[tuple[list[Message], Future[list[Outcome]]]] = []

    def publish_loop() -> None:
        n = 1000
        while not stop.is_set():
            batch = make_messages(200, start=n)
            n += 200
            futures.append((batch, pub.publish(t.events_exchange, batch)))
            if len(futures) >= 2:
                futures[-2][1].result(30)

    worker = threading.Thread(target=publish_loop, daemon=True)
    worker.start()
    time.sleep(0.3)
    assert close_connections(bus_prefix) == 2
    deadline = time.monotonic() + 20
    while (pub.connects < 2 or con.connects < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pub.connects >= 2 and con.connects >= 2, (pub.last_error, con.last_error)
    time.sleep(0.3)
    stop.set()
    worker.join(30)
    outcomes = {m.message_id: o for batch, f in futures for m, o in zip(batch, f.result(30))}
    assert Outcome.LOST in outcomes.values()  # the batch in flight at the cut was not confirmed
    assert set(outcomes.values()) <= {Outcome.ACK, Outcome.LOST}

    # Acks of deliveries from the dead channel are dropped, not applied to the new channel.
    con.ack(first)
    # Publishing works again, and the consumer resumed by itself: every ACKed message arrives.
    assert pub.publish(t.events_exchange, make_messages(5, start=900)).result(10) == [Outcome.ACK] * 5
    acked = {mid for mid, o in outcomes.items() if o is Outcome.ACK} | {f"m{i}" for i in range(900, 905)}
    received = {d.message_id for d in drain(con, idle=1.0)}
    assert acked <= received
    assert {f"m{i}" for i in range(10)} <= received  # first deliveries were redelivered
    assert con.get_batch(10, 0.2, 0.0) == []


def test_thread_guard_rejects_cross_thread_use(rabbit: RabbitBus) -> None:
    pub = rabbit.publisher()
    con = rabbit.consumer(rabbit.topology.scoring_queue, 10)
    assert pub.ready and con.ready
    with pytest.raises(ThreadOwnershipError):
        pub._channel.basic_publish(rabbit.topology.events_exchange, "x", b"body")
    with pytest.raises(ThreadOwnershipError):
        con._connection.is_open  # noqa: B018 - the access itself must raise
    # The legitimate paths (hand-over to the I/O thread) still work with the guard on.
    assert pub.publish(rabbit.topology.events_exchange, make_messages(3)).result(10) == [Outcome.ACK] * 3
    got = wait_for(con, 3)
    con.ack(got)
    assert len(got) == 3


def test_publish_to_missing_exchange_is_lost_then_channel_recovers(rabbit: RabbitBus) -> None:
    pub = rabbit.publisher()
    out = pub.publish(rabbit.topology.prefix + ".nope", make_messages(2)).result(15)
    assert out == [Outcome.LOST] * 2  # the broker closed the channel (404)
    assert pub.publish(rabbit.topology.events_exchange, make_messages(2)).result(15) == [Outcome.ACK] * 2


def test_throughput_smoke_window_and_multiple_acks(amqp_url: str, bus_prefix: str) -> None:
    """10k persistent messages with a small confirm window (multiple acks, refills); no timing."""
    settings = settings_for(amqp_url, bus_prefix, confirm_window=128)
    bus = RabbitBus(settings, Topology.from_settings(settings), thread_guard=False)
    try:
        bus.declare_topology()
        pub = bus.publisher()
        futures = [pub.publish(bus.topology.events_exchange, make_messages(1000, start=i))
                   for i in range(0, 10_000, 1000)]
        assert all(f.result(60) == [Outcome.ACK] * 1000 for f in futures)
        con = bus.consumer(bus.topology.scoring_queue, 1000)
        got = drain(con, idle=1.0)
        assert len({d.message_id for d in got}) == len(got) == 10_000
        con.close()
        assert bus.queue_depth(bus.topology.scoring_queue) == 0
    finally:
        bus.close()


def test_health_never_shows_the_password(bus_prefix: str) -> None:
    sentinel = "S3ntinel-Pw-9431"
    for url in (f"amqp://guest:{sentinel}@127.0.0.1:5672/%2F", f"amqp://guest:{sentinel}@127.0.0.1:1/%2F"):
        settings = BusSettings(url=SecretStr(url), prefix=bus_prefix)
        bus = RabbitBus(settings, Topology.from_settings(settings))
        health = bus.health()
        assert not health.ok and health.kind == "rabbitmq"
        assert sentinel not in health.detail and sentinel not in repr(health)
        bus.close()


def test_queue_depth_of_missing_queue(rabbit: RabbitBus) -> None:
    with pytest.raises(ConfigurationError, match="NOT_FOUND"):
        rabbit.queue_depth(rabbit.topology.prefix + ".missing")
    with pytest.raises(ConfigurationError, match="NOT_FOUND"):
        rabbit.consumer(rabbit.topology.prefix + ".missing", 10)


def test_channel_closed_by_broker_is_not_swallowed_by_declare(rabbit: RabbitBus, amqp_url: str) -> None:
    # An exchange of another type is a 406 too: named in the error.
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    conn.channel().exchange_delete(rabbit.topology.scored_exchange)
    conn.channel().exchange_declare(rabbit.topology.scored_exchange, "fanout", durable=True)
    conn.close()
    with pytest.raises(ConfigurationError, match="PRECONDITION_FAILED.*scored"):
        rabbit.declare_topology()
