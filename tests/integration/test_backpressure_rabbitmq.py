"""REL-09 against real RabbitMQ and PostgreSQL: backpressure instead of loss.

The scoring queue holds at most 5 messages (``x-max-length=5``, ``overflow: reject-publish``) and
nobody consumes it. 50 events are posted through the REST API while the relay runs and a source
runner polls: the broker nacks what does not fit, those rows stay pending (attempts + 1), the API
answers 503 with ``Retry-After`` once the backlog threshold is crossed, and the poller pauses in
state ``backpressure``. Then a consumer drains the queue: every accepted event -- posted or polled
-- is delivered exactly once.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from gateway.api import create_app
from gateway.bus import Topology
from gateway.bus.rabbitmq import RabbitBus
from gateway.config import ApiSettings, BusSettings, RelaySettings, Settings
from gateway.relay import Relay
from gateway.resilience import OutboxBackpressure
from gateway.store import EventStore
from tests.rabbit import delete_broker_objects
from tests.unit.test_source_breaker import make_runner

pytestmark = pytest.mark.integration

THRESHOLD = 20
QUEUE_MAX = 5
FLOOD = 50
SOURCE_ROWS = 6


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.fixture
def bus(amqp_url: str, bus_prefix: str) -> Iterator[RabbitBus]:
    settings = BusSettings(url=SecretStr(amqp_url), prefix=bus_prefix, max_queue_length=QUEUE_MAX,
                           publish_timeout=10.0, reconnect_max_delay=1.0)
    rabbit = RabbitBus(settings, Topology.from_settings(settings), thread_guard=True)
    rabbit.declare_topology()
    yield rabbit
    rabbit.close()
    delete_broker_objects(amqp_url, Topology.from_settings(settings))


def ce(i: int) -> dict[str, Any]:
    return {"specversion": "1.0", "id": f"flood-{i}", "source": "/tests/flood", "type": "com.example.flood",
            "data": {"n": i}}


def test_flood_backpressures_api_and_poller_and_delivers_every_accepted_event_once(
    pg_store: EventStore, bus: RabbitBus
) -> None:
    topo = bus.topology
    publisher = bus.publisher()
    relay = Relay(pg_store, publisher, topo, RelaySettings(retry_base_delay=0.01, retry_max_delay=0.05),
                  publish_timeout=10.0)
    app = create_app(Settings(api=ApiSettings(backlog_threshold=THRESHOLD, auth=False)), pg_store)
    client = TestClient(app, raise_server_exceptions=False)

    # The relay runs all along, as in production: it keeps trying the pending rows.
    stop = threading.Event()

    def relay_loop() -> None:
        while not stop.is_set():
            if relay.run_once() == 0:
                time.sleep(0.02)

    relay_thread = threading.Thread(target=relay_loop, daemon=True)
    relay_thread.start()
    gate = OutboxBackpressure(lambda: pg_store.pending_stats()[0], THRESHOLD, resume_ratio=0.9, interval=0.05)
    runner, adapter, _clock = make_runner(pg_store, n=SOURCE_ROWS, backpressure=gate, status_interval=0.05)
    runner._clock = time.monotonic  # real time for its waits
    runner_thread = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    consumer = None
    try:
        # -- flood: one event per request, as fast as the client goes.
        accepted: list[str] = []
        refused: list[Any] = []
        for i in range(FLOOD):
            resp = client.post("/v1/events", content=json.dumps(ce(i)), headers={"content-type": "application/json"})
            if resp.status_code == 202:
                accepted.extend(resp.json()["accepted"])
            else:
                assert resp.status_code == 503, resp.text
                assert resp.json()["type"].endswith("backpressure")
                assert int(resp.headers["Retry-After"]) >= 1
                refused.append(resp)
            time.sleep(0.005)
        assert refused, "the API never pushed back"
        assert THRESHOLD < len(accepted) < FLOOD
        for eid in accepted:  # accepted means stored: nothing was dropped
            assert pg_store.get_event(eid) is not None

        # -- the relay's publishes beyond the queue's 5 are nacked and stay pending, attempts + 1.
        assert wait_until(lambda: relay.stats.nacked > 0)
        # A quorum queue's length limit is soft under concurrent publishes: a few more may get in.
        assert wait_until(lambda: bus.queue_depth(topo.scoring_queue) >= QUEUE_MAX)
        depth = bus.queue_depth(topo.scoring_queue)
        assert depth < len(accepted) - THRESHOLD // 2, depth
        assert wait_until(lambda: pg_store.pending_stats()[0] == len(accepted) - bus.queue_depth(topo.scoring_queue))
        depth = bus.queue_depth(topo.scoring_queue)
        assert wait_until(lambda: sum(
            1 for eid in accepted if (ev := pg_store.get_event(eid)) and ev.status == "pending" and ev.attempts >= 1
        ) == len(accepted) - depth)

        # -- the poller pauses instead of piling more on.
        runner_thread.start()
        assert wait_until(lambda: runner.status.state == "backpressure")
        assert wait_until(lambda: (st := pg_store.get_source_status("mem")) is not None and st.state == "backpressure")
        time.sleep(0.3)
        assert adapter.calls == 0

        # -- a consumer drains the queue: everything accepted arrives, the poller resumes.
        consumer = bus.consumer(topo.scoring_queue, 10)
        delivered: Counter[str] = Counter()

        def drain_some() -> None:
            batch = consumer.get_batch(10, 0.2, 0.02)
            for d in batch:
                delivered[d.message_id] += 1
            if batch:
                consumer.ack(batch)

        def everything_delivered() -> bool:
            drain_some()
            return len(delivered) == len(accepted) + SOURCE_ROWS

        assert wait_until(everything_delivered, timeout=60.0), (len(delivered), len(accepted))
        assert adapter.calls >= 1 and runner.status.state != "backpressure"
        for _ in range(5):  # nothing more, and nothing twice
            drain_some()
        assert set(accepted) <= set(delivered)
        assert all(n == 1 for n in delivered.values()), [k for k, n in delivered.items() if n > 1]
        assert len(delivered) == len(accepted) + SOURCE_ROWS
        assert pg_store.pending_stats()[0] == 0
    finally:
        stop.set()
        relay_thread.join(15)
        if runner_thread.is_alive():
            runner_thread.join(15)
        if consumer is not None:
            consumer.close()
        publisher.close()
