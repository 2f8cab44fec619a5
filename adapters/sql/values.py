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
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone, tzinfo
from typing import Any

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
        data: dict[str, Any] = {}
        error: str | None = None
        for key, value in row.items():
            name = str(key)
            if value is None:
                data[name] = None
            elif isinstance(value, datetime):
                data[name] = _to_utc(value, self._zone)
            elif isinstance(value, str):
                if name in self._char:
                    value = value.rstrip(" ")
                elif name in self._text_ts:
                    value = _to_utc(datetime.fromisoformat(value), self._zone)
                data[name] = value
            elif isinstance(value, (bytes, bytearray, memoryview)):
                raw = bytes(value)
                codec = self._encodings.get(name)
                if codec is None:
                    data[name] = raw
                    continue
                try:
                    data[name] = raw.decode(codec, self._errors)
                except UnicodeDecodeError as exc:
                    data[name] = raw
                    if error is None:
                        bad = raw[exc.start : exc.end].hex()
                        error = (
                            f"column {name!r}: bytes are not valid {codec} text "
                            f"(byte(s) 0x{bad} at offset {exc.start}); fix the data or the "
                            "column_encodings codec, or set encoding_errors: replace"
                        )
            else:
                data[name] = value
        return data, error


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
