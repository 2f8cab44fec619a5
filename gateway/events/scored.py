"""The scored event: what queue consumers of the scored exchange receive.

It is a CloudEvent of type ``<original type>.scored`` whose data carries the score (a JSON number
in [0, 1]), the model's name and version, an explanation where the model gives one, and the
original event whole. It is published to the scored exchange with the *original* event type as
routing key, so consumers bind with the type patterns they care about.
"""

from __future__ import annotations

import orjson
from datetime import datetime
from typing import Any

from gateway.events.ids import uuid5
from gateway.events.model import EXT_TRACEPARENT, Event
from gateway.events.timeutil import utcnow

__all__ = ["scored_event", "scored_event_id", "SCORED_SUFFIX"]

SCORED_SUFFIX = ".scored"


def scored_event_id(event_id: str, model_name: str, model_version: str) -> str:
    """Deterministic id of the scored event for one (event, model version)."""
    return uuid5(f"scored|{event_id}|{model_name}|{model_version}")


def scored_event(
    original: Event,
    *,
    score: float,
    model_name: str,
    model_version: str,
    explanation: dict[str, Any] | None = None,
    scored_at: datetime | None = None,
    source: str = "/legacy-gateway/scorer",
    original_json: bytes | None = None,
) -> Event:
    """Build the scored CloudEvent for ``original``.

    Args:
        original: the event that was scored.
        score: the score, clamped to [0, 1].
        model_name: the model's name.
        model_version: the model's version.
        explanation: per-feature contributions, or ``None``.
        scored_at: when scoring happened (defaults to now, UTC).
        source: CloudEvents ``source`` of the scorer.
        original_json: the original event's structured JSON as received, embedded verbatim
            instead of re-encoding ``original`` (the scorer's hot path). The data then holds an
            ``orjson.Fragment``: serialize the scored event with :meth:`Event.to_json`.

    Returns:
        The scored event, carrying lineage extensions and ``traceparent`` of the original.
    """
    score = min(1.0, max(0.0, float(score)))
    ext = dict(original.extensions)
    ext["originalid"] = original.id
    if EXT_TRACEPARENT in original.extensions:
        ext[EXT_TRACEPARENT] = original.extensions[EXT_TRACEPARENT]
    return Event(
        id=scored_event_id(original.id, model_name, model_version),
        source=source,
        type=original.type + SCORED_SUFFIX,
        time=scored_at or utcnow(),
        subject=original.subject,
        data={
            "score": score,
            "model": {"name": model_name, "version": model_version},
            "explanation": explanation,
            "event": orjson.Fragment(original_json) if original_json is not None else original.to_dict(),
        },
        extensions=ext,
    )
