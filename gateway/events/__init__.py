"""The common event format: CloudEvents 1.0, deterministic ids, lineage."""

from gateway.events.ids import EVENT_NAMESPACE, event_id
from gateway.events.jsonsafe import jsonable
from gateway.events.model import (
    CONTENT_TYPE,
    EXT_ADAPTER,
    EXT_POSITION,
    EXT_SOURCE_NAME,
    EXT_TRACEPARENT,
    Event,
)
from gateway.events.timeutil import format_time, parse_time, to_utc, utcnow

__all__ = [
    "CONTENT_TYPE",
    "EVENT_NAMESPACE",
    "EXT_ADAPTER",
    "EXT_POSITION",
    "EXT_SOURCE_NAME",
    "EXT_TRACEPARENT",
    "Event",
    "event_id",
    "format_time",
    "jsonable",
    "parse_time",
    "to_utc",
    "utcnow",
]
