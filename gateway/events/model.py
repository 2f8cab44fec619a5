"""The CloudEvents 1.0 envelope every adapter emits (structured JSON mode).

Lineage travels in extension attributes named by the CloudEvents rules (lowercase letters and
digits): ``sourcename`` (the configured source), ``sourceposition`` (where in the source the record
was read, as JSON text), ``sourceadapter`` (the adapter kind) and, when present, ``traceparent``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gateway.errors import ContractError
from gateway.events.jsonsafe import dumps, format_time_cached, loads
from gateway.events.timeutil import parse_time

__all__ = [
    "Event",
    "CONTENT_TYPE",
    "EXT_SOURCE_NAME",
    "EXT_POSITION",
    "EXT_ADAPTER",
    "EXT_TRACEPARENT",
    "CORE_ATTRIBUTES",
]

CONTENT_TYPE = "application/cloudevents+json"
EXT_SOURCE_NAME = "sourcename"
EXT_POSITION = "sourceposition"
EXT_ADAPTER = "sourceadapter"
EXT_TRACEPARENT = "traceparent"

CORE_ATTRIBUTES = frozenset(
    {"specversion", "id", "source", "type", "subject", "time", "datacontenttype", "dataschema"}
)
_EXT_NAME = re.compile(r"^[a-z0-9]{1,20}$")


@dataclass(frozen=True, slots=True)
class Event:
    """One CloudEvents 1.0 event.

    Attributes:
        id: the event id; for adapter events a deterministic UUIDv5 (see ``gateway.events.ids``).
        source: the CloudEvents ``source`` URI-reference, e.g. ``/legacy-gateway/sources/orders``.
        type: the event type, reverse-DNS style, e.g. ``com.acme.order.changed``.
        time: when the record changed, aware UTC.
        data: JSON-safe payload.
        subject: the entity within the source, e.g. ``order/42``.
        extensions: extension attributes (lineage, ``traceparent``); values are str, int or bool.
    """

    id: str
    source: str
    type: str
    time: datetime
    data: Any
    subject: str | None = None
    datacontenttype: str = "application/json"
    dataschema: str | None = None
    extensions: Mapping[str, str | int | bool] = field(default_factory=dict)

    @property
    def source_name(self) -> str | None:
        """The configured gateway source that produced the event, if any."""
        value = self.extensions.get(EXT_SOURCE_NAME)
        return str(value) if value is not None else None

    def to_dict(self) -> dict[str, Any]:
        """Structured-mode JSON object."""
        out: dict[str, Any] = {
            "specversion": "1.0",
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "time": format_time_cached(self.time),
            "datacontenttype": self.datacontenttype,
        }
        if self.subject is not None:
            out["subject"] = self.subject
        if self.dataschema is not None:
            out["dataschema"] = self.dataschema
        out.update(self.extensions)
        out["data"] = self.data
        return out

    def to_json(self) -> bytes:
        """Structured-mode JSON bytes (``application/cloudevents+json``)."""
        return dumps(self.to_dict())

    @classmethod
    def from_json(cls, body: bytes | str) -> Event:
        """Parse structured-mode JSON; raises :class:`ContractError` naming the bad attribute."""
        try:
            obj = loads(body)
        except ValueError as exc:
            raise ContractError(f"event body is not valid JSON: {exc}") from None
        return cls.from_dict(obj)

    @classmethod
    def from_dict(cls, obj: Any, where: str = "event") -> Event:
        """Validate a structured-mode object.

        Raises:
            ContractError: naming ``where``, the attribute and what was expected.
        """
        if not isinstance(obj, Mapping):
            raise ContractError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if obj.get("specversion") != "1.0":
            raise ContractError(f"{where}.specversion: expected '1.0', got {obj.get('specversion')!r}")
        for name in ("id", "source", "type"):
            value = obj.get(name)
            if not isinstance(value, str) or not value:
                raise ContractError(f"{where}.{name}: expected a non-empty string, got {value!r}")
        time_text = obj.get("time")
        if not isinstance(time_text, str):
            raise ContractError(f"{where}.time: expected an RFC 3339 timestamp, got {time_text!r}")
        try:
            time = parse_time(time_text)
        except ValueError:
            raise ContractError(f"{where}.time: expected an RFC 3339 timestamp, got {time_text!r}") from None
        extensions: dict[str, str | int | bool] = {}
        for name, value in obj.items():
            if name in CORE_ATTRIBUTES or name in ("data", "data_base64"):
                continue
            if not _EXT_NAME.match(name):
                raise ContractError(
                    f"{where}.{name}: extension names must be 1-20 lowercase letters or digits"
                )
            if not isinstance(value, (str, int, bool)) or isinstance(value, float):
                raise ContractError(f"{where}.{name}: extension values must be string, integer or boolean")
            extensions[name] = value
        subject = obj.get("subject")
        if subject is not None and not isinstance(subject, str):
            raise ContractError(f"{where}.subject: expected a string, got {subject!r}")
        return cls(
            id=obj["id"],
            source=obj["source"],
            type=obj["type"],
            time=time,
            data=obj.get("data"),
            subject=subject,
            datacontenttype=obj.get("datacontenttype") or "application/json",
            dataschema=obj.get("dataschema"),
            extensions=extensions,
        )
