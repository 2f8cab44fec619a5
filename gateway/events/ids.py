"""Deterministic event ids (REL-13).

An event id is a UUIDv5 over ``source|entity|key|version``. Re-reading the same record gives
the same id; a changed record (new version) gives a new id. Every consumer de-duplicates on it.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from gateway.events.jsonsafe import format_time_cached

__all__ = ["EVENT_NAMESPACE", "event_id", "canonical", "uuid5"]

#: Fixed namespace of legacy-gateway event ids. Never change it: every id derives from it.
EVENT_NAMESPACE = uuid.UUID("6f1b8a1e-4c1e-5d6b-9a47-1e6c0b9d2a10")


def canonical(value: Any) -> str:
    """Render a key or version value as a stable string.

    Datetimes become ISO-8601 in UTC at full (microsecond) precision, so the same instant read
    through different drivers or time zones gives the same id. Composite keys are joined with
    ``/`` after rendering each part.
    """
    t = type(value)
    if t is int or t is str:  # the common keys: no isinstance chain
        return str(value)
    if t is datetime:  # the common version: often formatted already for the same record
        return format_time_cached(value)
    if value is None:
        return ""
    if isinstance(value, datetime):
        return format_time_cached(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return format(value.normalize(), "f") if value == value.to_integral() else str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (list, tuple)):
        return "/".join(canonical(v) for v in value)
    return str(value)


def event_id(source: str, entity: str, key: Any, version: Any) -> str:
    """Return the deterministic id of one record version.

    Args:
        source: the configured source name (for example ``legacy-orders``).
        entity: the entity name (for example ``order``).
        key: the record key; a scalar or a sequence for composite keys.
        version: the record version (a timestamp, a row version, a counter) or ``None``.

    Returns:
        A UUIDv5 string.
    """
    t = type(key)
    if t is not int and t is not str and isinstance(key, Sequence) and not isinstance(key, (str, bytes)):
        key = tuple(key)
    return uuid5(f"{source}|{entity}|{canonical(key)}|{canonical(version)}")


_NS_BYTES = EVENT_NAMESPACE.bytes


def uuid5(name: str) -> str:
    """``str(uuid.uuid5(EVENT_NAMESPACE, name))``, without building UUID objects (hot path)."""
    h = bytearray(hashlib.sha1(_NS_BYTES + name.encode("utf-8"), usedforsecurity=False).digest()[:16])
    h[6] = (h[6] & 0x0F) | 0x50  # version 5
    h[8] = (h[8] & 0x3F) | 0x80  # RFC 4122 variant
    x = h.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"
