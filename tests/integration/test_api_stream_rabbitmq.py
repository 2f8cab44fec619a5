"""``GET /v1/events/stream`` on a real RabbitMQ: relay and scorer publish to ``<prefix>.scored``; the
API process's stream hub consumes it through its own ``x-expires`` queue and serves SSE clients.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
import uvicorn
from pydantic import SecretStr

from gateway.api import create_app
from gateway.api.routers.stream import StreamSettings
from gateway.runtime import Gateway
from tests.rabbit import delete_broker_objects
from tests.unit.test_api_stream import Rig, event, gateway_settings

pytestmark = pytest.mark.integration


@pytest.fixture
def rig(tmp_path: Path, amqp_url: str, bus_prefix: str) -> Iterator[Rig]:
    settings = gateway_settings(tmp_path).model_copy(update={
        "bus": gateway_settings(tmp_path).bus.model_copy(update={"url": SecretStr(amqp_url), "prefix": bus_prefix}),
    })
    gw = Gateway(settings, roles=["relay", "scorer"])
    gw.start()
    app = create_app(gw.settings, gw.store, gw.bus)
    app.state.stream_settings = StreamSettings(heartbeat=0.5, buffer=100, replay=100, send_timeout=5)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    hub_queue = None
    try:
        yield Rig(gw, app, f"http://127.0.0.1:{sock.getsockname()[1]}", gw.scorers[0].scorer.version)
        hub = getattr(app.state, "stream_hub", None)
        hub_queue = hub.queue if hub is not None else None
    finally:
        server.should_exit = True
        thread.join(15)
        gw.stop()
        sock.close()
        delete_broker_objects(amqp_url, gw.topology, queues=[hub_queue] if hub_queue else [])


def test_scored_events_reach_sse_clients_through_the_hubs_own_queue(rig: Rig, amqp_url: str) -> None:
    key = rig.key(["events:read"], ["orders"])
    everything = rig.stream(key)
    payments = rig.stream(key, type="com.acme.payment.#", min_score=0.5)
    try:
        evs = [event(1), event(2, source="billing"), event(3, type_="com.acme.payment.in", amount=700.0)]
        rig.accept(*evs)
        got = sorted([everything.next_scored(30).id, everything.next_scored(30).id])  # type: ignore[type-var]
        assert got == sorted([rig.scored_id(evs[0]), rig.scored_id(evs[2])])  # not billing's
        assert payments.next_scored(30).id == rig.scored_id(evs[2])
        heartbeat = payments.next(timeout=2)  # and nothing else for this filter
        assert heartbeat is not None and heartbeat.event is None
        # The hub's queue: classic, expiring once the process is gone, bound to the scored exchange.
        conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        try:
            declared = conn.channel().queue_declare(rig.hub.queue, passive=True)
            assert declared.method.consumer_count == 1
        finally:
            conn.close()
        assert rig.hub.queue.startswith(f"{rig.gw.settings.bus.prefix}.stream.")
    finally:
        everything.close()
        payments.close()
