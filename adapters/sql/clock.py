"""The legacy database's clock, as aware UTC.

The delay horizon (``ts < db_now - delay``) must come from the clock that stamps the rows: the
database's (``DEFAULT now()``, triggers) or, failing that, the writers' clocks, which are usually
closer to the database's than to the gateway's. A gateway whose clock runs ahead of the database
by more than the delay would read past rows that are still being written.

Why an offset rather than folding ``now()`` into every poll query: the horizon has to be bound as
a *value* -- for naive columns it is converted into ``naive_timezone`` in Python (MariaDB's
``CONVERT_TZ`` needs time-zone tables that are rarely loaded, SQLite has no zones), a custom
query gets it as ``:upper``, and ``bootstrap: snapshot`` stores the database time its snapshot
started in the cursor. So :class:`DbClock` reads the database clock once at open, remembers its
offset from the local clock, and reads it again every :data:`REFRESH_SECONDS`. The offset is taken
against the local time *after* the answer arrived, so network latency makes the horizon earlier,
never later (reading less now, never skipping); local drift within a minute is microseconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any

from sqlalchemy import Connection, TextClause, text

from gateway.events import utcnow

__all__ = ["DbClock", "GOOD_ROUND_TRIP", "MAX_READINGS", "REFRESH_SECONDS", "clock_query", "read_db_clock"]

#: Seconds between two readings of the database clock.
REFRESH_SECONDS = 60.0
#: A clock reading whose round trip took longer is repeated (the offset errs early by up to that much).
GOOD_ROUND_TRIP = timedelta(milliseconds=50)
#: Readings per measurement at most; the one with the shortest round trip is kept.
MAX_READINGS = 3

# Static statements per dialect (no user input): the current time with sub-second precision.
_QUERIES: dict[str, TextClause] = {
    "postgresql": text("SELECT clock_timestamp()"),  # timestamptz: aware
    "mysql": text("SELECT UTC_TIMESTAMP(6)"),  # naive, in UTC (NOW() would be the session zone)
    "mariadb": text("SELECT UTC_TIMESTAMP(6)"),
    "sqlite": text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')"),  # text, UTC, milliseconds
}
_GENERIC = text("SELECT CURRENT_TIMESTAMP")
_NAIVE_IS_UTC = frozenset({"mysql", "mariadb", "sqlite"})


def clock_query(dialect: str) -> TextClause:
    """The statement that reads ``dialect``'s clock."""
    return _QUERIES.get(dialect, _GENERIC)


def read_db_clock(conn: Connection, naive_zone: tzinfo) -> datetime:
    """The database's current time as aware UTC.

    Args:
        conn: a connection to the database.
        naive_zone: zone of a naive answer from a dialect without a UTC function
            (``CURRENT_TIMESTAMP`` is in the session's zone there).
    """
    dialect = conn.dialect.name
    value: Any = conn.execute(clock_query(dialect)).scalar_one()
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise TypeError(f"the database clock answered {type(value).__name__}, expected a timestamp")
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc if dialect in _NAIVE_IS_UTC else naive_zone)
    return value.astimezone(timezone.utc)


class DbClock:
    """The database clock, estimated as the local clock plus a periodically measured offset.

    Args:
        read: returns the database's current time (aware UTC); called at most every ``refresh``
            seconds.
        refresh: seconds between readings.
        clock: the local wall clock (aware UTC); injectable for tests.
        monotonic: the clock that times ``refresh``; injectable for tests.
    """

    def __init__(
        self,
        read: Callable[[], datetime],
        *,
        refresh: float = REFRESH_SECONDS,
        clock: Callable[[], datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._refresh = refresh
        self._clock = clock
        self._monotonic = monotonic
        self._offset: timedelta | None = None
        self._measured_at = 0.0

    @property
    def offset(self) -> timedelta | None:
        """Database minus local clock at the last reading (``None`` before the first)."""
        return self._offset

    def measure(self) -> timedelta:
        """Read the database clock now and store its offset from the local clock.

        Every reading errs early by the time between the database reading its clock and this
        process reading the local one (network latency, but also a pause of this process: a full
        garbage collection, the scheduler on a busy machine). That keeps the horizon safe, but a
        reading that took long would keep it late by that much until the next refresh. So a
        reading slower than :data:`GOOD_ROUND_TRIP` is repeated (up to :data:`MAX_READINGS` in
        all) and the one with the shortest round trip is kept.
        """
        best: tuple[timedelta, timedelta] | None = None  # (round trip, offset)
        for _ in range(MAX_READINGS):
            before = self._clock()
            db_now = self._read()
            after = self._clock()
            reading = (after - before, db_now - after)  # local time after the answer: errs early
            if best is None or reading[0] < best[0]:
                best = reading
            if reading[0] <= GOOD_ROUND_TRIP:
                break
        assert best is not None
        self._offset = best[1]
        self._measured_at = self._monotonic()
        return self._offset

    def now(self) -> datetime:
        """The database's current time (aware UTC), re-measured when the offset is stale."""
        if self._offset is None or self._monotonic() - self._measured_at >= self._refresh:
            self.measure()
        assert self._offset is not None
        return self._clock() + self._offset
