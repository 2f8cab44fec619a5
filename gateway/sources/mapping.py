"""Record-to-event mapping, driven by a source's ``mapping:`` block."""

from __future__ import annotations

import string
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from adapters.base import Record
from gateway.config import MappingSettings
from gateway.errors import ContractError
from gateway.events import EXT_ADAPTER, EXT_POSITION, EXT_SOURCE_NAME, Event, event_id, jsonable, to_utc, utcnow
from gateway.events.jsonsafe import dumps
from gateway.events.timeutil import parse_time
from gateway.sources.rules import apply_rules

__all__ = ["Mapper"]

_PLAIN = frozenset({str, int, bool, type(None)})
_UTC = timezone.utc


def _plain_dict(value: Any) -> bool:
    """Whether ``value`` is a ``dict`` of ``str`` keys and plain values (what ``jsonable`` returns as is)."""
    if type(value) is not dict:
        return False
    for k, v in value.items():
        if type(k) is not str or type(v) not in _PLAIN:
            return False
    return True


class Mapper:
    """Turns records of one source into CloudEvents.

    Args:
        mapping: the source's mapping settings.
        source_name: the configured source name.
        adapter_kind: the adapter's kind (lineage).
    """

    def __init__(self, mapping: MappingSettings, source_name: str, adapter_kind: str) -> None:
        self.mapping = mapping
        self.source_name = source_name
        self.adapter_kind = adapter_kind
        self.ce_source = f"/legacy-gateway/sources/{source_name}"
        self._subject_fields = (
            [f for _, f, _, _ in string.Formatter().parse(mapping.subject) if f] if mapping.subject else []
        )

    def required_fields(self) -> set[str]:
        """Record fields the mapping reads (for validation against the source's columns)."""
        m = self.mapping
        fields = set(m.key) | set(self._subject_fields) | set(m.rename)
        for name in (m.version, m.time):
            if name:
                fields.add(name)
        if m.data:
            fields |= set(m.data)
        return fields

    def _field(self, record: Mapping[str, Any], name: str) -> Any:
        if name not in record:
            raise ContractError(
                f"source {self.source_name!r}: record has no field {name!r} "
                f"(fields: {', '.join(sorted(record)) or 'none'})"
            )
        return record[name]

    def to_event(self, record: Record) -> Event:
        """Map one record.

        Raises:
            ContractError: a field the mapping needs is missing or has the wrong type.
        """
        m = self.mapping
        data_in = apply_rules(record.data, m.parse, self.source_name) if m.parse else record.data
        if len(m.key) == 1:  # the common single-column key: no list
            k = m.key[0]
            key: Any = data_in[k] if k in data_in else self._field(data_in, k)
            if key is None:
                raise ContractError(f"source {self.source_name!r}: key field(s) {m.key} contain NULL")
        else:
            key = [data_in[k] if k in data_in else self._field(data_in, k) for k in m.key]
            if any(v is None for v in key):
                raise ContractError(f"source {self.source_name!r}: key field(s) {m.key} contain NULL")
        version = self._field(data_in, m.version) if m.version else None
        time = self._time(data_in) if m.time else utcnow()
        names = m.data if m.data is not None else data_in
        rename = m.rename
        data = {}
        for n in names:
            v = data_in[n] if n in data_in else self._field(data_in, n)
            # Most legacy values are already JSON-safe; skip the converter for them (hot path).
            data[rename.get(n, n) if rename else n] = v if type(v) in _PLAIN else jsonable(v)
        if record.deleted:
            data["_deleted"] = True
        subject = None
        if m.subject:
            try:
                subject = m.subject.format_map({f: jsonable(self._field(data_in, f)) for f in self._subject_fields})
            except (ValueError, KeyError) as exc:
                raise ContractError(f"source {self.source_name!r}: subject template: {exc}") from None
        ext: dict[str, str | int | bool] = {
            EXT_SOURCE_NAME: self.source_name,
            EXT_ADAPTER: self.adapter_kind,
        }
        position = record.position
        if position is not None:
            # A flat position of plain values (the SQL adapter's) is JSON-safe as it is: no copy.
            ext[EXT_POSITION] = dumps(position if _plain_dict(position) else jsonable(position)).decode("utf-8")
        if record.lenient:
            ext["lenient"] = True
        return Event(
            id=event_id(self.source_name, m.entity, key, version),
            source=self.ce_source,
            type=m.type + ".deleted" if record.deleted else m.type,
            time=time,
            subject=subject,
            data=data,
            extensions=ext,
        )

    def _time(self, record: Mapping[str, Any]) -> datetime:
        value = self._field(record, self.mapping.time or "")
        if type(value) is datetime and value.tzinfo is _UTC:  # the adapters' values: already UTC
            return value
        if isinstance(value, datetime):
            return to_utc(value)
        if isinstance(value, str):
            try:
                return parse_time(value)
            except ValueError:
                pass
        raise ContractError(
            f"source {self.source_name!r}: time field {self.mapping.time!r} must be a datetime "
            f"or RFC 3339 text, got {type(value).__name__}"
        )
