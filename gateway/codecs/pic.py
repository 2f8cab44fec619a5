"""COBOL PICTURE clauses, the subset the fixed-width codec reads and writes.

==========================  ============  ==========================================
picture                     kind          bytes
==========================  ============  ==========================================
``X(n)``, ``XXX``, ``A(n)`` text          n
``9(n)``, ``9999``          zoned         n (unsigned)
``S9(n)V9(m)``              zoned         n + m (sign overpunched on the last digit)
``S9(n)V9(m) COMP-3``       packed        (n + m) // 2 + 1
``S9(n) COMP``/``BINARY``   binary        2 (n <= 4), 4 (n <= 9), 8 (n <= 18)
==========================  ============  ==========================================

The leading ``PIC``/``PICTURE``, ``USAGE [IS]`` and a final period are accepted and ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = ["MAX_DIGITS", "Pic", "parse_pic"]

#: Most digits a numeric field may have (COBOL's ARITH(EXTEND) limit).
MAX_DIGITS = 38

_SYMBOL = re.compile(r"([SVXA9])(?:\((\d+)\))?")
_USAGES = {
    "DISPLAY": "display",
    "COMP-3": "packed", "COMPUTATIONAL-3": "packed", "PACKED-DECIMAL": "packed",
    "COMP": "binary", "COMP-4": "binary", "COMP-5": "binary", "BINARY": "binary",
    "COMPUTATIONAL": "binary", "COMPUTATIONAL-4": "binary", "COMPUTATIONAL-5": "binary",
}


@dataclass(frozen=True)
class Pic:
    """A parsed picture.

    Attributes:
        kind: ``text``, ``zoned`` (display digits, sign overpunched), ``packed`` (COMP-3) or
            ``binary`` (COMP, big-endian two's complement).
        digits: number of characters (text) or digits (numbers, both sides of V).
        scale: digits after the implied decimal point V.
        signed: the picture starts with S.
        text: the picture as written, for messages.
    """

    kind: Literal["text", "zoned", "packed", "binary"]
    digits: int
    scale: int
    signed: bool
    text: str

    @property
    def size(self) -> int:
        """Bytes the field takes in a record."""
        if self.kind == "packed":
            return self.digits // 2 + 1
        if self.kind == "binary":
            return 2 if self.digits <= 4 else 4 if self.digits <= 9 else 8
        return self.digits


def parse_pic(text: str) -> Pic:
    """Parse a picture with its usage, e.g. ``'PIC S9(7)V99 COMP-3'``.

    Args:
        text: the picture clause.

    Returns:
        The parsed picture.

    Raises:
        ValueError: a picture outside the supported subset, with what is supported.
    """
    words = text.strip().rstrip(".").upper().split()
    if words and words[0] in ("PIC", "PICTURE"):
        words = words[1:]
    if words and words[0] == "IS":
        words = words[1:]
    if not words:
        raise ValueError(f"empty picture {text!r}")
    picture, rest = words[0], [w for w in words[1:] if w not in ("USAGE", "IS")]
    if len(rest) > 1 or (rest and rest[0] not in _USAGES):
        hint = " (COMP-1/COMP-2 floating point is not supported)" if rest and rest[0] in ("COMP-1", "COMP-2") else ""
        raise ValueError(f"unsupported usage {' '.join(rest)!r} in {text!r}{hint}; supported: DISPLAY, COMP-3, COMP, COMP-4, COMP-5, BINARY")
    usage = _USAGES[rest[0]] if rest else "display"
    symbols: list[tuple[str, int]] = []
    pos = 0
    while pos < len(picture):
        m = _SYMBOL.match(picture, pos)
        if m is None:
            raise ValueError(
                f"unsupported picture {text!r} at {picture[pos:]!r}: only X, A, 9, S and V are supported "
                "(no editing symbols such as Z . , + - $ and no P scaling)"
            )
        count = int(m.group(2)) if m.group(2) is not None else 1
        if count < 1 or (m.group(1) in "SV" and m.group(2) is not None):
            raise ValueError(f"invalid repeat count in picture {text!r}")
        symbols.append((m.group(1), count))
        pos = m.end()
    letters = "".join(s for s, _ in symbols)
    if set(letters) <= {"X", "A"}:
        if usage != "display":
            raise ValueError(f"text picture {text!r} cannot have a binary or packed usage")
        return Pic("text", sum(n for _, n in symbols), 0, False, text.strip())
    if not re.fullmatch(r"S?(?:9+(?:V9*)?|V9+)", letters):
        raise ValueError(f"unsupported picture {text!r}: expected X(n) text or [S]9(n)[V9(m)] numbers")
    signed = letters.startswith("S")
    before = letters.partition("V")[0]
    int_digits = sum(n for s, n in symbols[: len(before)] if s == "9")
    scale = sum(n for s, n in symbols[len(before) + 1 :] if s == "9") if "V" in letters else 0
    digits = int_digits + scale
    kind: Literal["zoned", "packed", "binary"] = "zoned" if usage == "display" else usage  # type: ignore[assignment]
    limit = 18 if kind == "binary" else MAX_DIGITS
    if digits > limit:
        raise ValueError(f"picture {text!r} has {digits} digits; at most {limit} are supported for {kind} fields")
    return Pic(kind, digits, scale, signed, text.strip())
