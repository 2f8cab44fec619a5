"""Mainframe number formats: zoned decimal with sign overpunch, packed decimal (COMP-3), binary.

Decoders return ``int`` for scale 0 and an exact ``Decimal`` otherwise; encoders take ``int``,
``Decimal``, ``float`` or numeric text (events carry decimals as strings) and refuse values that
do not fit the picture.

Sign conventions:

* EBCDIC zoned: digits are ``F0``-``F9``; the last byte's zone is the sign, ``C``/``F`` plus
  and ``D`` minus (``F1 F2 D3`` is -123). Encoding writes ``C`` for signed positives.
* ASCII zoned: digits are ``0``-``9``; a signed field's last byte is overpunched,
  ``{ABCDEFGHI`` for +0..+9 and ``}JKLMNOPQR`` for -0..-9 (``12C`` is +123, ``12L`` is -123);
  a plain last digit reads as positive.
* Packed: two digits per byte, the last nibble the sign, ``C``/``F`` plus and ``D`` minus
  (+12345 in ``S9(5) COMP-3`` is ``12 34 5C``).
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Context, Decimal, InvalidOperation
from typing import Any, Literal

__all__ = [
    "NumberFormatError",
    "decode_binary",
    "decode_packed",
    "decode_zoned",
    "encode_binary",
    "encode_packed",
    "encode_zoned",
    "to_scaled_int",
]

_EXACT = Context(prec=200)  # wide enough that scaling a 38-digit value never rounds
_ASCII_POS = "{ABCDEFGHI"
_ASCII_NEG = "}JKLMNOPQR"
_ASCII_LAST = {ord(c): (d, False) for d, c in enumerate("0123456789")}
_ASCII_LAST.update({ord(c): (d, False) for d, c in enumerate(_ASCII_POS)})
_ASCII_LAST.update({ord(c): (d, True) for d, c in enumerate(_ASCII_NEG)})
Rounding = Literal["error", "half-up", "half-even"]


class NumberFormatError(ValueError):
    """Bytes that are not a valid number, or a value that does not fit; ``index`` is the bad byte."""

    def __init__(self, reason: str, index: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.index = index


def _value(n: int, scale: int) -> int | Decimal:
    return n if scale == 0 else Decimal(n).scaleb(-scale, _EXACT)


def _picture(digits: int, scale: int, signed: bool) -> str:
    whole = digits - scale
    return f"{'S' if signed else ''}{f'9({whole})' if whole else ''}{f'V9({scale})' if scale else ''}"


def to_scaled_int(value: Any, *, digits: int, scale: int, signed: bool, rounding: Rounding = "error") -> int:
    """``value`` times 10**scale as an int, checked against the picture.

    Raises:
        NumberFormatError: not a number, too many decimal places (unless rounding), too many
            digits, or negative for an unsigned picture.
    """
    if isinstance(value, bool) or not isinstance(value, (int, Decimal, float, str)):
        raise NumberFormatError(f"expected a number, got {type(value).__name__}")
    try:
        number = Decimal(repr(value)) if isinstance(value, float) else Decimal(value.strip() if isinstance(value, str) else value)
    except InvalidOperation:
        raise NumberFormatError(f"expected a number, got text {str(value)[:20]!r}") from None
    if not number.is_finite():
        raise NumberFormatError(f"expected a finite number, got {number}")
    scaled = number.scaleb(scale, _EXACT)
    whole = scaled.to_integral_value(rounding=ROUND_HALF_EVEN if rounding == "half-even" else ROUND_HALF_UP)
    if whole != scaled and rounding == "error":
        raise NumberFormatError(f"{number} has more than {scale} decimal places (set rounding to round it)")
    n = int(whole)
    if n < 0 and not signed:
        raise NumberFormatError(f"{number} is negative but the picture is unsigned")
    if abs(n) >= 10**digits:
        limit = _value(10**digits - 1, scale)
        raise NumberFormatError(f"{number} is out of range for {_picture(digits, scale, signed)} (at most {limit})")
    return n


def decode_zoned(data: bytes, *, scale: int, signed: bool, ebcdic: bool) -> int | Decimal:
    """A zoned decimal field (display digits, sign overpunched on the last one).

    Raises:
        NumberFormatError: a byte that is not a digit, or a sign the picture does not allow.
    """
    if ebcdic:
        for i, b in enumerate(data[:-1]):
            if b >> 4 != 0xF or b & 0xF > 9:
                raise NumberFormatError(f"invalid zoned digit 0x{b:02X} (expected F0-F9)", i)
        last = data[-1]
        zone, digit = last >> 4, last & 0xF
        if digit > 9:
            raise NumberFormatError(f"invalid zoned digit 0x{last:02X} (expected a digit nibble 0-9)", len(data) - 1)
        if zone not in (0xC, 0xD, 0xF):
            raise NumberFormatError(f"invalid sign zone 0x{zone:X} in 0x{last:02X} (expected C, D or F)", len(data) - 1)
        negative = zone == 0xD
    else:
        for i, b in enumerate(data[:-1]):
            if not 0x30 <= b <= 0x39:
                raise NumberFormatError(f"invalid zoned digit 0x{b:02X} (expected ASCII 0-9)", i)
        last = data[-1]
        if last not in _ASCII_LAST or (not signed and not 0x30 <= last <= 0x39):
            expected = "0-9, {, A-I, } or J-R" if signed else "ASCII 0-9"
            raise NumberFormatError(f"invalid last zoned byte 0x{last:02X} (expected {expected})", len(data) - 1)
        digit, negative = _ASCII_LAST[last]
    if negative and not signed:
        raise NumberFormatError("negative sign (zone D) in an unsigned field", len(data) - 1)
    digits = bytes(0x30 | (b & 0xF) for b in data[:-1]).decode("ascii") + str(digit)
    n = int(digits)
    return _value(-n if negative else n, scale)


def encode_zoned(n: int, *, digits: int, signed: bool, ebcdic: bool) -> bytes:
    """``n`` (already scaled, see :func:`to_scaled_int`) as ``digits`` zoned bytes."""
    text = str(abs(n)).rjust(digits, "0")
    last = int(text[-1])
    if ebcdic:
        zone = (0xD if n < 0 else 0xC) if signed else 0xF
        return bytes(0xF0 | int(c) for c in text[:-1]) + bytes([zone << 4 | last])
    end = (_ASCII_NEG if n < 0 else _ASCII_POS)[last] if signed else text[-1]
    return (text[:-1] + end).encode("ascii")


def decode_packed(data: bytes, *, digits: int, scale: int, signed: bool) -> int | Decimal:
    """A packed decimal (COMP-3) field: two digit nibbles per byte, the last nibble the sign.

    Raises:
        NumberFormatError: a digit nibble above 9, a sign nibble other than C, D or F, a minus
            in an unsigned field, or a non-zero pad nibble (more digits than the picture).
    """
    nibbles = data.hex()
    body, sign = nibbles[:-1], nibbles[-1]
    if not body.isdigit():
        bad = next(i for i, c in enumerate(body) if not c.isdigit())
        raise NumberFormatError(f"packed decimal has invalid digit nibble 0x{body[bad].upper()} (expected 0-9)", bad // 2)
    if sign not in "cdf":
        raise NumberFormatError(f"packed decimal has invalid sign nibble 0x{sign.upper()} (expected C, D or F)", len(data) - 1)
    if sign == "d" and not signed:
        raise NumberFormatError("packed decimal has a minus sign (D) in an unsigned field", len(data) - 1)
    pad = len(body) - digits
    if pad > 0 and body[:pad].strip("0"):
        raise NumberFormatError(f"packed decimal has more than {digits} digits (pad nibble not 0)", 0)
    n = int(body)
    return _value(-n if sign == "d" else n, scale)


def encode_packed(n: int, *, digits: int, signed: bool) -> bytes:
    """``n`` (already scaled) as packed decimal: C/D sign when signed, F when not."""
    sign = ("d" if n < 0 else "c") if signed else "f"
    return bytes.fromhex(str(abs(n)).rjust(digits // 2 * 2 + 1, "0") + sign)


def decode_binary(data: bytes, *, scale: int, signed: bool) -> int | Decimal:
    """A big-endian binary (COMP/COMP-4/BINARY) field, two's complement when signed."""
    return _value(int.from_bytes(data, "big", signed=signed), scale)


def encode_binary(n: int, *, size: int, signed: bool) -> bytes:
    """``n`` (already scaled) as ``size`` big-endian bytes."""
    return n.to_bytes(size, "big", signed=signed)
