"""Turn legacy values into JSON-safe data without losing precision."""

from __future__ import annotations

import base64
import orjson
import uuid
from collections.abc import Mapping
from datetime import date, datetime, time
from decimal import Decimal
from enum import Enum
from typing import Any

from gateway.events.timeutil import format_time

__all__ = ["jsonable", "dumps", "dumps_text", "loads"]


def jsonable(value: Any) -> Any:
    """Return ``value`` as JSON-safe data.

    Decimals become strings (exact; a float would round them), datetimes ISO-8601 UTC, dates and
    times ISO-8601, bytes base64, enums their value, and mappings/sequences recursively.
    """
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return None  # JSON has no NaN/Infinity
        return value
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, (date, time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Enum):
        return jsonable(value.value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    raise TypeError(f"cannot convert {type(value).__name__} to JSON")


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON of already JSON-safe data (orjson: about 10x the stdlib's speed).

    Raises:
        TypeError: ``value`` holds something JSON cannot represent (run it through
            :func:`jsonable` first).
    """
    try:
        # NON_STR_KEYS: drivers hand out str subclasses (e.g. SQLAlchemy's quoted_name) as keys.
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError as exc:
        raise TypeError(str(exc)) from None


def dumps_text(value: Any) -> str:
    """:func:`dumps` as ``str`` (SQLAlchemy's JSON columns want text)."""
    return dumps(value).decode("utf-8")


def loads(data: bytes | str) -> Any:
    """Parse JSON text or bytes (``ValueError`` on bad input)."""
    return orjson.loads(data)
