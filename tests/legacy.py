"""A small "legacy" orders table on any SQLAlchemy URL, for adapter and end-to-end tests."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from sqlalchemy.dialects import mysql
from sqlalchemy import CHAR, Column, DateTime, Engine, Integer, MetaData, Numeric, String, Table, create_engine, insert, update

META = MetaData()
ORDERS = Table(
    "legacy_orders",
    META,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("customer", String(40), nullable=False),
    Column("amount", Numeric(12, 2), nullable=False),
    Column("status", CHAR(10), nullable=False),
    Column("updated_at", DateTime(timezone=False).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb"), nullable=False),
)

T0 = datetime(2024, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def make_orders(url: str, n: int, *, same_timestamp: bool = False, start: int = 1) -> Engine:
    """Create the table with ``n`` rows; returns the engine (caller disposes)."""
    engine = create_engine(url)
    META.drop_all(engine)
    META.create_all(engine)
    add_orders(engine, n, same_timestamp=same_timestamp, start=start)
    return engine


def add_orders(engine: Engine, n: int, *, same_timestamp: bool = False, start: int = 1, when: datetime | None = None) -> None:
    rows: list[dict[str, Any]] = []
    for i in range(start, start + n):
        ts = when or (T0 if same_timestamp else T0 + timedelta(milliseconds=i))
        rows.append(
            {
                "id": i,
                "customer": f"C{i % 97:04d}",
                "amount": Decimal(i % 1000) + Decimal("0.25"),
                "status": "NEW",
                "updated_at": ts.replace(tzinfo=None),
            }
        )
    with engine.begin() as conn:
        for k in range(0, len(rows), 5000):
            conn.execute(insert(ORDERS), rows[k : k + 5000])


def touch_orders(engine: Engine, ids: list[int], when: datetime) -> None:
    """Update rows (a new version each)."""
    with engine.begin() as conn:
        conn.execute(
            update(ORDERS).where(ORDERS.c.id.in_(ids)).values(status="SHIPPED", updated_at=when.replace(tzinfo=None))
        )


def source_settings(url: str, name: str = "orders", batch_size: int = 1000, **config: Any) -> dict[str, Any]:
    """A source block for the orders table."""
    return {
        "name": name,
        "adapter": "sql",
        "interval": 0.05,
        "config": {
            "url": url,
            "table": "legacy_orders",
            "mode": "timestamp_key",
            "timestamp_column": "updated_at",
            "key_column": "id",
            "batch_size": batch_size,
            **config,
        },
        "mapping": {
            "type": "com.acme.order.changed",
            "entity": "order",
            "key": ["id"],
            "version": "updated_at",
            "time": "updated_at",
            "subject": "order/{id}",
        },
    }
