"""Fixtures of the chaos suite: subprocess registry, broker clean-up, ledger, proxies."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from tests.chaos.ledger import Ledger
from tests.chaos.proxy import ChaosProxy




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
