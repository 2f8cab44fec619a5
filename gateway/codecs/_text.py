"""Scalar values as text, the same way in every text-based codec."""

from __future__ import annotations

from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

__all__ = ["scalar_text"]


def scalar_text(value: Any) -> str | None:
    """``value`` as text: None stays None, booleans ``true``/``false``, decimals without exponent.

    Raises:
        TypeError: ``value`` is not a scalar (a mapping, a list, bytes, ...).
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, (int, float)):
        return repr(value) if isinstance(value, float) else str(value)
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    raise TypeError(f"a {type(value).__name__} value cannot be written as text")
