"""Errors raised by codecs: where a record failed and what was expected, never the payload.

Both are :class:`~gateway.errors.PermanentError`: the same bytes fail the same way on every
attempt, so the message goes to dead letters instead of being retried.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import PermanentError

__all__ = ["CodecError", "DecodeError", "EncodeError", "hex_excerpt"]

#: Most raw bytes a message ever shows (as hex); a payload may hold personal data.
MAX_EXCERPT_BYTES = 16


def hex_excerpt(data: bytes, limit: int = MAX_EXCERPT_BYTES) -> str:
    """Up to ``limit`` bytes of ``data`` as spaced upper-case hex, marked when cut (``'12 34 5C'``)."""
    shown = bytes(data[:limit]).hex(" ").upper()
    return shown + (" ..." if len(data) > limit else "")


def _restore(cls: type[CodecError], reason: str, location: dict[str, Any]) -> CodecError:
    return cls(reason, **location)


class CodecError(PermanentError):
    """A payload or record that a codec cannot read or write.

    The message names what failed, where, and what was expected, e.g.
    ``record 3, field 'amount' (bytes 20-24): packed decimal has invalid sign nibble 0x7
    (expected C, D or F)``. It quotes at most 16 bytes of the payload (as hex).

    Attributes:
        reason: what was wrong and what was expected, without the location.
        record_index: 0-based position of the record in the message, or None when the
            message as a whole is unreadable.
        field: name of the field, when one field is at fault.
        offset: byte offset of the fault: within the record when ``record_index`` is set,
            else within the payload; None where bytes do not apply.
        length: number of bytes at ``offset`` that are at fault (a field's size).
        line: 1-based line number, for line-oriented formats (CSV, JSON Lines, XML).
    """

    def __init__(
        self,
        reason: str,
        *,
        record_index: int | None = None,
        field: str | None = None,
        offset: int | None = None,
        length: int | None = None,
        line: int | None = None,
    ) -> None:
        self.reason = reason
        self.record_index = record_index
        self.field = field
        self.offset = offset
        self.length = length
        self.line = line
        super().__init__(self._compose())

    def _location(self) -> dict[str, Any]:
        return {
            "record_index": self.record_index,
            "field": self.field,
            "offset": self.offset,
            "length": self.length,
            "line": self.line,
        }

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only attributes do not survive the default Exception pickling.
        return (_restore, (type(self), self.reason, self._location()))

    def _compose(self) -> str:
        parts: list[str] = []
        if self.record_index is not None:
            parts.append(f"record {self.record_index}" + (f" (line {self.line})" if self.line else ""))
        elif self.line is not None:
            parts.append(f"line {self.line}")
        span = None
        if self.offset is not None:
            if self.length is None or self.length <= 1:
                span = f"byte {self.offset}"
            else:
                span = f"bytes {self.offset}-{self.offset + self.length - 1}"
        if self.field is not None:
            parts.append(f"field {self.field!r}" + (f" ({span})" if span else ""))
        elif span:
            parts.append(span)
        return f"{', '.join(parts)}: {self.reason}" if parts else self.reason


class DecodeError(CodecError):
    """A payload, or one record in it, that does not match the codec's format."""


class EncodeError(CodecError):
    """A record that cannot be written in the codec's format (unknown field, value out of range)."""
