"""JSON codec: one document (an object is one record, an array is records) or JSON Lines.

Example::

    codec:
      format: json
      records_path: data.orders     # the records sit at {"data": {"orders": [...]}}
      decimals: true                # 12.50 stays exact: Decimal('12.50')
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Any, Literal

import orjson
from pydantic import Field, field_validator, model_validator

from gateway.codecs.base import Codec, CodecConfig, charset_of, check_encoding
from gateway.codecs.errors import DecodeError, EncodeError
from gateway.events.jsonsafe import jsonable

__all__ = ["JsonCodec", "JsonCodecConfig"]

_UTF8 = {"utf-8", "utf8", "u8", "utf"}
_PATH = re.compile(r"^[^.]+(\.[^.]+)*$")


class JsonCodecConfig(CodecConfig):
    """Settings of the ``json`` codec."""

    format: Literal["json"] = "json"
    lines: bool = Field(
        False, description="JSON Lines: one object per line (blank lines ignored) instead of one document."
    )
    records_path: str | None = Field(
        None,
        description=(
            "Dotted path of the records inside the document, e.g. 'data.orders'; the value there "
            "is an object (one record) or an array of objects. encode wraps the records the same way. "
            "Not with lines."
        ),
    )
    encoding: str = Field("utf-8", description="Text encoding of the payload (a content type's charset overrides it).")
    decimals: bool = Field(
        False,
        description=(
            "Read numbers with a fraction as exact Decimal instead of float (the standard library's "
            "slower parser). encode always writes decimals as strings, as events carry them."
        ),
    )
    single_object: bool = Field(
        False, description="encode one record as a bare object instead of a one-element array (document mode)."
    )

    _check_encoding = field_validator("encoding")(check_encoding)

    @field_validator("records_path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and not _PATH.match(value):
            raise ValueError(f"records_path {value!r} must be dot-separated keys, e.g. 'data.orders'")
        return value

    @model_validator(mode="after")
    def _modes(self) -> JsonCodecConfig:
        if self.lines and self.records_path:
            raise ValueError("records_path cannot be combined with lines: each line is one record")
        return self


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


class JsonCodec(Codec):
    """Records as JSON objects (orjson for speed; the standard library when ``decimals`` is on)."""

    name = "json"
    config_model = JsonCodecConfig
    config: JsonCodecConfig

    def _text(self, payload: bytes, content_type: str | None) -> bytes | str:
        enc = charset_of(content_type) or self.config.encoding
        if enc.lower() in _UTF8 and not self.config.decimals:
            return payload  # orjson reads UTF-8 bytes directly (and rejects invalid UTF-8)
        try:
            return payload.decode(enc)
        except UnicodeDecodeError as exc:
            bad = exc.start  # raised below, outside this block: exc.object is the whole payload
        raise DecodeError(f"payload is not valid {enc}: byte 0x{payload[bad]:02X} cannot be decoded", offset=bad)

    def _loads(self, doc: bytes | str, *, record_index: int | None = None, line: int | None = None) -> Any:
        at: tuple[int | None, int | None, int]
        try:
            if self.config.decimals:
                return json.loads(doc, parse_float=Decimal)
            return orjson.loads(doc)
        except json.JSONDecodeError as exc:  # orjson.JSONDecodeError subclasses it
            # The native error holds the whole document (exc.doc): keep only its position.
            reason, at = exc.msg, (exc.lineno, exc.colno, exc.pos)
        except UnicodeDecodeError as exc:
            reason, at = "not valid UTF-8", (None, None, exc.start)
        where = f" (line {at[0]}, column {at[1]})" if at[0] is not None and line is None else ""
        raise DecodeError(f"invalid JSON: {reason}{where}", record_index=record_index, line=line, offset=None if line else at[2])

    def iter_decode(self, payload: bytes, *, content_type: str | None = None) -> Iterator[dict[str, Any] | DecodeError]:
        """Yield the objects of the document (or of each line), or an error for a non-object record.

        Raises:
            DecodeError: the document is not valid JSON, ``records_path`` is missing, or the top
                level is neither an object nor an array.
        """
        text = self._text(payload, content_type)
        if self.config.lines:
            yield from self._iter_lines(text)
            return
        doc = self._loads(text)
        walked: list[str] = []
        for key in self.config.records_path.split(".") if self.config.records_path else []:
            if not isinstance(doc, dict) or key not in doc:
                found = "no such key" if isinstance(doc, dict) else f"found {_kind(doc)}"
                raise DecodeError(f"records_path {self.config.records_path!r}: no object key {'.'.join([*walked, key])!r} ({found})")
            walked.append(key)
            doc = doc[key]
        if isinstance(doc, dict):
            yield doc
        elif isinstance(doc, list):
            for i, item in enumerate(doc):
                yield item if isinstance(item, dict) else DecodeError(f"expected a JSON object, got {_kind(item)}", record_index=i)
        else:
            raise DecodeError(f"expected a JSON object or an array of objects, got {_kind(doc)}")

    def _iter_lines(self, text: bytes | str) -> Iterator[dict[str, Any] | DecodeError]:
        index = 0
        lines: list[Any] = text.split(b"\n") if isinstance(text, bytes) else text.split("\n")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                value = self._loads(line, record_index=index, line=number)
            except DecodeError as exc:
                yield exc
            else:
                yield value if isinstance(value, dict) else DecodeError(
                    f"expected a JSON object, got {_kind(value)}", record_index=index, line=number
                )
            index += 1

    def encode(self, records: Sequence[Mapping[str, Any]]) -> bytes:
        """JSON of ``records``: an array (wrapped along ``records_path``) or one object per line.

        Decimals become strings, datetimes ISO-8601, as in events.

        Raises:
            EncodeError: a record is not a mapping, or a value JSON cannot hold.
        """
        safe = [self._safe(i, r) for i, r in enumerate(records)]
        if self.config.lines:
            out = b"".join(orjson.dumps(r, option=orjson.OPT_NON_STR_KEYS) + b"\n" for r in safe)
        else:
            doc: Any = safe[0] if self.config.single_object and len(safe) == 1 else safe
            for key in reversed(self.config.records_path.split(".") if self.config.records_path else []):
                doc = {key: doc}
            out = orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS)
        if self.config.encoding.lower() in _UTF8:
            return out
        try:
            return out.decode("utf-8").encode(self.config.encoding)
        except UnicodeEncodeError as exc:
            raise EncodeError(f"character U+{ord(exc.object[exc.start]):04X} cannot be encoded in {self.config.encoding}") from None

    @staticmethod
    def _safe(index: int, record: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(record, Mapping):
            raise EncodeError(f"expected a mapping, got {type(record).__name__}", record_index=index)
        out = {}
        for key, value in record.items():
            try:
                out[str(key)] = jsonable(value)
            except TypeError as exc:
                raise EncodeError(str(exc), record_index=index, field=str(key)) from None
        return out
