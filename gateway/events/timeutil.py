"""Time helpers: everything the gateway stores or emits is UTC."""

from __future__ import annotations

from datetime import datetime, timezone, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["check_zone", "utcnow", "to_utc", "format_time", "parse_time"]


def utcnow() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(timezone.utc)


def to_utc(value: datetime, naive_zone: tzinfo = timezone.utc) -> datetime:
    """Convert to aware UTC; naive values are read in ``naive_zone`` (UTC unless configured)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=naive_zone)
    return value.astimezone(timezone.utc)


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC with microseconds and a ``Z`` suffix."""
    return to_utc(value).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """Parse RFC 3339 (``Z`` or offset) into aware UTC."""
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    return to_utc(datetime.fromisoformat(text))


def check_zone(name: str) -> str:
    """``name`` if it is an IANA time zone (for config validators); else ``ValueError`` saying so."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (expected an IANA name such as 'Europe/Berlin')") from None
    return name
