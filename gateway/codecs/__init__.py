"""Codecs for legacy record formats: JSON, XML, CSV and fixed-width (COBOL copybook) records.

Any adapter can use them: a queue adapter turns one message into records with
:meth:`Codec.decode` and writes records back in a legacy format with :meth:`Codec.encode`::

    codec = codec_from_config({"format": "fixed", "encoding": "cp037", "record_length": 30, "layout": [...]})
    records = codec.decode(body)

Codecs are plugins (entry point group ``gateway.codecs``); see docs/codecs.md.
"""

from gateway.codecs import _ebcdic
from gateway.codecs.base import Codec, CodecConfig, DecodeResult
from gateway.codecs.errors import CodecError, DecodeError, EncodeError
from gateway.codecs.registry import (
    CODEC_GROUP,
    codec_from_config,
    codec_names,
    load_codec,
)

_ebcdic.register()  # cp1047 is missing from Python's codecs; idempotent

__all__ = [
    "CODEC_GROUP",
    "Codec",
    "CodecConfig",
    "CodecError",
    "DecodeError",
    "DecodeResult",
    "EncodeError",
    "codec_from_config",
    "codec_names",
    "load_codec",
]
