"""The built-in adapters pass the standard adapter suite (``adapters.testing``).

sql: a SQLite legacy table; soap: the SOAP simulator over real HTTP; amqp: a queue on the local
RabbitMQ (integration: skipped without the service, failed under CI=true like tests/conftest.py's
fixtures).
"""

from __future__ import annotations

import socket
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pika
import pytest
from sqlalchemy import Engine, text

from adapters.amqp import AmqpSource
from adapters.soap import SoapSource
from adapters.soap.simulator import T0, SoapSimulator
from adapters.sql import SqlSource
from adapters.testing import AdapterContract
from tests.legacy import T0 as SQL_T0
from tests.legacy import add_orders, make_orders, touch_orders

ORDER_MAPPING = {"type": "com.acme.order.changed", "entity": "order", "key": ["id"], "version": "updated_at"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TestSqlContract(AdapterContract):
    """The sql adapter on a SQLite table (timestamp_key mode)."""

    adapter_class = SqlSource
    mapping = ORDER_MAPPING
    engine: Engine
    db: Path
    added = 0

    @pytest.fixture(autouse=True)
    def _table(self, tmp_path: Path) -> Iterator[None]:
        self.db = tmp_path / "legacy.db"
        self.engine = make_orders(f"sqlite:///{self.db}", 0)
        yield
        self.engine.dispose()

    def valid_config(self) -> dict[str, Any]:
        # timeout: a locked database fails a statement after 0.2 s instead of 5 s.
        return {"url": f"sqlite:///{self.db}?timeout=0.2", "table": "legacy_orders", "mode": "timestamp_key",
                "timestamp_column": "updated_at", "key_column": "id"}

    def invalid_configs(self) -> list[tuple[dict[str, Any], str]]:
        return [*super().invalid_configs(), ({**self.valid_config(), "mode": "sideways"}, "mode"),
                ({**self.valid_config(), "key_column": "no_such_column"}, "no_such_column")]

    def unreachable_config(self) -> dict[str, Any]:
        return {**self.valid_config(), "url": f"sqlite:///{self.db.parent / 'missing' / 'x.db'}"}

    def add_records(self, n: int) -> None:
        add_orders(self.engine, n, start=self.added + 1)
        self.added += n

    def update_record(self) -> None:
        touch_orders(self.engine, [1], SQL_T0 + timedelta(days=1))

    @contextmanager
    def transient_failure(self) -> Iterator[None]:
        """Another process holds an exclusive lock: reads fail with "database is locked"."""
        conn = sqlite3.connect(self.db, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()

    @contextmanager
    def permanent_failure(self) -> Iterator[None]:
        """A row whose timestamp is not a timestamp: every read of it fails the same way."""
        with self.engine.begin() as conn:
            conn.execute(text("INSERT INTO legacy_orders VALUES (0, 'X', 1, 'NEW', '0000-00-00 not a time')"))
        try:
            yield
        finally:
            with self.engine.begin() as conn:
                conn.execute(text("DELETE FROM legacy_orders WHERE id = 0"))


class TestSoapContract(AdapterContract):
    """The soap adapter against the SOAP simulator (keyset paging)."""

    adapter_class = SoapSource
    mapping = {**ORDER_MAPPING, "version": "updatedAt"}
    sim: SoapSimulator
    added = 0

    @pytest.fixture(autouse=True)
    def _simulator(self) -> Iterator[None]:
        with SoapSimulator() as sim:
            self.sim = sim
            yield

    def valid_config(self) -> dict[str, Any]:
        return {
            "wsdl": self.sim.wsdl_url, "operation": "GetOrdersSince",
            "arguments": {"since": "{cursor.time}", "pageToken": "{page_token}", "pageSize": "{page_size}"},
            "records_path": "orders", "next_page_token_path": "nextPageToken",
            "key_field": "id", "time_field": "updatedAt", "page_size": 2,
            "timeouts": {"connect": 2, "read": 5, "operation": 5},
        }

    def invalid_configs(self) -> list[tuple[dict[str, Any], str]]:
        return [*super().invalid_configs(), ({**self.valid_config(), "page_size": 0}, "page_size")]

    def unreachable_config(self) -> dict[str, Any]:
        return {**self.valid_config(), "wsdl": f"http://127.0.0.1:{_free_port()}/orders?wsdl"}

    def add_records(self, n: int) -> None:
        self.sim.add_orders(n, start=self.added + 1, t0=T0)
        self.added += n

    def update_record(self) -> None:
        self.sim.update(1)

    @contextmanager
    def transient_failure(self) -> Iterator[None]:
        """A proxy in front of the service answers 503 (more times than the adapter retries a page)."""
        self.sim.fail_next(50, "http503")
        try:
            yield
        finally:
            with self.sim._lock:
                self.sim._transient.clear()

    @contextmanager
    def permanent_failure(self) -> Iterator[None]:
        """The service answers a business fault (soap:Client with an error code)."""
        self.sim.business_fault("ORD-DENIED")
        try:
            yield
        finally:
            self.sim.business_fault(None)


@pytest.mark.integration
class TestAmqpContract(AdapterContract):
    """The amqp adapter consuming a classic queue on the local RabbitMQ."""

    adapter_class = AmqpSource
    mapping = {"type": "com.acme.legacy.order", "entity": "order", "key": ["id"]}
    url: str
    queue: str
    added = 0

    @pytest.fixture(autouse=True)
    def _queue(self, amqp_url: str) -> Iterator[None]:
        self.url, self.queue = amqp_url, f"contract-{uuid.uuid4().hex[:8]}"
        conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        conn.channel().queue_declare(self.queue, durable=True)
        conn.close()
        yield
        conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        conn.channel().queue_delete(self.queue)
        conn.close()

    def valid_config(self) -> dict[str, Any]:
        return {"url": self.url, "queue": self.queue, "max_wait": 0.3, "linger": 0.05, "reconnect_max_delay": 1.0}

    def invalid_configs(self) -> list[tuple[dict[str, Any], str]]:
        return [*super().invalid_configs(), ({**self.valid_config(), "url": "http://x/"}, "url")]

    def unreachable_config(self) -> dict[str, Any]:
        return {**self.valid_config(), "url": f"amqp://guest:guest@127.0.0.1:{_free_port()}/%2F", "socket_timeout": 1}

    def add_records(self, n: int) -> None:
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        ch = conn.channel()
        ch.confirm_delivery()
        for i in range(self.added + 1, self.added + n + 1):
            body = f'{{"id": {i}, "customer": "C{i:04d}"}}'.encode()
            ch.basic_publish("", self.queue, body, pika.BasicProperties(delivery_mode=2, content_type="application/json",
                                                                      message_id=f"m-{i}"))
        conn.close()
        self.added += n
