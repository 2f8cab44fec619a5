"""Response models and OpenAPI schemas of the REST API.

Request bodies of ``POST /v1/events`` are not parsed by pydantic: CloudEvents allow arbitrary
extension attributes, so each object is validated by :meth:`gateway.events.Event.from_dict`, which
names the bad attribute. :data:`CLOUDEVENT_SCHEMA` documents the shape in OpenAPI only.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

from gateway.events import EXT_ADAPTER, EXT_POSITION, format_time, parse_time
from gateway.store import StoredEvent

__all__ = [
    "UtcTime",
    "Rfc3339",
    "AcceptResponse",
    "ModelRef",
    "ScoreOut",
    "Lineage",
    "DeliveryOut",
    "EventRecord",
    "EventPage",
    "CheckResult",
    "SourceBreaker",
    "SourceReadiness",
    "BreakerReadiness",
    "Readiness",
    "Liveness",
    "ProblemError",
    "Problem",
    "CLOUDEVENT_SCHEMA",
    "record_from_stored",
    "DeadLetterState",
    "DeadLetterSummary",
    "DeadLetterRecord",
    "DeadLetterPage",
    "DeadLetterFilterIn",
    "DeadLetterReplayRequest",
    "DeadLetterReplayItem",
    "DeadLetterReplayResponse",
    "DeadLetterDeleteRequest",
    "DeadLetterDeleteResponse",
    "ApiKeyOut",
    "ApiKeyCreated",
    "ApiKeyList",
    "ApiKeyCreateRequest",
    "AuditEntryOut",
    "AuditPage",
    "SourceRunnerOut",
    "SourceOut",
    "SourceList",
    "SourceActionResponse",
    "SourceCursorOut",
    "SourceCursorSetRequest",
    "SourceCursorMove",
]

#: An aware UTC datetime rendered as RFC 3339 with microseconds and ``Z``.
UtcTime = Annotated[datetime, PlainSerializer(format_time, return_type=str, when_used="json")]


_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")
_RFC3339_MSG = "expected an RFC 3339 timestamp with a time zone, e.g. 2024-05-01T12:00:00Z"


def _rfc3339(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not _RFC3339.match(text):
        raise ValueError(_RFC3339_MSG)
    frac = re.search(r"\.(\d+)", text)
    if frac and len(frac.group(1)) > 6:  # Python keeps microseconds; drop finer digits
        text = text.replace(frac.group(0), "." + frac.group(1)[:6], 1)
    try:
        return parse_time(text)
    except ValueError:
        raise ValueError(_RFC3339_MSG) from None


#: Query parameter type: an RFC 3339 timestamp with an explicit offset, parsed to aware UTC.
Rfc3339 = Annotated[datetime, BeforeValidator(_rfc3339)]


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AcceptResponse(_Out):
    """Answer of ``POST /v1/events`` (202)."""

    accepted: list[str] = Field(description="Gateway ids newly stored by this request.")
    duplicates: list[str] = Field(description="Gateway ids that were stored already (idempotent retry).")
    ids: list[str] = Field(description="The gateway id of every event, in request order.")
    discarded: list[str] = Field(
        default_factory=list,
        description="Gateway ids a contract in mode discard dropped (not stored; see docs/governance.md).",
    )


class ModelRef(_Out):
    """The model that produced a score."""

    name: str
    version: str


class ScoreOut(_Out):
    """One model's score of an event."""

    score: float = Field(ge=0, le=1)
    model: ModelRef
    explanation: dict[str, Any] | None = None
    scored_at: UtcTime


class Lineage(_Out):
    """Where the event came from (from its extension attributes)."""

    source_name: str = Field(description="Configured gateway source ('rest' for the REST API).")
    position: Any = Field(None, description="Where in the source the record was read (JSON), if known.")
    adapter: str | None = Field(None, description="The adapter kind that read it.")


class DeliveryOut(_Out):
    """Outbox delivery state."""

    status: str = Field(description="pending or published.")
    attempts: int = Field(description="Failed publish attempts so far.")
    accepted_at: UtcTime
    published_at: UtcTime | None = None


class EventRecord(_Out):
    """A stored event with lineage, delivery state and scores."""

    id: str
    event: dict[str, Any] = Field(description="The structured-mode CloudEvent.")
    lineage: Lineage
    delivery: DeliveryOut
    scores: list[ScoreOut]


class EventPage(_Out):
    """One page of ``GET /v1/events``."""

    items: list[EventRecord]
    next_cursor: str | None = Field(description="Pass as ``cursor`` for the next page; null on the last page.")


class CheckResult(_Out):
    """One readiness check."""

    ok: bool
    detail: str


class SourceBreaker(_Out):
    """A source's circuit breaker, as its runner last wrote it."""

    name: str | None = Field(None, description="Breaker name; sources behind one endpoint share one.")
    state: str = Field(description="closed | open | half_open")
    failure_rate: float | None = Field(None, description="Percent of failed polls in the breaker's window.")
    retry_after: float | None = Field(
        None, description="Seconds until trial polls, as of updated_at (0 unless open)."
    )


class SourceReadiness(_Out):
    """One source's status in ``GET /readyz``: detail only, never a reason to be unready."""

    state: str = Field(
        description="idle | polling | backoff | paused | backpressure | paused-by-operator | failed | drift-stopped | "
        "fenced | stopped; unknown when no runner reported yet"
    )
    desired_state: str = Field("running", description="running | paused (gateway sources pause/resume).")
    breaker: SourceBreaker | None = None
    last_error: str | None = Field(None, description="The runner's last error (shortened, URLs redacted).")
    updated_at: UtcTime | None = Field(None, description="When the runner last wrote its status.")
    drift: bool = Field(False, description="The source's schema fingerprint differs from the accepted baseline.")


class BreakerReadiness(_Out):
    """A circuit breaker of the answering process in ``GET /readyz``: detail only."""

    name: str = Field(description="Breaker name (the downstream: source:<name>, soap:<address>, ...).")
    state: str = Field(description="closed | open | half_open")
    failure_rate: float = Field(description="Percent of failed calls in the breaker's current window.")
    retry_after: float = Field(description="Seconds until trial calls are let through (0 unless open).")


class Readiness(_Out):
    """Answer of ``GET /readyz`` when ready."""

    status: Literal["ready", "unavailable"]
    checks: dict[str, CheckResult]
    sources: dict[str, SourceReadiness] = Field(
        default_factory=dict,
        description="Per source (configured or known to the store), what its runner last wrote to the store. "
        "Detail only: a failed or paused source does not make the gateway unready.",
    )
    breakers: dict[str, BreakerReadiness] = Field(
        default_factory=dict,
        description="Every circuit breaker of the answering process, live. Detail only: an open breaker does "
        "not make the gateway unready.",
    )


class Liveness(_Out):
    """Answer of ``GET /healthz``."""

    status: Literal["ok"] = "ok"


class ProblemError(BaseModel):
    """One validation error inside a problem."""

    loc: list[str | int]
    msg: str


class Problem(BaseModel):
    """RFC 9457 problem details (``application/problem+json``)."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    instance: str
    errors: list[ProblemError] | None = None


#: JSON schema of one structured-mode CloudEvent (documentation; validation is Event.from_dict).
CLOUDEVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "CloudEvent",
    "required": ["specversion", "id", "source", "type"],
    "properties": {
        "specversion": {"type": "string", "enum": ["1.0"]},
        "id": {"type": "string", "minLength": 1, "description": "Client id; kept as extension 'clientid'."},
        "source": {"type": "string", "minLength": 1, "format": "uri-reference"},
        "type": {"type": "string", "minLength": 1},
        "time": {"type": "string", "format": "date-time", "description": "Defaults to the acceptance time."},
        "subject": {"type": "string", "minLength": 1},
        "datacontenttype": {"type": "string", "minLength": 1},
        "dataschema": {"type": "string", "minLength": 1},
        "traceparent": {"type": "string", "description": "W3C trace context."},
        "data": {},
    },
    "additionalProperties": {
        "description": "Extension attributes: names of 1-20 lowercase letters or digits; string, integer or boolean.",
        "type": ["string", "integer", "boolean"],
    },
}


def _position(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def record_from_stored(stored: StoredEvent) -> EventRecord:
    """Build the API view of a stored event."""
    ev = stored.event
    adapter = ev.get(EXT_ADAPTER)
    return EventRecord(
        id=str(ev.get("id")),
        event=ev,
        lineage=Lineage(
            source_name=stored.source_name,
            position=_position(ev.get(EXT_POSITION)),
            adapter=str(adapter) if adapter is not None else None,
        ),
        delivery=DeliveryOut(
            status=stored.status,
            attempts=stored.attempts,
            accepted_at=stored.accepted_at,
            published_at=stored.published_at,
        ),
        scores=[
            ScoreOut(
                score=float(s["score"]),
                model=ModelRef(name=s["model"]["name"], version=s["model"]["version"]),
                explanation=s.get("explanation"),
                scored_at=s["scored_at"],
            )
            for s in stored.scores
        ],
    )


# ---------------------------------------------------------------------------- dead letters
#: ``open`` (not replayed yet) or ``replayed``.
DeadLetterState = Literal["open", "replayed"]


class _In(BaseModel):
    """Request bodies: unknown members are errors (SEC-04), server-owned fields are absent."""

    model_config = ConfigDict(extra="forbid")


class DeadLetterSummary(_Out):
    """A dead letter in ``GET /v1/dead-letters`` (without payload and headers)."""

    id: int
    stage: str = Field(description="source | scoring | bridge | broker (| relay | ingest).")
    source_name: str | None = Field(None, description="The gateway source, if known.")
    event_id: str | None = Field(None, description="The event's id, if known (broker: the AMQP message_id).")
    error_class: str = Field(description="The error's class, or the broker's x-death reason (delivery_limit...).")
    reason: str
    attempts: int = Field(description="Deliveries, reads or scoring attempts so far.")
    created_at: UtcTime
    state: DeadLetterState
    replayed_at: UtcTime | None = Field(None, description="Last successful replay; null while open.")
    replay_count: int = Field(description="Replay attempts, successful or not.")
    last_replay_outcome: str | None = Field(None, description="requeued | accepted | failed.")


class DeadLetterRecord(DeadLetterSummary):
    """Everything about one dead letter."""

    payload: str | None = Field(None, description="The record or message body as stored (text; base64 when "
                                "headers.payload_encoding is base64).")
    headers: dict[str, Any] | None = Field(None, description="Message headers (x-death for broker dead letters).")
    position: Any = Field(None, description="Where the item sat in its source: record position or failing cursor.")
    last_replay_at: UtcTime | None = None
    last_replay_detail: str | None = Field(None, description="Event ids replayed, or why the last replay failed.")


class DeadLetterPage(_Out):
    """One page of ``GET /v1/dead-letters``."""

    items: list[DeadLetterSummary]
    next_cursor: str | None = Field(description="Pass as ``cursor`` for the next page; null on the last page.")


class DeadLetterFilterIn(_In):
    """Selects dead letters like ``GET /v1/dead-letters``; every member is optional."""

    stage: str | None = Field(None, max_length=32)
    source: str | None = Field(None, max_length=128, description="Gateway source name.")
    error_class: str | None = Field(None, max_length=255)
    state: Literal["open", "replayed", "all"] | None = Field(
        None, description="Default: open for a replay (all with again=true), all for a delete."
    )


class DeadLetterReplayRequest(_In):
    """Body of ``POST /v1/dead-letters/replay``: ``ids`` or ``filter`` (exactly one)."""

    ids: list[int] | None = Field(None, min_length=1, max_length=1000, description="Dead letter ids.")
    filter: DeadLetterFilterIn | None = Field(None, description="Select by filter instead (oldest first).")
    limit: int = Field(100, ge=1, le=1000, description="Most dead letters the filter selects.")
    rate: float = Field(50.0, gt=0, le=1000, description="Most dead letters replayed per second.")
    again: bool = Field(False, description="Also replay dead letters that were replayed already.")
    dry_run: bool = Field(False, description="Only report what would happen.")


class DeadLetterReplayItem(_Out):
    """The outcome of one dead letter."""

    id: int
    stage: str
    outcome: Literal["requeued", "accepted", "skipped", "failed"] = Field(
        description="requeued: its event (in the outbox) is published again; accepted: its event is new in the "
        "outbox; skipped: replayed already; failed: see detail."
    )
    event_ids: list[str]
    detail: str


class DeadLetterReplayResponse(_Out):
    """Answer of ``POST /v1/dead-letters/replay``; with ``dry_run`` what *would* happen."""

    dry_run: bool
    replayed: int = Field(description="requeued + accepted.")
    requeued: int
    accepted: int
    skipped: int
    failed: int = Field(description="Failed items plus ids that do not exist.")
    not_found: list[int]
    items: list[DeadLetterReplayItem]


class DeadLetterDeleteRequest(_In):
    """Body of ``POST /v1/dead-letters/delete``: ``ids`` or ``filter``, and ``confirm``."""

    ids: list[int] | None = Field(None, min_length=1, max_length=10000, description="Dead letter ids.")
    filter: DeadLetterFilterIn | None = Field(None, description="Select by filter instead.")
    confirm: int = Field(ge=0, description="The number of dead letters you expect to delete; when the selection "
                         "holds another number nothing is deleted (409, with the count).")


class DeadLetterDeleteResponse(_Out):
    """Answer of the delete endpoints."""

    deleted: int
    ids: list[int]


# ---------------------------------------------------------------------------- keys and audit
class ApiKeyOut(_Out):
    """An API key as listed: never its token or digest."""

    id: str = Field(description="Public key id (the token's second part).")
    name: str
    scopes: list[str] = Field(description="events:write | events:read | sources:admin | admin (admin implies all).")
    sources: list[str] | None = Field(None, description="Gateway sources the key may touch; null: every source.")
    created_at: UtcTime
    revoked_at: UtcTime | None = None
    last_used_at: UtcTime | None = Field(None, description="Last use (at most a minute stale per API process).")


class ApiKeyCreated(ApiKeyOut):
    """Answer of ``POST /v1/keys``: the key and its token, shown this once."""

    token: str = Field(description="The bearer token. It is not stored and cannot be shown again.")


class ApiKeyList(_Out):
    """Answer of ``GET /v1/keys``."""

    items: list[ApiKeyOut]


class ApiKeyCreateRequest(_In):
    """Body of ``POST /v1/keys``."""

    name: str = Field(min_length=1, max_length=128, description="What the key is for.")
    scopes: list[str] = Field(min_length=1, max_length=4, description="Some of events:write, events:read, "
                              "sources:admin, admin.")
    sources: list[str] | None = Field(None, min_length=1, max_length=100, description="Limit the key to these "
                                      "gateway sources (not with admin); omit for every source.")


class AuditEntryOut(_Out):
    """One audit log row."""

    id: int
    at: UtcTime
    actor_id: str | None = Field(None, description="The API key id; null for the CLI or with api.auth off.")
    actor_name: str = Field(description="The key's name, cli:<os user>, or anonymous.")
    action: str = Field(description="key.create | key.revoke | dead_letters.replay | dead_letters.delete | "
                        "source.cursor.set | source.cursor.reset")
    target: str | None = None
    details: dict[str, Any] | None = None


class AuditPage(_Out):
    """One page of ``GET /v1/audit``."""

    items: list[AuditEntryOut]
    next_cursor: str | None = Field(description="Pass as ``cursor`` for the next page; null on the last page.")


# ---------------------------------------------------------------------------- sources
class SourceRunnerOut(_Out):
    """One runner of a source (the lease holder or a standby replica), from its heartbeat."""

    owner: str = Field(description="hostname:pid:runner-id")
    state: str = Field(description="The runner's state (standby while another holds the lease).")
    epoch: int | None = Field(description="The fencing epoch it holds; null while standby.")
    updated_at: UtcTime = Field(description="Its last heartbeat.")
    live: bool = Field(description="Whether the heartbeat is recent (within max(3 status_interval, lease_ttl)).")


class SourceOut(_Out):
    """A configured source with its status (``GET /v1/sources``; the same as `gateway sources list --json`)."""

    name: str
    adapter: str = Field(description="Adapter kind: sql, soap, amqp, ...")
    enabled: bool
    state: str | None = Field(
        default=None,
        description="What the source's lease holder last reported (idle, polling, backoff, paused, backpressure, "
        "paused-by-operator, failed, drift-stopped, standby, stopped); null before any runner reported.",
    )
    desired_state: Literal["running", "paused"] = Field(default="running", description="The operators' wish.")
    desired_generation: int = Field(default=0, description="Bumped by every pause/resume.")
    desired_at: UtcTime | None = Field(default=None, description="Time of the last pause/resume.")
    owner: str | None = Field(default=None, description="The runner that reported the state.")
    epoch: int | None = Field(default=None, description="Its fencing epoch.")
    last_poll_at: UtcTime | None = Field(default=None, description="End of the last successful poll.")
    last_error: str | None = Field(default=None, description="The last error; null once polling succeeds again.")
    polls: int = Field(default=0, description="Successful polls since the reporting runner started.")
    events_accepted: int = Field(default=0, description="Events newly stored since the reporting runner started.")
    duplicates: int = Field(default=0, description="Events that were stored already (re-reads).")
    rejected: int = Field(default=0, description="Records dead-lettered by the mapping.")
    breaker: dict[str, Any] | None = Field(default=None, description="Circuit breaker: name, state, failure_rate, retry_after.")
    fingerprint: str | None = Field(default=None, description="Drift baseline digest.")
    fingerprint_parts: dict[str, str] | None = None
    fingerprint_at: UtcTime | None = None
    drift: dict[str, Any] | None = Field(default=None, description="Current schema drift against the baseline.")
    drift_detected: bool = False
    updated_at: UtcTime | None = Field(default=None, description="The runner's last status write.")
    cursor: Any = Field(default=None, description="The committed cursor (adapter-specific JSON); null: never committed.")
    cursor_time: UtcTime | None = Field(default=None, description="The time the cursor stands at, when it has one (SQL: ts).")
    lag_seconds: float | None = Field(default=None, description="Now minus cursor_time; null when the cursor has no time.")
    events_total: int = Field(default=0, description="Events committed with the cursor, in total.")
    cursor_updated_at: UtcTime | None = Field(default=None, description="The last cursor commit.")
    cursor_epoch: int | None = Field(default=None, description="The cursor's fencing epoch.")
    lease: Literal["live", "expired", "free", "-"] = Field(description="The source's lease; '-': the source never ran.")
    lease_owner: str | None = Field(default=None, description="The lease holder (hostname:pid:runner-id).")
    lease_until: UtcTime | None = None
    run_requested_at: UtcTime | None = Field(default=None, description="The last run-now request.")
    runners: list[SourceRunnerOut] = Field(default_factory=list)


class SourceList(_Out):
    """``GET /v1/sources``: the configured sources the key may see, in configuration order."""

    items: list[SourceOut]


class SourceActionResponse(_Out):
    """Answer of pause, resume and run (202: the runner acts on it within its status_interval)."""

    source: str
    action: Literal["pause", "resume", "run"]
    detail: str = Field(description="What happens next, in one sentence.")
    status: SourceOut


class SourceCursorOut(_Out):
    """``GET /v1/sources/{name}/cursor``: the committed cursor, epoch and lease."""

    source: str
    cursor: Any = Field(description="The committed cursor; null when none is committed (the adapter's initial cursor is used).")
    committed: bool = Field(description="Whether a cursor was ever committed.")
    committed_at: UtcTime | None = None
    events_total: int = 0
    epoch: int | None = Field(default=None, description="Fencing epoch; null when the source never ran.")
    lease: Literal["live", "expired", "free", "-"]
    lease_owner: str | None = None
    lease_until: UtcTime | None = None


class SourceCursorSetRequest(_In):
    """``PUT /v1/sources/{name}/cursor``: where to move the cursor; a preview unless ``dry_run`` is false."""

    cursor: Any = Field(description="The new cursor, in the adapter's format (SQL: {\"ts\": ..., \"key\": ...}).")
    dry_run: bool = Field(default=True, description="Only preview the move (default); false applies it.")


class SourceCursorMove(_Out):
    """A cursor move's preview (``dry_run``), or the applied move."""

    source: str
    dry_run: bool
    reset: bool = Field(description="The move goes back to the adapter's initial cursor.")
    before: Any = Field(description="The committed cursor (the adapter's initial one when none is committed).")
    after: Any = Field(description="The cursor after the move.")
    epoch: int = Field(description="The committed fencing epoch before the move (0: the source never ran).")
    new_epoch: int | None = Field(default=None, description="The epoch after an applied move; null for a preview.")
    rows_read_again: int | None = Field(description="Rows the source would read again; null when unknown.")
    rows_skipped: int | None = Field(description="Rows the source would never read; null when unknown.")
    unknown_reason: str | None = Field(default=None, description="Why a count is unknown.")
