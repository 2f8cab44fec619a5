"""Broker clean-up shared by the RabbitMQ tests."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pika


def delete_broker_objects(
    amqp_url: str, topology: Any, *, queues: Iterable[str] = (), exchanges: Iterable[str] = ()
) -> None:
    """Delete every queue and exchange of ``topology`` (retry levels included) plus the extra ones.

    ``topology`` is a :class:`~gateway.bus.topology.Topology` (or anything with ``queues()`` and
    ``exchanges()``); objects that do not exist are no error.
    """
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        ch = conn.channel()
        for name in [spec.name for spec in topology.queues()] + list(queues):
            ch.queue_delete(name)
        for name in [name for name, _kind in topology.exchanges()] + list(exchanges):
            ch.exchange_delete(name)
    finally:
        conn.close()


def queue_depth(amqp_url: str, queue: str) -> int:
    """Ready messages in ``queue`` (a passive declare on a connection of its own)."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        conn.close()
