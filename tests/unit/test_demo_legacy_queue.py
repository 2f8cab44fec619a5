"""The demo's legacy-queue source without a broker: it is skipped with a reason, never a crash."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from adapters.amqp import AmqpSource
from gateway.config import load_settings
from gateway.demo import DEMO_QUEUE, demo_settings, legacy_queue_reachable


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_broker_gives_a_reason_quickly_instead_of_raising() -> None:
    t0 = time.monotonic()
    why = legacy_queue_reachable(f"amqp://guest:guest@127.0.0.1:{closed_port()}/%2F", timeout=1.0)
    assert why is not None and "AMQPConnectionError" in why
    assert time.monotonic() - t0 < 5


def test_an_invalid_url_gives_a_reason() -> None:
    why = legacy_queue_reachable("amqp://guest:guest@127.0.0.1:notaport/%2F")
    assert why is not None and why.startswith("invalid URL: ") and "notaport" in why


def test_the_queue_source_is_configured_only_with_a_legacy_url_and_uses_its_own_connection(tmp_path: Path) -> None:
    without = demo_settings(tmp_path, port=0, store_url=None, amqp_url="amqp://gw:pw@bus:5672/%2F")
    assert [s["adapter"] for s in without["sources"]] == ["sql"]
    legacy = "amqp://guest:guest@mainframe-mq:5672/%2F"
    with_queue = demo_settings(tmp_path, port=0, store_url=None, amqp_url="amqp://gw:pw@bus:5672/%2F", legacy_amqp_url=legacy)
    (queue_source,) = [s for s in with_queue["sources"] if s["adapter"] == "amqp"]
    assert queue_source["name"] == "mainframe-bookings" and queue_source["config"]["queue"] == DEMO_QUEUE
    assert queue_source["config"]["url"] == legacy  # the legacy broker, not the gateway's bus
    cfg = AmqpSource.parse_config(queue_source["config"])  # a valid source configuration
    assert cfg.codec["encoding"] == "cp037"
    settings = load_settings(None, **with_queue)
    assert [s.name for s in settings.sources] == ["card-transactions", "mainframe-bookings"]
