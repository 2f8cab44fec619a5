"""`gateway demo` with a reachable RabbitMQ: it says so and runs the legacy-queue source.

The unreachable branch (a closed port) is tests/unit/test_cli.py::test_demo_says_it_skips_the_queue_source_without_a_rabbitmq.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pika
import pytest

from gateway.demo import DEMO_QUEUE, legacy_queue_reachable
from tests.unit.test_cli import _check_demo_output, _demo

pytestmark = pytest.mark.integration


def test_a_reachable_broker_gets_the_queue_declared_and_emptied(amqp_url: str) -> None:
    name = f"legacy-demo-probe-{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    ch.queue_declare(name, durable=True)
    ch.confirm_delivery()
    ch.basic_publish("", name, b"left over by an earlier run")
    try:
        assert legacy_queue_reachable(amqp_url, queue=name) is None
        assert ch.queue_declare(name, passive=True).method.message_count == 0
    finally:
        ch.queue_delete(name)
        conn.close()


def test_a_queue_the_demo_cannot_use_is_a_reason_not_a_crash(amqp_url: str) -> None:
    name = f"legacy-demo-probe-{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    ch.queue_declare(name, durable=False)  # the demo declares it durable: PRECONDITION_FAILED
    try:
        why = legacy_queue_reachable(amqp_url, queue=name)
        assert why is not None and "ChannelClosedByBroker" in why and "406" in why
    finally:
        ch.queue_delete(name)
        conn.close()


def test_demo_shows_the_queue_source_when_a_rabbitmq_answers(tmp_path: Path, amqp_url: str) -> None:
    text = _demo(tmp_path, "--legacy-amqp-url", amqp_url)
    host = re.sub(r"^amqps?://(?:[^@/]*@)?([^/]+).*$", r"\1", amqp_url)
    host = host if ":" in host else f"{host}:5672"
    assert f"legacy queue: EBCDIC fixed-width bookings on {DEMO_QUEUE} (RabbitMQ at {host})" in text
    assert "legacy queue: skipped" not in text
    assert re.search(r"\| queue records\s+\d+", text)  # progress shows the queue writer
    bookings = int(re.search(r"mainframe-bookings (\d+)", text.split("Events per source:")[1]).group(1))  # type: ignore[union-attr]
    assert bookings > 0
    _check_demo_output(text)
