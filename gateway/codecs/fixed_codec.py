"""Fixed-width codec: records laid out like a COBOL copybook, in EBCDIC or ASCII.

Example (a mainframe dataset, 3 records of 30 bytes in one message)::

    codec:
      format: fixed
      encoding: cp037
      record_length: 30
      layout:
        - {name: id,       pic: "9(6)"}                 # bytes 0-5, zoned
        - {name: customer, pic: "X(12)"}                # bytes 6-17, text, right-trimmed
        - {name: amount,   pic: "S9(7)V99 COMP-3"}      # bytes 18-22, packed -> Decimal
        - {name: FILLER,   offset: 23, length: 7}       # skipped; written as spaces

Layout problems (overlaps, fields past the record, unsupported pictures) are configuration
errors naming the field; data problems are DecodeErrors naming record, field and bytes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.codecs import numeric
from gateway.codecs._ebcdic import digit_family
from gateway.codecs._text import scalar_text
from gateway.codecs.base import Codec, CodecConfig, check_encoding
from gateway.codecs.errors import DecodeError, EncodeError, hex_excerpt
from gateway.codecs.pic import Pic, parse_pic

__all__ = ["FixedWidthCodec", "FixedWidthConfig", "LayoutField"]


class LayoutField(BaseModel):
    """One field of a fixed-width record: ``{name, offset, length}`` (text) or ``{name, pic}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="Field name in the record; fields named FILLER are skipped on decode and written as spaces.")
    offset: int | None = Field(None, ge=0, description="0-based byte offset in the record; omitted: right after the previous field.")
    length: int | None = Field(None, ge=1, description="Length in bytes; omitted: from the PIC. Without a PIC the field is text, PIC X(length).")
    pic: str | None = Field(None, description="COBOL picture with usage, e.g. 'X(10)', '9(6)', 'S9(7)V99 COMP-3', 'S9(9) COMP'.")


@dataclass(frozen=True)
class _Slot:
    name: str
    offset: int
    pic: Pic

    @property
    def end(self) -> int:
        return self.offset + self.pic.size

    @property
    def filler(self) -> bool:
        return self.name.upper() == "FILLER"

    def span(self) -> str:
        return f"bytes {self.offset}-{self.end - 1}"


class FixedWidthConfig(CodecConfig):
    """Settings of the ``fixed`` codec."""

    format: Literal["fixed"] = "fixed"
    encoding: str = Field(
        "cp037",
        description="Code page of text and zoned digits: cp037, cp500, cp1047 (EBCDIC), latin-1, ascii or any Python codec.",
    )
    record_length: int | None = Field(
        None, ge=1, description="Bytes per record, for consecutive records (a mainframe dataset, RECFM=F); with record_separator, each record is followed by it."
    )
    record_separator: str | None = Field(
        None, min_length=1, description="Record separator for one record per line, e.g. '\\n' or '\\r\\n' (written in the encoding). Empty lines are skipped."
    )
    layout: list[LayoutField] = Field(min_length=1, description="The record's fields, in order.")
    trim: bool = Field(True, description="Right-trim spaces from text fields.")
    blank_numeric: Literal["error", "null", "zero"] = Field(
        "error", description="A zoned or packed field of only spaces or only 0x00 bytes: an error, null (encode writes None as spaces), or zero."
    )
    rounding: Literal["error", "half-up", "half-even"] = Field(
        "error", description="What encode does with more decimal places than the PIC holds: refuse, or round."
    )

    @model_validator(mode="after")
    def _check(self) -> FixedWidthConfig:
        check_encoding(self.encoding)
        resolve_layout(self)
        return self


def resolve_layout(config: FixedWidthConfig) -> list[_Slot]:
    """The layout with offsets and pictures resolved, checked against the record framing.

    Raises:
        ValueError: a field without length or PIC, a length that contradicts the PIC, an
            unsupported PIC, overlapping fields, a field past ``record_length``, a numeric field
            in an encoding that is neither ASCII- nor EBCDIC-based, binary fields in
            separator-only records, or no framing at all.
    """
    slots: list[_Slot] = []
    position, names = 0, set()
    for i, f in enumerate(config.layout):
        where = f"layout[{i}] {f.name!r}"
        try:
            pic = parse_pic(f.pic) if f.pic else parse_pic(f"X({f.length})") if f.length else None
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if pic is None:
            raise ValueError(f"{where}: give a pic or a length")
        if f.length is not None and f.length != pic.size:
            raise ValueError(f"{where}: length {f.length} does not match PIC {pic.text} ({pic.size} bytes)")
        slot = _Slot(f.name, position if f.offset is None else f.offset, pic)
        if not slot.filler:
            if f.name in names:
                raise ValueError(f"{where}: the name is used twice")
            names.add(f.name)
        if pic.kind == "zoned" and digit_family(config.encoding) is None:
            raise ValueError(f"{where}: zoned numbers need an ASCII- or EBCDIC-based encoding, not {config.encoding!r}")
        slots.append(slot)
        position = slot.end
    ordered = sorted(slots, key=lambda s: s.offset)
    for a, b in itertools.pairwise(ordered):
        if b.offset < a.end:
            raise ValueError(f"layout fields {a.name!r} ({a.span()}) and {b.name!r} ({b.span()}) overlap")
    if config.record_length is None and config.record_separator is None:
        raise ValueError("set record_length (consecutive fixed-length records) or record_separator (one record per line)")
    if config.record_length is not None:
        for s in slots:
            if s.end > config.record_length:
                raise ValueError(f"layout field {s.name!r} ({s.span()}) ends beyond record_length {config.record_length}")
    elif any(s.pic.kind in ("packed", "binary") for s in slots):
        raise ValueError(
            "packed and binary fields need record_length: their bytes may equal the record separator"
        )
    if config.record_separator is not None:
        try:
            config.record_separator.encode(config.encoding)
        except UnicodeEncodeError:
            raise ValueError(f"record_separator cannot be written in {config.encoding}") from None
    return slots


class FixedWidthCodec(Codec):
    """Fixed-width records (COBOL copybook subset): text, zoned, packed and binary fields."""

    name = "fixed"
    config_model = FixedWidthConfig
    config: FixedWidthConfig

    def __init__(self, config: CodecConfig) -> None:
        """Build the codec; the layout was checked when the config was validated.

        Args:
            config: a :class:`FixedWidthConfig`.
        """
        super().__init__(config)
        cfg = self.config
        self._slots = resolve_layout(cfg)
        self._ebcdic = digit_family(cfg.encoding) == "ebcdic"
        self._space = " ".encode(cfg.encoding)
        self._sep = cfg.record_separator.encode(cfg.encoding) if cfg.record_separator else b""
        self._min_length = max(s.end for s in self._slots)
        self._length = cfg.record_length or self._min_length
        self._decoders = [(s, self._decoder(s)) for s in self._slots if not s.filler]

    # -- decode ---------------------------------------------------------------------------

    def _decoder(self, slot: _Slot) -> Callable[[bytes], Any]:
        pic, cfg = slot.pic, self.config
        if pic.kind == "text":
            trim = cfg.trim
            return lambda raw: raw.decode(cfg.encoding).rstrip(" ") if trim else raw.decode(cfg.encoding)
        if pic.kind == "binary":
            return lambda raw: numeric.decode_binary(raw, scale=pic.scale, signed=pic.signed)
        number: Callable[[bytes], int | Decimal]
        if pic.kind == "packed":
            number = lambda raw: numeric.decode_packed(raw, digits=pic.digits, scale=pic.scale, signed=pic.signed)
        else:
            ebcdic = self._ebcdic
            number = lambda raw: numeric.decode_zoned(raw, scale=pic.scale, signed=pic.signed, ebcdic=ebcdic)
        blanks = {self._space * pic.size, b"\x00" * pic.size}
        zero: Any = 0 if pic.scale == 0 else Decimal(0).scaleb(-pic.scale)

        def decode(raw: bytes) -> Any:
            if raw in blanks:
                if cfg.blank_numeric == "null":
                    return None
                if cfg.blank_numeric == "zero":
                    return zero
                raise numeric.NumberFormatError("blank numeric field (only spaces or 0x00; see blank_numeric)")
            return number(raw)

        return decode

    def _frames(self, payload: bytes) -> Iterator[tuple[int, int | None, bytes]]:
        """(record index, line number or None, record bytes) for each record in ``payload``."""
        length, sep = self.config.record_length, self._sep
        if length is not None and not sep:
            for index, start in enumerate(range(0, len(payload), length)):
                yield index, None, payload[start : start + length]
        elif length is not None:
            index, start = 0, 0
            while start < len(payload):
                record, after = payload[start : start + length], start + length
                if after < len(payload) and payload[after : after + len(sep)] != sep:
                    raise DecodeError(
                        f"expected the record separator after {length} bytes, found {hex_excerpt(payload[after:after + len(sep)])}",
                        record_index=index, offset=after,
                    )
                yield index, index + 1, record
                index, start = index + 1, after + len(sep)
        else:
            index = 0
            for number, line in enumerate(payload.split(sep), 1):
                if line:
                    yield index, number, line
                    index += 1

    def iter_decode(self, payload: bytes, *, content_type: str | None = None) -> Iterator[dict[str, Any] | DecodeError]:
        """Yield one dict per record, or an error naming the record, field and bytes.

        ``content_type`` is ignored: the layout fixes the encoding.

        Raises:
            DecodeError: fixed-length records with separators whose separator is missing
                (the records after it cannot be found).
        """
        if self.config.record_length:
            need, expected = self._length, f"record_length {self._length}"
        else:
            need, expected = self._min_length, f"at least {self._min_length}, the layout's length"
        for index, line, record in self._frames(payload):
            if len(record) < need:
                yield DecodeError(f"record is {len(record)} bytes, expected {expected}", record_index=index, line=line)
                continue
            values: dict[str, Any] = {}
            try:
                for slot, decode in self._decoders:
                    raw = record[slot.offset : slot.end]
                    values[slot.name] = decode(raw)
            except (numeric.NumberFormatError, UnicodeDecodeError) as exc:
                yield self._decode_error(exc, slot, raw, index, line)
                continue
            yield values

    def _decode_error(self, exc: Exception, slot: _Slot, raw: bytes, index: int, line: int | None) -> DecodeError:
        at: int | None
        if isinstance(exc, UnicodeDecodeError):
            reason, at = f"byte 0x{raw[exc.start]:02X} is not valid {self.config.encoding}", exc.start
        else:
            reason, at = str(exc), getattr(exc, "index", None)
        position = f" at byte {slot.offset + at}" if at is not None and slot.pic.size > 1 else ""
        return DecodeError(
            f"{reason}{position} (PIC {slot.pic.text}; bytes {hex_excerpt(raw)})",
            record_index=index, field=slot.name, offset=slot.offset, length=slot.pic.size, line=line,
        )

    # -- encode ---------------------------------------------------------------------------

    def _encode_value(self, slot: _Slot, value: Any) -> bytes:
        pic, cfg = slot.pic, self.config
        if pic.kind == "text":
            text = scalar_text(value) or ""
            try:
                data = text.encode(cfg.encoding)
            except UnicodeEncodeError as exc:
                char = text[exc.start]
                raise numeric.NumberFormatError(f"character U+{ord(char):04X} at position {exc.start} cannot be encoded in {cfg.encoding}") from None
            if len(data) > pic.size:
                raise numeric.NumberFormatError(f"text is {len(data)} bytes, PIC {pic.text} holds {pic.size}")
            return data + self._space * (pic.size - len(data))
        if value is None:
            if cfg.blank_numeric == "null" and pic.kind != "binary":
                return self._space * pic.size
            raise numeric.NumberFormatError("no value for a numeric field")
        n = numeric.to_scaled_int(value, digits=pic.digits, scale=pic.scale, signed=pic.signed, rounding=cfg.rounding)
        if pic.kind == "packed":
            return numeric.encode_packed(n, digits=pic.digits, signed=pic.signed)
        if pic.kind == "binary":
            return numeric.encode_binary(n, size=pic.size, signed=pic.signed)
        return numeric.encode_zoned(n, digits=pic.digits, signed=pic.signed, ebcdic=self._ebcdic)

    def encode(self, records: Sequence[Mapping[str, Any]]) -> bytes:
        """The records laid out per the layout, gaps and FILLER as spaces, joined per the framing.

        Line-separated records end with the separator, the last one included.

        Raises:
            EncodeError: a field that is not in the layout, text too long or not encodable, a
                number out of range, with too many decimals or negative for an unsigned PIC.
        """
        known = {s.name for s, _ in self._decoders}
        out = []
        for i, record in enumerate(records):
            if not isinstance(record, Mapping):
                raise EncodeError(f"expected a mapping, got {type(record).__name__}", record_index=i)
            unknown = [k for k in record if k not in known]
            if unknown:
                raise EncodeError("not in the layout", record_index=i, field=str(unknown[0]))
            buf = bytearray(self._space * self._length)
            for slot, _ in self._decoders:
                try:
                    buf[slot.offset : slot.end] = self._encode_value(slot, record.get(slot.name))
                except (numeric.NumberFormatError, TypeError) as exc:
                    raise EncodeError(
                        str(exc), record_index=i, field=slot.name, offset=slot.offset, length=slot.pic.size
                    ) from None
            out.append(bytes(buf))
        if not self._sep:
            return b"".join(out)
        return b"".join(r + self._sep for r in out)
