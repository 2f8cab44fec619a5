"""The codec plugin API: one payload to records (``decode``) and records to one payload (``encode``).

A codec is a small class with a pydantic config model; built-ins and plugins are registered the
same way, through the ``gateway.codecs`` entry point group (see :mod:`gateway.codecs.registry`).
To write one, subclass :class:`Codec`, set ``name`` and ``config_model``, and implement
:meth:`Codec.iter_decode` and :meth:`Codec.encode`.
"""

from __future__ import annotations

import abc
import codecs
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.codecs.errors import DecodeError
from gateway.errors import ConfigurationError

__all__ = ["Codec", "CodecConfig", "DecodeResult", "charset_of", "check_encoding"]

log = logging.getLogger(__name__)


class CodecConfig(BaseModel):
    """Settings every codec shares; each codec's config model subclasses this.

    A subclass narrows ``format`` to its own name (``format: Literal["csv"] = "csv"``), forbids
    unknown keys, and gives every field a ``description``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str = Field(description="The codec: json, xml, csv, fixed, or an installed plugin's name.")
    on_record_error: Literal["fail", "skip"] = Field(
        "fail",
        description=(
            "One bad record in a multi-record message: 'fail' rejects the whole message (a "
            "DecodeError, so it goes to dead letters); 'skip' keeps the good records and logs the "
            "bad ones (decode_all returns them). A message that cannot be read at all always fails."
        ),
    )


@dataclass(frozen=True)
class DecodeResult:
    """What :meth:`Codec.decode_all` read from one payload.

    Attributes:
        records: the records that decoded, in payload order.
        errors: one :class:`DecodeError` per record that did not, each with its ``record_index``.
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    errors: list[DecodeError] = field(default_factory=list)


class Codec(abc.ABC):
    """Turns one payload into records and records into one payload, in one legacy format.

    Subclasses set the class attributes and implement :meth:`iter_decode` and :meth:`encode`;
    :meth:`decode_all` and :meth:`decode` are built on :meth:`iter_decode`.

    Attributes:
        name: the format name, equal to the entry point name (``"fixed"``).
        config_model: the pydantic model of this codec's settings.
        config: the validated settings this instance was built with.
    """

    name: ClassVar[str]
    config_model: ClassVar[type[CodecConfig]]

    def __init__(self, config: CodecConfig) -> None:
        """Build the codec from its validated settings.

        Args:
            config: an instance of :attr:`config_model` (use
                :func:`gateway.codecs.codec_from_config` to build one from a mapping).

        Raises:
            ConfigurationError: ``config`` is not an instance of :attr:`config_model`.
        """
        if not isinstance(config, self.config_model):
            raise ConfigurationError(
                f"codec {self.name!r} needs a {self.config_model.__name__}, got {type(config).__name__}"
            )
        self.config = config

    @abc.abstractmethod
    def iter_decode(
        self, payload: bytes, *, content_type: str | None = None
    ) -> Iterator[dict[str, Any] | DecodeError]:
        """Yield each record of ``payload`` in order, or a DecodeError in place of a bad one.

        Override this in a codec. Yield (do not raise) the error of a single record, so that
        ``on_record_error: skip`` can keep the others; raise a DecodeError when the payload as
        a whole cannot be read (not well-formed, framing lost).

        Args:
            payload: the raw message body.
            content_type: the message's content type, if known; codecs that read text honour
                its ``charset`` parameter.

        Raises:
            DecodeError: the payload as a whole is unreadable.
        """

    @abc.abstractmethod
    def encode(self, records: Sequence[Mapping[str, Any]]) -> bytes:
        """Write ``records`` as one payload; ``decode`` of the result gives them back.

        Args:
            records: field mappings, as ``decode`` returns them (strings for decimals are accepted
                where the format holds numbers).

        Returns:
            The payload bytes.

        Raises:
            EncodeError: a record cannot be written (names the record and field).
        """

    def decode_all(self, payload: bytes, *, content_type: str | None = None) -> DecodeResult:
        """Every good record of ``payload`` and an error for each bad one, whatever ``on_record_error`` says.

        Args:
            payload: the raw message body.
            content_type: the message's content type, if known.

        Returns:
            The records and the per-record errors.

        Raises:
            DecodeError: the payload as a whole is unreadable.
        """
        result = DecodeResult()
        for item in self.iter_decode(bytes(payload), content_type=content_type):
            if isinstance(item, DecodeError):
                result.errors.append(item)
            else:
                result.records.append(item)
        return result

    def decode(self, payload: bytes, *, content_type: str | None = None) -> list[dict[str, Any]]:
        """The records of ``payload``.

        Args:
            payload: the raw message body.
            content_type: the message's content type, if known.

        Returns:
            The records; with ``on_record_error: skip``, only the good ones (the bad ones are
            logged as a warning).

        Raises:
            DecodeError: the payload is unreadable, or (with ``on_record_error: fail``) a record
                is bad: the first bad record's error.
        """
        result = self.decode_all(payload, content_type=content_type)
        if result.errors:
            if self.config.on_record_error == "fail":
                raise result.errors[0]
            log.warning(
                "codec %r skipped %d of %d records; first: %s",
                self.name,
                len(result.errors),
                len(result.errors) + len(result.records),
                result.errors[0],
            )
        return result.records


def check_encoding(name: str) -> str:
    """``name`` if Python knows the text encoding, for use in config validators.

    Raises:
        ValueError: unknown encoding.
    """
    try:
        codecs.lookup(name)
    except LookupError:
        raise ValueError(f"unknown text encoding {name!r} (any Python codec name, e.g. utf-8, cp1252, cp037)") from None
    return name


def charset_of(content_type: str | None) -> str | None:
    """The ``charset`` parameter of a content type (``'text/csv; charset=cp1252'`` -> ``'cp1252'``).

    Raises:
        DecodeError: the charset is not a known encoding.
    """
    if not content_type:
        return None
    for param in content_type.split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            charset = value.strip().strip('"')
            try:
                codecs.lookup(charset)
            except LookupError:
                raise DecodeError(f"content type names an unknown charset {charset[:40]!r}") from None
            return charset
    return None
