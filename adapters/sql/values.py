"""Legacy column values to record values: exact, UTC, and text where the column is text.

* ``CHAR(n)``/``NCHAR(n)`` padding is trimmed (trailing spaces only); ``VARCHAR``/``TEXT`` values
  are kept as stored -- a trailing space there is data.
* ``DECIMAL``/``NUMERIC`` stay :class:`~decimal.Decimal` (the event carries exact text).
* Timestamps become aware UTC at full precision; naive ones are read in ``naive_timezone``.
* Binary stays ``bytes`` (base64 in the event) unless ``column_encodings`` names a legacy codec
  for the column: then it is decoded to text. A value that does not decode is an error of that
  record only (:class:`RowConverter.convert` returns it; the record goes to dead letters).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from decimal import Decimal
from typing import Any
from uuid import UUID

import orjson
from sqlalchemy import CHAR, NCHAR, Column
from sqlalchemy.types import TypeEngine

from adapters.sql.config import SoftDeleteConfig
from gateway.events import jsonable

__all__ = ["RowConverter", "row_hash", "is_fixed_char", "SoftDeleteRule", "ROW_HASH_FIELD"]

#: The field holding a row's content hash in ``mode: snapshot``.
ROW_HASH_FIELD = "_row_hash"


def is_fixed_char(type_: TypeEngine[Any]) -> bool:
    """Whether a column type is blank-padded fixed-width text (CHAR/NCHAR, PostgreSQL bpchar)."""
    return isinstance(type_, (CHAR, NCHAR))


def row_hash(data: Mapping[str, Any]) -> str:
    """SHA-256 (hex) over the canonical JSON of ``data``: sorted keys, exact decimals, UTC times."""
    canonical = orjson.dumps(jsonable(dict(data)), option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    return hashlib.sha256(canonical).hexdigest()


_UTC = timezone.utc

#: Exact value types a row converts as they are (not datetime, text or binary; their subclasses
#: take the full rules).
_AS_IS = frozenset({type(None), int, float, bool, Decimal, date, time, timedelta, UUID})

#: What a column's text values need: nothing, CHAR padding trimmed, or parsing as a timestamp.
_TEXT_PLAIN, _TEXT_CHAR, _TEXT_TS = 0, 1, 2


def _to_utc(value: datetime, zone: tzinfo) -> datetime:
    if value.tzinfo is None:
        value = value.replace(tzinfo=zone)
    return value.astimezone(timezone.utc)


class RowConverter:
    """Converts the rows of one query.

    Args:
        zone: zone of naive timestamps.
        char_columns: names of fixed-width text columns (their padding is trimmed).
        encodings: column -> codec of binary columns holding legacy text.
        errors: ``strict`` or ``replace`` (``bytes.decode`` error handling).
        text_timestamps: columns whose values may arrive as text and are timestamps (a custom
            query on SQLite returns them untyped).
    """

    def __init__(
        self,
        zone: tzinfo,
        *,
        char_columns: Iterable[str] = (),
        encodings: Mapping[str, str] | None = None,
        errors: str = "strict",
        text_timestamps: Iterable[str] = (),
    ) -> None:
        self._zone = zone
        self._char = frozenset(char_columns)
        self._encodings = dict(encodings or {})
        self._errors = errors
        self._text_ts = frozenset(text_timestamps)
        #: The zone is UTC (the default ``naive_timezone``), which has no gaps or folds.
        self.utc_zone = getattr(zone, "key", None) == "UTC"

    @classmethod
    def for_columns(cls, columns: Iterable[Column[Any]], zone: tzinfo, **kwargs: Any) -> RowConverter:
        """A converter for reflected table columns (CHAR columns found by type)."""
        return cls(zone, char_columns=[c.name for c in columns if is_fixed_char(c.type)], **kwargs)

    def convert(self, row: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
        """Convert one row.

        Returns:
            The record data, and ``None`` or the reason the row cannot be read (an undecodable
            value); the data then holds that column's raw bytes.
        """
        items = list(row.items())
        return self.convert_values(self.plan([str(k) for k, _ in items]), [v for _, v in items])

    def plan(self, names: Sequence[str]) -> list[tuple[str, int]]:
        """Per column of a result (by position): its name and what its text values need
        (:data:`_TEXT_PLAIN`, :data:`_TEXT_CHAR`, :data:`_TEXT_TS`) -- decided once per result,
        not per value."""
        return [
            (name, _TEXT_CHAR if name in self._char else _TEXT_TS if name in self._text_ts else _TEXT_PLAIN)
            for name in names
        ]

    def convert_values(self, plan: Sequence[tuple[str, int]], values: Iterable[Any]) -> tuple[dict[str, Any], str | None]:
        """Convert one row given as the :meth:`plan` of its result and its values, in order.

        The common value types are told by their exact type (one set lookup: numbers, dates and
        ``None`` pass as they are); anything else goes through :meth:`_convert_one`, the full
        rules. The result is the same either way.
        """
        data: dict[str, Any] = {}
        error: str | None = None
        utc_zone = self.utc_zone
        zone = self._zone
        for (name, text), value in zip(plan, values):
            t = type(value)
            if t in _AS_IS:
                data[name] = value
            elif t is datetime:
                if value.tzinfo is None:
                    # In UTC the fields stay and the zone is set (what ``astimezone`` gives, fold 0).
                    data[name] = (
                        value.replace(tzinfo=_UTC, fold=0) if utc_zone else value.replace(tzinfo=zone).astimezone(_UTC)
                    )
                else:
                    data[name] = value.astimezone(_UTC)
            elif t is str and text == _TEXT_PLAIN:
                data[name] = value
            elif t is str and text == _TEXT_CHAR:
                data[name] = value.rstrip(" ")
            else:
                data[name], bad = self._convert_one(name, value)
                if bad is not None and error is None:
                    error = bad
        return data, error

    def _convert_one(self, name: str, value: Any) -> tuple[Any, str | None]:
        """One value by the full rules: the converted value, and the reason it cannot be read."""
        if value is None:
            return None, None
        if isinstance(value, datetime):
            return _to_utc(value, self._zone), None
        if isinstance(value, str):
            if name in self._char:
                value = value.rstrip(" ")
            elif name in self._text_ts:
                value = _to_utc(datetime.fromisoformat(value), self._zone)
            return value, None
        if isinstance(value, (bytes, bytearray, memoryview)):
            raw = bytes(value)
            codec = self._encodings.get(name)
            if codec is None:
                return raw, None
            try:
                return raw.decode(codec, self._errors), None
            except UnicodeDecodeError as exc:
                bad = raw[exc.start : exc.end].hex()
                return raw, (
                    f"column {name!r}: bytes are not valid {codec} text "
                    f"(byte(s) 0x{bad} at offset {exc.start}); fix the data or the "
                    "column_encodings codec, or set encoding_errors: replace"
                )
        return value, None


class SoftDeleteRule:
    """Tells deleted rows by a column: one of ``values``, or any non-NULL value."""

    def __init__(self, config: SoftDeleteConfig) -> None:
        self.column = config.column
        self._not_null = config.not_null
        self._values = list(config.values or [])
        self._texts = {str(v).strip() for v in self._values if not isinstance(v, bool)}

    def is_deleted(self, data: Mapping[str, Any]) -> bool:
        """Whether the row ``data`` is marked deleted."""
        value = data.get(self.column)
        if value is None:
            return False
        if self._not_null:
            return True
        if any(value == v for v in self._values):  # 1 == True == Decimal(1): numbers by value
            return True
        return isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip() in self._texts
