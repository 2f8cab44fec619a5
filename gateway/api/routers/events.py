"""``/v1/events``: accept CloudEvents into the outbox; read stored events with lineage and scores.

Acceptance is the gateway's acknowledgement point: a 202 is sent only after the transaction that
stored the whole batch committed. The gateway gives every event its own deterministic id,
``event_id("rest:" + source, "client", client_id, None)``, so a client retrying the same
``(source, id)`` gets the same gateway id back (reported under ``duplicates``), while two sources
using the same client id never collide. The client's id is kept in the extension ``clientid``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from gateway.api.auth import EventsReadDep, EventsWriteDep, Principal
from gateway.api.deps import (
    BacklogDep,
    MetricsDep,
    OnAcceptDep,
    StoreDep,
    encode_cursor,
    page_cursor,
    page_limit,
)
from gateway.api.limits import MAX_BATCH_EVENTS
from gateway.api.problems import ApiProblem, contract_error_item, problem_responses
from gateway.api.schemas import (
    CLOUDEVENT_SCHEMA,
    AcceptResponse,
    EventPage,
    EventRecord,
    Rfc3339,
    record_from_stored,
)
from gateway.errors import BackpressureError, ContractError
from gateway.events import (
    EXT_ADAPTER,
    EXT_POSITION,
    EXT_SOURCE_NAME,
    EXT_TRACEPARENT,
    Event,
    event_id,
    format_time,
    utcnow,
)
from gateway.store import EventFilter, EventStore, StoredEvent

__all__ = [
    "router",
    "REST_SOURCE_NAME",
    "REST_ADAPTER",
    "EXT_CLIENT_ID",
    "ACCEPTED_CONTENT_TYPES",
    "gateway_event_id",
    "to_gateway_event",
]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/events", tags=["events"])

#: Lineage of REST events: the source name (outbox ``source_name``) and the adapter kind.
REST_SOURCE_NAME = "rest"
REST_ADAPTER = "rest-api"
#: Extension keeping the client's own event id.
EXT_CLIENT_ID = "clientid"

_SINGLE = "application/cloudevents+json"
_BATCH = "application/cloudevents-batch+json"
ACCEPTED_CONTENT_TYPES = ("application/json", _SINGLE, _BATCH)

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def _valid_traceparent(value: str) -> bool:
    if not _TRACEPARENT.match(value):
        return False
    version, trace_id, parent_id, _ = value.split("-")
    return version != "ff" and trace_id != "0" * 32 and parent_id != "0" * 16


def gateway_event_id(source: str, client_id: str) -> str:
    """The gateway id of a client event: stable per ``(source, client id)``."""
    return event_id("rest:" + source, "client", client_id, None)


def _precheck(obj: Mapping[str, Any], where: str) -> None:
    """Rules the shared model does not enforce but the CloudEvents SDK (and consumers) do."""
    if "data_base64" in obj:
        raise ContractError(f"{where}.data_base64: binary data is not supported; send JSON or text in data")
    for name in ("subject", "datacontenttype", "dataschema"):
        if name in obj and obj[name] is not None and (not isinstance(obj[name], str) or not obj[name]):
            raise ContractError(f"{where}.{name}: expected a non-empty string, got {obj[name]!r}")
    tp = obj.get(EXT_TRACEPARENT)
    if tp is not None and (not isinstance(tp, str) or not _valid_traceparent(tp)):
        raise ContractError(f"{where}.{EXT_TRACEPARENT}: expected a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)")


def to_gateway_event(obj: Any, where: str, *, now: datetime, traceparent: str | None = None) -> Event:
    """Validate one client CloudEvent and turn it into the event the gateway stores.

    Args:
        obj: the decoded JSON object.
        where: its location for error messages, e.g. ``body[3]``.
        now: acceptance time, used as ``time`` when the client sent none (it is optional in
            CloudEvents 1.0 but required by the gateway's model).
        traceparent: the request's W3C ``traceparent`` header, used when the event has none.

    Returns:
        The event with the gateway id, ``clientid`` and REST lineage extensions.

    Raises:
        ContractError: naming ``where``, the attribute and what was expected.
    """
    if isinstance(obj, Mapping):
        _precheck(obj, where)
        if obj.get("time") is None:
            obj = {**obj, "time": format_time(now)}
        # Explicit nulls mean "absent" in CloudEvents JSON.
        obj = {k: v for k, v in obj.items() if v is not None or k == "data"}
    ce = Event.from_dict(obj, where=where)
    ext: dict[str, str | int | bool] = {k: v for k, v in ce.extensions.items() if k != EXT_POSITION}
    ext[EXT_CLIENT_ID] = ce.id
    ext[EXT_SOURCE_NAME] = REST_SOURCE_NAME
    ext[EXT_ADAPTER] = REST_ADAPTER
    if EXT_TRACEPARENT not in ext and traceparent and _valid_traceparent(traceparent):
        ext[EXT_TRACEPARENT] = traceparent
    return dataclasses.replace(ce, id=gateway_event_id(ce.source, ce.id), extensions=ext)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(body: bytes) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiProblem(
            400, "invalid-json", "Malformed JSON", f"request body is not UTF-8 (byte {exc.start})",
            errors=[{"loc": ["body"], "msg": f"invalid UTF-8 at byte {exc.start}", "position": exc.start}],
        ) from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno} (char {exc.pos})"
        raise ApiProblem(
            400, "invalid-json", "Malformed JSON", f"request body is not valid JSON: {exc.msg} at {where}",
            errors=[{"loc": ["body"], "msg": f"{exc.msg} at {where}", "line": exc.lineno,
                     "column": exc.colno, "position": exc.pos}],
        ) from None
    except ValueError as exc:  # NaN / Infinity
        raise ApiProblem(400, "invalid-json", "Malformed JSON", f"request body is not valid JSON: {exc}",
                         errors=[{"loc": ["body"], "msg": str(exc)}]) from None
    except RecursionError:
        raise ApiProblem(400, "invalid-json", "Malformed JSON", "request body is nested too deeply",
                         errors=[{"loc": ["body"], "msg": "nested too deeply"}]) from None


def _prepare(body: bytes, media: str, traceparent: str | None) -> list[Event]:
    """Parse and validate a request body into gateway events (raises :class:`ApiProblem`)."""
    payload = _parse_json(body)
    if isinstance(payload, list):
        if media == _SINGLE:
            raise ApiProblem(422, "invalid-event", "Invalid CloudEvent",
                             f"{_SINGLE} carries one event object; send a batch as {_BATCH}",
                             errors=[{"loc": ["body"], "msg": "expected a JSON object, got an array"}])
        items, wheres = payload, [f"body[{i}]" for i in range(len(payload))]
    elif isinstance(payload, dict):
        if media == _BATCH:
            raise ApiProblem(422, "invalid-event", "Invalid CloudEvent", f"{_BATCH} carries a JSON array of events",
                             errors=[{"loc": ["body"], "msg": "expected a JSON array, got an object"}])
        items, wheres = [payload], ["body"]
    else:
        raise ApiProblem(422, "invalid-event", "Invalid CloudEvent",
                         "expected a CloudEvent object or an array of them",
                         errors=[{"loc": ["body"], "msg": f"expected an object or array, got {type(payload).__name__}"}])
    if len(items) > MAX_BATCH_EVENTS:
        raise ApiProblem(413, "batch-too-large", "Batch too large",
                         f"a batch holds at most {MAX_BATCH_EVENTS} events; got {len(items)}; split it",
                         errors=[{"loc": ["body"], "msg": f"at most {MAX_BATCH_EVENTS} events"}])
    now = utcnow()
    events: list[Event] = []
    errors: list[dict[str, Any]] = []
    for obj, where in zip(items, wheres, strict=True):
        try:
            events.append(to_gateway_event(obj, where, now=now, traceparent=traceparent))
        except ContractError as exc:
            errors.append(contract_error_item(exc, where, obj))
    if errors:
        shown = "; ".join(f"{_loc_text(e['loc'])}: {e['msg']}" for e in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise ApiProblem(422, "invalid-event", "Invalid CloudEvent",
                         f"{len(errors)} invalid event(s), nothing was accepted: {shown}{more}", errors=errors)
    return events


def _loc_text(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_ACCEPT_RESPONSES = problem_responses(400, 401, 403, 413, 415, 422, 429, 503)
_REQUEST_BODY = {
    "required": True,
    "description": "One structured-mode CloudEvent, or a JSON array of them (a batch).",
    "content": {
        "application/json": {"schema": {"oneOf": [CLOUDEVENT_SCHEMA, {"type": "array", "items": CLOUDEVENT_SCHEMA}]}},
        _SINGLE: {"schema": CLOUDEVENT_SCHEMA},
        _BATCH: {"schema": {"type": "array", "items": CLOUDEVENT_SCHEMA, "maxItems": MAX_BATCH_EVENTS}},
    },
}


@router.post(
    "",
    status_code=202,
    response_model=AcceptResponse,
    responses=_ACCEPT_RESPONSES,
    summary="Accept CloudEvents into the outbox",
    openapi_extra={"requestBody": _REQUEST_BODY},
)
async def accept_events(
    request: Request,
    principal: EventsWriteDep,
    store: StoreDep,
    guard: BacklogDep,
    metrics: MetricsDep,
    on_accept: OnAcceptDep,
) -> JSONResponse:
    """Accept one CloudEvent or a batch, all in one transaction.

    Answers 202 once the events are committed, 400 for malformed JSON, 413 for a body or batch
    too large, 415 for another content type, 422 naming each invalid attribute, and 503 with
    ``Retry-After`` when the outbox backlog is above the threshold or the store is unavailable
    (nothing was accepted then). Needs ``events:write``; a key limited to sources other than
    ``rest`` (the REST source) gets 403.
    """
    if not principal.allows_source(REST_SOURCE_NAME):
        metrics.requests_rejected.labels("forbidden-source").inc()
        raise ApiProblem(
            403, "forbidden-source", "Forbidden",
            f"API key {principal.key_id} may not ingest into source {REST_SOURCE_NAME!r} "
            f"(it is limited to {', '.join(sorted(principal.sources or ()))})",
        )
    media = _media_type(request)
    if media not in ACCEPTED_CONTENT_TYPES:
        metrics.requests_rejected.labels("unsupported-media-type").inc()
        raise ApiProblem(
            415, "unsupported-media-type", "Unsupported Media Type",
            f"send structured-mode JSON as one of {', '.join(ACCEPTED_CONTENT_TYPES)}; got {media or 'no content type'!r}",
        )
    try:
        await run_in_threadpool(guard.check, store)
    except BackpressureError:
        metrics.requests_rejected.labels("backpressure").inc()
        raise
    except Exception:
        metrics.requests_rejected.labels("store-unavailable").inc()
        raise
    started = time.perf_counter()
    body = await request.body()
    try:
        # Parsing and validating up to max_body_bytes of JSON is CPU work: keep it off the loop.
        events = await run_in_threadpool(_prepare, body, media, request.headers.get("traceparent"))
    except ApiProblem as problem:
        metrics.requests_rejected.labels(problem.type.rsplit(":", 1)[-1]).inc()
        raise

    ids = [ev.id for ev in events]
    discarded: list[str] = []
    if events:
        governance = request.app.state.governance
        try:
            result, outcome = await run_in_threadpool(_govern_and_accept, governance, store, events)
        except Exception:
            metrics.requests_rejected.labels("store-unavailable").inc()
            raise
        if result is None:  # a contract refused some events: a REST client can fix its request
            metrics.requests_rejected.labels("contract-violation").inc()
            errors = [
                {"loc": ["body", ids.index(eid)], "msg": str(v), "type": "contract"}
                for eid, violations in outcome.rejected_ids.items() for v in violations
            ]
            raise ApiProblem(
                422, "contract-violation", "Event violates its contract",
                f"{len(outcome.rejected_ids)} event(s) violate their contract, nothing was accepted: "
                + "; ".join(e["msg"] for e in errors[:5]),
                errors=errors,
            )
        # Report in request order, each id once (a batch may repeat an event).
        inserted = set(result.inserted)
        kept = {ev.id for ev in outcome.accepted} if outcome is not None else set(ids)
        unique = list(dict.fromkeys(ids))
        accepted = [i for i in unique if i in inserted]
        duplicates = [i for i in unique if i not in inserted and i in kept]
        discarded = [i for i in unique if i not in kept]
    else:
        accepted, duplicates = [], []
    metrics.events_accepted.inc(len(accepted))
    metrics.events_duplicate.inc(len(duplicates))
    metrics.ingest_seconds.observe(time.perf_counter() - started)
    if accepted and on_accept is not None:
        try:
            on_accept()
        except Exception:  # the events are committed; a failed wake-up only delays the relay
            log.exception("on_accept callback failed")
    answer = AcceptResponse(accepted=accepted, duplicates=duplicates, ids=ids, discarded=discarded)
    return JSONResponse(answer.model_dump(), status_code=202)


def _govern_and_accept(governance: Any, store: Any, events: list[Event]) -> tuple[Any, Any]:
    """PII policies and contracts (docs/governance.md), then the one accept transaction.

    Returns ``(AcceptResult, ContractOutcome)``; ``(None, outcome)`` when a contract rejected an
    event (all or nothing, as every REST batch); ``outcome`` is None without governance.
    """
    if not governance.active:
        return store.accept(events, source_name=REST_SOURCE_NAME), None
    outcome = governance.prepare(events, REST_SOURCE_NAME)
    if outcome.rejected_ids:
        return None, outcome
    if outcome.updates or outcome.extra_events:
        store.save_contract_updates(outcome.updates, outcome.extra_events)
    return store.accept(outcome.accepted, source_name=REST_SOURCE_NAME), outcome


@router.get(
    "/{event_id}",
    response_model=EventRecord,
    responses=problem_responses(401, 403, 404, 429, 503),
    summary="One event with lineage, delivery state and scores",
)
def get_event(
    event_id: Annotated[str, Path(description="The gateway event id.")],
    principal: EventsReadDep,
    store: StoreDep,
) -> EventRecord:
    """Return the stored CloudEvent, its lineage, delivery status and scores; 404 if unknown or
    from a source the key may not read (the same answer: it does not reveal that the event exists)."""
    stored = store.get_event(event_id)
    if stored is None or not principal.allows_source(stored.source_name):
        shown = event_id if len(event_id) <= 80 else event_id[:80] + "..."
        raise HTTPException(404, f"no event with id {shown!r}")
    return record_from_stored(stored)


@router.get(
    "",
    response_model=EventPage,
    responses=problem_responses(401, 403, 422, 429, 503),
    summary="List events (filters, cursor pagination)",
)
def list_events(
    principal: EventsReadDep,
    store: StoreDep,
    limit: Annotated[int, Depends(page_limit)],
    after_seq: Annotated[int | None, Depends(page_cursor)],
    source: Annotated[str | None, Query(description="Gateway source name (e.g. 'rest', 'legacy-orders').")] = None,
    event_type: Annotated[str | None, Query(alias="type", description="CloudEvents type.")] = None,
    time_from: Annotated[Rfc3339 | None, Query(description="Event time >= this (RFC 3339).")] = None,
    time_to: Annotated[Rfc3339 | None, Query(description="Event time < this (RFC 3339).")] = None,
    min_score: Annotated[float | None, Query(ge=0, le=1, description="Only events with a score >= this.")] = None,
    max_score: Annotated[float | None, Query(ge=0, le=1, description="Only events with a score <= this.")] = None,
    model: Annotated[str | None, Query(max_length=128, description="Only events scored by this model (name); "
                                       "min_score/max_score then apply to its score.")] = None,
    subject: Annotated[str | None, Query(max_length=512, description="CloudEvents subject, exact.")] = None,
    status: Annotated[Literal["pending", "published"] | None, Query(description="Delivery status.")] = None,
) -> EventPage:
    """List events in acceptance order; pass ``next_cursor`` back as ``cursor`` for the next page.

    A key limited to some sources sees only their events (a ``source`` outside them: an empty page).
    """
    if time_from is not None and time_to is not None and time_from > time_to:
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("query", "time_from"), "msg": "time_from must not be after time_to",
              "input": None}]
        )
    if min_score is not None and max_score is not None and min_score > max_score:
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("query", "min_score"), "msg": "min_score must not be above max_score",
              "input": min_score}]
        )
    flt = EventFilter(
        source_name=source, type=event_type, time_from=time_from, time_to=time_to, min_score=min_score, status=status,
        subject=subject, max_score=max_score, model=model,
    )
    rows = _visible_events(store, principal, flt, limit=limit + 1, after_seq=after_seq)
    more = len(rows) > limit
    rows = rows[:limit]
    return EventPage(
        items=[record_from_stored(r) for r in rows],
        next_cursor=encode_cursor(rows[-1].seq) if more and rows else None,
    )


def _visible_events(
    store: EventStore, principal: Principal, flt: EventFilter, *, limit: int, after_seq: int | None
) -> list[StoredEvent]:
    """``store.list_events`` limited to the sources ``principal`` may read (one query)."""
    if not principal.restricted:
        return store.list_events(flt, limit=limit, after_seq=after_seq)
    if flt.source_name is not None and not principal.allows_source(flt.source_name):
        return []
    allowed = tuple(sorted(principal.sources or ()))
    return store.list_events(dataclasses.replace(flt, sources=allowed), limit=limit, after_seq=after_seq)
