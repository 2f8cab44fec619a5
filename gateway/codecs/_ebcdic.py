"""EBCDIC helpers: the cp1047 code page (missing from Python) and code-page family detection.

cp1047 (EBCDIC Latin-1/Open Systems, the z/OS UNIX default) is cp037 with six code points
moved, per IBM's CDRA table for CCSID 1047: 5F ^, AD [, B0 ¬, BA Ý, BB ¨, BD ]. Line feed is 25
and next line 15 in both, as in that table.
"""

from __future__ import annotations

import codecs
from encodings import cp037
from typing import Any, Literal

__all__ = ["digit_family", "register"]

_CP1047_MOVES = {0x5F: "^", 0xAD: "[", 0xB0: "\u00ac", 0xBA: "\u00dd", 0xBB: "\u00a8", 0xBD: "]"}
_DECODING = "".join(_CP1047_MOVES.get(b, cp037.decoding_table[b]) for b in range(256))
_ENCODING = codecs.charmap_build(_DECODING)
_NAMES = {"cp1047", "ibm1047", "1047", "csibm1047"}


def _encode(text: str, errors: str = "strict") -> tuple[bytes, int]:
    return codecs.charmap_encode(text, errors, _ENCODING)


def _decode(data: Any, errors: str = "strict") -> tuple[str, int]:
    return codecs.charmap_decode(data, errors, _DECODING)


class _IncrementalEncoder(codecs.IncrementalEncoder):
    def encode(self, input: str, final: bool = False) -> bytes:
        return codecs.charmap_encode(input, self.errors, _ENCODING)[0]


class _IncrementalDecoder(codecs.IncrementalDecoder):
    def decode(self, input: Any, final: bool = False) -> str:
        return codecs.charmap_decode(input, self.errors, _DECODING)[0]


_INFO = codecs.CodecInfo(
    name="cp1047",
    encode=_encode,
    decode=_decode,
    incrementalencoder=_IncrementalEncoder,
    incrementaldecoder=_IncrementalDecoder,
)


def _search(name: str) -> codecs.CodecInfo | None:
    return _INFO if name.lower().replace("-", "").replace("_", "") in _NAMES else None


_registered = False


def register() -> None:
    """Make ``cp1047`` (aliases ``ibm1047``, ``ibm-1047``) known to :func:`codecs.lookup`; idempotent."""
    global _registered
    if not _registered:
        codecs.register(_search)
        _registered = True


def digit_family(encoding: str) -> Literal["ascii", "ebcdic"] | None:
    """Whether ``encoding`` writes digits as ASCII (0x30-0x39), EBCDIC (0xF0-0xF9), or neither."""
    digits = "0123456789".encode(encoding)
    if digits == bytes(range(0x30, 0x3A)):
        return "ascii"
    if digits == bytes(range(0xF0, 0xFA)):
        return "ebcdic"
    return None
