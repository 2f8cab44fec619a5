"""``gateway demo``: legacy rows become scored events in a minute, with nothing installed.

It creates a SQLite "legacy" database of card transactions (about 2 % anomalies: huge amounts,
unusual countries, odd hours), keeps writing new ones and updating a few while the gateway polls
it, relays the events through the bus, scores them and serves the API. It prints progress and the
top-scored events, and stops by itself after ``--seconds`` or on Ctrl-C.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    create_engine,
    insert,
    update,
)

__all__ = [
    "LegacyWriter",
    "MainframeQueueWriter",
    "SoapOrderWriter",
    "create_legacy_db",
    "demo_settings",
    "legacy_queue_reachable",
    "start_soap_service",
]

_META = MetaData()
TRANSACTIONS = Table(
    "card_transactions",
    _META,
    Column("txn_id", Integer, primary_key=True),
    Column("account_no", String(12), nullable=False),
    Column("amount", Numeric(12, 2), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("merchant_category", String(4), nullable=False),
    Column("country", String(2), nullable=False),
    Column("channel", String(8), nullable=False),
    Column("status", String(10), nullable=False),
    Column("last_modified", DateTime, nullable=False),
)

_CATEGORIES = ["5411", "5812", "5541", "5999", "4111", "5732"]
_COUNTRIES = ["DE", "DE", "DE", "FR", "NL", "AT"]
_CHANNELS = ["pos", "pos", "ecom", "atm"]


def _row(rng: random.Random, txn_id: int, when: datetime) -> dict[str, Any]:
    anomaly = rng.random() < 0.02
    amount = rng.lognormvariate(3.3, 0.6)
    country = rng.choice(_COUNTRIES)
    if anomaly:
        kind = rng.choice(["amount", "country", "both"])
        if kind in ("amount", "both"):
            amount *= rng.uniform(25, 80)
        if kind in ("country", "both"):
            country = rng.choice(["KP", "XK", "BV"])
    return {
        "txn_id": txn_id,
        "account_no": f"AC{rng.randint(1, 400):06d}",
        "amount": Decimal(f"{amount:.2f}"),
        "currency": "EUR",
        "merchant_category": rng.choice(_CATEGORIES),
        "country": country,
        "channel": rng.choice(_CHANNELS),
        "status": "BOOKED",
        "last_modified": when.replace(tzinfo=None),
    }


def create_legacy_db(url: str, rows: int, seed: int = 7) -> int:
    """Create the legacy table with ``rows`` historic transactions; returns the next id."""
    engine = create_engine(url)
    _META.drop_all(engine)
    _META.create_all(engine)
    rng = random.Random(seed)
    start = datetime.now(UTC) - timedelta(hours=2)
    with engine.begin() as conn:
        batch = [_row(rng, i, start + timedelta(milliseconds=i * 500)) for i in range(1, rows + 1)]
        conn.execute(insert(TRANSACTIONS), batch)
    engine.dispose()
    return rows + 1


class LegacyWriter:
    """Keeps the legacy system busy: new transactions, and a few reversals (updates)."""

    def __init__(self, url: str, next_id: int, per_second: float = 40.0, seed: int = 11) -> None:
        self._engine = create_engine(url)
        self._next = next_id
        self._rate = per_second
        self._rng = random.Random(seed)
        self.written = 0
        self.updated = 0

    def run(self, stop: threading.Event) -> None:
        """Write until ``stop`` is set."""
        while not stop.wait(0.25):
            n = max(1, int(self._rate / 4))
            now = datetime.now(UTC)
            with self._engine.begin() as conn:
                conn.execute(insert(TRANSACTIONS), [_row(self._rng, self._next + i, now) for i in range(n)])
                if self._rng.random() < 0.5 and self._next > 10:
                    victim = self._rng.randint(1, self._next - 1)
                    conn.execute(
                        update(TRANSACTIONS)
                        .where(TRANSACTIONS.c.txn_id == victim)
                        .values(status="REVERSED", last_modified=now.replace(tzinfo=None))
                    )
                    self.updated += 1
            self._next += n
            self.written += n
        self._engine.dispose()


def start_soap_service(orders: int, seed: int = 13) -> Any:
    """Start the legacy SOAP order service simulator on a free loopback port with ``orders`` orders.

    Returns the running :class:`~adapters.soap.simulator.SoapSimulator` (close it when done).
    """
    from adapters.soap.simulator import SoapSimulator

    sim = SoapSimulator().start()
    rng = random.Random(seed)
    start = datetime.now(UTC) - timedelta(hours=1)
    for i in range(1, orders + 1):
        sim.upsert(_order(rng, i, start + timedelta(seconds=i)))
    return sim


def _order(rng: random.Random, oid: int, when: datetime) -> Any:
    from adapters.soap.simulator import Order

    amount = rng.lognormvariate(4.0, 0.5) * (rng.uniform(30, 60) if rng.random() < 0.02 else 1.0)
    lines = tuple((f"SKU-{rng.randint(1, 40):03d}", rng.randint(1, 5)) for _ in range(rng.randint(1, 3)))
    return Order(id=oid, customer=f"C{rng.randint(1, 150):04d}", amount=Decimal(f"{amount:.2f}"),
                 updated_at=when, currency="EUR", lines=lines)


class SoapOrderWriter:
    """Keeps the SOAP service busy: new orders, and a few shipped (updated) ones."""

    def __init__(self, sim: Any, next_id: int, per_second: float = 8.0, seed: int = 17) -> None:
        self._sim, self._next, self._rate = sim, next_id, per_second
        self._rng = random.Random(seed)
        self.written = 0
        self.updated = 0

    def run(self, stop: threading.Event) -> None:
        """Write until ``stop`` is set."""
        while not stop.wait(0.5):
            # Each change gets its own timestamp, as a service's "last changed" column does.
            for _ in range(max(1, int(self._rate / 2))):
                self._sim.upsert(_order(self._rng, self._next, datetime.now(UTC)))
                self._next += 1
                self.written += 1
            if self._rng.random() < 0.5 and self._next > 10:
                victim = self._rng.randint(1, self._next - 1)
                self._sim.update(victim, status="SHIPPED", updated_at=datetime.now(UTC))
                self.updated += 1


DEMO_QUEUE = "legacy-demo.bookings"
_BOOKING_LAYOUT = {
    "format": "fixed", "encoding": "cp037", "record_length": 33,
    "layout": [{"name": "booking_no", "pic": "9(8)"}, {"name": "customer", "pic": "X(20)"},
               {"name": "amount", "pic": "S9(7)V99 COMP-3"}],
}


def legacy_queue_reachable(url: str, timeout: float = 1.0, queue: str = DEMO_QUEUE) -> str | None:
    """``None`` when a broker answers at ``url`` and ``queue`` is declared and emptied, else why not.

    Never raises for a broker that is missing or refuses: the demo then skips its queue source.
    """
    import pika
    import pika.exceptions

    try:
        params = pika.URLParameters(url)
    except ValueError as exc:
        return f"invalid URL: {exc}"
    params.socket_timeout = params.blocked_connection_timeout = timeout
    params.stack_timeout = timeout + 1.0
    params.connection_attempts = 1
    try:
        conn = pika.BlockingConnection(params)
    except (pika.exceptions.AMQPError, OSError) as exc:
        return f"{type(exc).__name__}"
    try:
        ch = conn.channel()
        ch.queue_declare(queue, durable=True)
        ch.queue_purge(queue)
    except pika.exceptions.AMQPError as exc:  # e.g. the queue exists with other arguments, or no permission
        return f"{type(exc).__name__}: {exc}"
    finally:
        if conn.is_open:
            conn.close()
    return None


class MainframeQueueWriter:
    """A mainframe job: EBCDIC fixed-width booking records, four per message, on a legacy queue."""

    def __init__(self, url: str, per_second: float = 20.0, seed: int = 23) -> None:
        from gateway.codecs import codec_from_config

        self._url, self._rate = url, per_second
        self._codec = codec_from_config(_BOOKING_LAYOUT)
        self._rng = random.Random(seed)
        self._next = 1
        self.written = 0

    def run(self, stop: threading.Event) -> None:
        """Publish (with confirms) until ``stop`` is set."""
        import pika

        conn = pika.BlockingConnection(pika.URLParameters(self._url))
        ch = conn.channel()
        ch.confirm_delivery()
        try:
            while not stop.wait(0.2):
                for _ in range(max(1, int(self._rate / 20))):
                    records = []
                    for _ in range(4):
                        amount = self._rng.lognormvariate(5.0, 0.7) * (self._rng.uniform(20, 50) if self._rng.random() < 0.02 else 1)
                        sign = -1 if self._rng.random() < 0.1 else 1
                        records.append({"booking_no": self._next, "customer": f"K{self._rng.randint(1, 300):05d}",
                                        "amount": Decimal(f"{min(amount, 9_999_999):.2f}") * sign})
                        self._next += 1
                    ch.basic_publish("", DEMO_QUEUE, self._codec.encode(records), pika.BasicProperties(
                        delivery_mode=2, content_type="application/x-ebcdic-fixed"))
                    self.written += 4
        finally:
            conn.close()


def demo_settings(
    workdir: Path, *, port: int, store_url: str | None, amqp_url: str | None, soap_wsdl: str | None = None,
    legacy_amqp_url: str | None = None,
) -> dict[str, Any]:
    """Settings of the demo pipeline (a dict for ``load_settings`` overrides).

    With ``soap_wsdl`` (the simulator's WSDL URL) the demo also polls the legacy SOAP order service.
    """
    sources = [_sql_source(workdir)]
    if soap_wsdl:
        sources.append(_soap_source(soap_wsdl))
    if legacy_amqp_url:
        sources.append(_queue_source(legacy_amqp_url))
    return {
        "profile": "dev",
        "store": {"url": store_url or f"sqlite:///{workdir / 'gateway.db'}"},
        # A prefix of its own per run on a shared broker: messages a stopped demo left in its queues
        # (the relay publishes ahead of the scorer) never reach the next run's store.
        "bus": {"url": amqp_url, "prefix": f"gateway-demo-{secrets.token_hex(3)}" if amqp_url else "gateway-demo"},
        "api": {"port": port},
        "scoring": {"warmup": 50, "exclude_fields": ["txn_id", "account_no"]},
        "sources": sources,
    }


def _sql_source(workdir: Path) -> dict[str, Any]:
    return {
        "name": "card-transactions",
        "adapter": "sql",
        "interval": 0.2,
        "config": {
            "url": f"sqlite:///{workdir / 'legacy.db'}",
            "table": "card_transactions",
            "mode": "timestamp_key",
            "timestamp_column": "last_modified",
            "key_column": "txn_id",
            "batch_size": 500,
        },
        "mapping": {
            "type": "com.acme.cards.transaction.changed",
            "entity": "transaction",
            "key": ["txn_id"],
            "version": "last_modified",
            "time": "last_modified",
            "subject": "transaction/{txn_id}",
        },
    }


def _queue_source(url: str) -> dict[str, Any]:
    return {
        "name": "mainframe-bookings",
        "adapter": "amqp",
        "interval": 0.2,
        "config": {"url": url, "queue": DEMO_QUEUE, "codec": _BOOKING_LAYOUT, "max_wait": 0.2, "batch_size": 400},
        "mapping": {
            "type": "com.acme.bookings.booking.changed",
            "entity": "booking",
            "key": ["booking_no"],
            "subject": "booking/{booking_no}",
            "data": ["booking_no", "customer", "amount"],
        },
    }


def _soap_source(wsdl: str) -> dict[str, Any]:
    return {
        "name": "legacy-orders",
        "adapter": "soap",
        "interval": 0.5,
        "config": {
            "wsdl": wsdl,
            "operation": "GetOrdersSince",
            "arguments": {"since": "{cursor.time}", "pageToken": "{page_token}", "pageSize": "{page_size}"},
            "records_path": "orders",
            "next_page_token_path": "nextPageToken",
            "key_field": "id",
            "time_field": "updatedAt",
            "page_size": 200,
            "timeouts": {"connect": 2, "read": 5, "operation": 10},
            "drift": {"check_interval": 30},
        },
        "mapping": {
            "type": "com.acme.orders.order.changed",
            "entity": "order",
            "key": ["id"],
            "version": "updatedAt",
            "time": "updatedAt",
            "subject": "order/{id}",
        },
    }


def delete_topology(amqp_url: str, topology: Any) -> None:
    """Delete the demo run's queues and exchanges from the broker (best effort, at the end)."""
    import pika

    try:
        conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    except Exception:  # noqa: BLE001 -- the broker is gone: nothing to tidy
        return
    try:
        ch = conn.channel()
        for spec in topology.queues():
            ch.queue_delete(spec.name)
        for name, _kind in topology.exchanges():
            ch.exchange_delete(name)
    except Exception as exc:  # noqa: BLE001 -- best effort
        logging.getLogger("gateway.demo").debug("demo topology not deleted: %s", type(exc).__name__)
    finally:
        if conn.is_open:
            conn.close()
