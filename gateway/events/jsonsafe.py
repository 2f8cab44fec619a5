"""Turn legacy values into JSON-safe data without losing precision."""

from __future__ import annotations

import base64
import orjson
import uuid
from collections.abc import Mapping
from datetime import date, datetime, time, timezone
from decimal import Decimal
from enum import Enum
from typing import Any

from gateway.events.timeutil import format_time

__all__ = ["jsonable", "dumps", "dumps_text", "loads", "format_time_cached"]

_UTC = timezone.utc

#: UTC datetimes :func:`format_time_cached` formatted lately -> their text (emptied when full).
_TIME_TEXT: dict[datetime, str] = {}
_TIME_TEXT_MAX = 16384


def format_time_cached(value: datetime) -> str:
    """:func:`~gateway.events.timeutil.format_time`, remembering the text of recent UTC values.

    A record's timestamp is formatted several times on its way to an event (the cursor position,
    the id's version, the data field, the envelope's ``time``), and legacy tables have runs of equal
    timestamps: a repeat costs a dict lookup instead of ``astimezone`` + ``isoformat``. Only plain
    ``datetime`` values whose zone is :data:`datetime.timezone.utc` are cached: equal ones are the
    same instant (UTC has no folds), so they have the same text; others are formatted each time.
    """
    if type(value) is datetime and value.tzinfo is _UTC:
        text = _TIME_TEXT.get(value)
        if text is None:
            text = value.isoformat(timespec="microseconds")[:-6] + "Z"
            if len(_TIME_TEXT) >= _TIME_TEXT_MAX:
                _TIME_TEXT.clear()
            _TIME_TEXT[value] = text
        return text
    return format_time(value)


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


#: Exact types -> their JSON-safe form, tried before the ``isinstance`` chain of :func:`jsonable`
#: (the same result for these types; subclasses and the rest take the chain).
_EXACT: dict[type, Any] = {
    Decimal: str,
    datetime: format_time_cached,
    date: date.isoformat,
    time: time.isoformat,
    bytes: _b64,
    uuid.UUID: str,
}


def jsonable(value: Any) -> Any:
    """Return ``value`` as JSON-safe data.

    Decimals become strings (exact; a float would round them), datetimes ISO-8601 UTC, dates and
    times ISO-8601, bytes base64, enums their value, and mappings/sequences recursively.
    """
    t = type(value)
    if t is str or t is int or t is bool or value is None:
        return value
    conv = _EXACT.get(t)
    if conv is not None:
        return conv(value)
    if t is dict:
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return None  # JSON has no NaN/Infinity
        return value
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return format_time_cached(value)
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
