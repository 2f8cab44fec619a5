"""Fixtures of the chaos suite: subprocess registry, broker clean-up, ledger, proxies."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.chaos.harness import Processes, cleanup_broker
from tests.chaos.ledger import Ledger
from tests.chaos.proxy import ChaosProxy


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """Gateway subprocesses of one test; every one still running is killed (SIGKILL) afterwards."""
    logs = tmp_path / "logs"
    logs.mkdir()
    registry = Processes(logs)
    try:
        yield registry
    finally:
        registry.kill_all()


@pytest.fixture
def chaos_bus(amqp_url: str, bus_prefix: str) -> Iterator[str]:
    """The bus prefix of one test; its queues and exchanges are deleted afterwards."""
    yield bus_prefix
    cleanup_broker(amqp_url, bus_prefix, extra_queues=("chaos-sink",))


@pytest.fixture
def ledger(pg_db_url: str, amqp_url: str, chaos_bus: str) -> Iterator[Ledger]:
    led = Ledger(pg_db_url, amqp_url, chaos_bus)
    yield led
    led.close()


@pytest.fixture
def amqp_proxy(amqp_url: str) -> Iterator[ChaosProxy]:
    """A ChaosProxy in front of the test RabbitMQ."""
    parts = urlsplit(amqp_url)
    proxy = ChaosProxy(parts.hostname or "127.0.0.1", parts.port or 5672)
    yield proxy
    proxy.close()
