"""``/v1/dead-letters``: inspect, replay and delete what the gateway parked.

Every route lives on :data:`router`, which requires the ``admin`` scope for all of them; replays
and deletes are written to the audit log. Replays go through the store
(:mod:`gateway.deadletters`): they are durable, idempotent and paced, whichever process runs the
relay. A request replays at most :data:`~gateway.deadletters.REPLAY_MAX_ROWS` dead letters and
blocks while it paces them, so a request that would take longer than
:data:`MAX_REPLAY_SECONDS` at the asked rate is refused.
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response
from fastapi.exceptions import RequestValidationError

from gateway.api.auth import AdminDep, require_scope
from gateway.api.deps import (
    OnAcceptDep,
    SettingsDep,
    StoreDep,
    encode_cursor,
    page_cursor,
    page_limit,
)
from gateway.api.problems import ApiProblem, problem_responses
from gateway.api.schemas import (
    DeadLetterDeleteRequest,
    DeadLetterDeleteResponse,
    DeadLetterFilterIn,
    DeadLetterPage,
    DeadLetterRecord,
    DeadLetterReplayRequest,
    DeadLetterReplayResponse,
    DeadLetterSummary,
)
from gateway.deadletters import (
    REPLAY_MAX_ROWS,
    DeadLetterReplayer,
    DeadLetterSelection,
    dead_letter_position,
)
from gateway.store import DeadLetter, EventStore

__all__ = ["MAX_DELETE_ROWS", "MAX_REPLAY_SECONDS", "router"]

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/dead-letters",
    tags=["dead-letters"],
    dependencies=[Depends(require_scope("admin"))],
    responses=problem_responses(401, 403, 429),
)

#: A replay request must finish within this many seconds at its rate (it blocks while pacing).
MAX_REPLAY_SECONDS = 300.0
#: Most dead letters one delete request may select.
MAX_DELETE_ROWS = 10_000


def _summary_fields(d: DeadLetter) -> dict[str, object]:
    return {
        "id": d.id, "stage": d.stage, "source_name": d.source_name, "event_id": d.event_id,
        "error_class": d.error_class, "reason": d.reason, "attempts": d.attempts, "created_at": d.created_at,
        "state": d.state, "replayed_at": d.replayed_at, "replay_count": d.replay_count,
        "last_replay_outcome": d.last_replay_outcome,
    }


def _invalid(loc: tuple[str, ...], msg: str) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": loc, "msg": msg, "input": None}])


def _one_of(ids: object, flt: object) -> None:
    if (ids is None) == (flt is None):
        raise _invalid(("body",), "send either ids or filter (exactly one)")


@router.get(
    "",
    response_model=DeadLetterPage,
    responses=problem_responses(422, 503),
    summary="List dead letters (filters, cursor pagination)",
)
def list_dead_letters(
    store: StoreDep,
    limit: Annotated[int, Depends(page_limit)],
    after_id: Annotated[int | None, Depends(page_cursor)],
    stage: Annotated[str | None, Query(max_length=32, description="source | scoring | bridge | broker.")] = None,
    source: Annotated[str | None, Query(max_length=128, description="Gateway source name.")] = None,
    error_class: Annotated[str | None, Query(max_length=255, description="e.g. ContractError, delivery_limit.")] = None,
    state: Annotated[Literal["open", "replayed", "all"], Query(description="open: not replayed yet.")] = "all",
) -> DeadLetterPage:
    """List dead letters, oldest first; pass ``next_cursor`` back as ``cursor`` for the next page."""
    rows = store.list_dead_letters(
        stage=stage, source_name=source, error_class=error_class, state=state, after_id=after_id, limit=limit + 1
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return DeadLetterPage(
        items=[DeadLetterSummary.model_validate(_summary_fields(d)) for d in rows],
        next_cursor=encode_cursor(rows[-1].id) if more and rows else None,
    )


def _found(store: EventStore, dead_letter_id: int) -> DeadLetter:
    d = store.get_dead_letter(dead_letter_id)
    if d is None:
        raise HTTPException(404, f"no dead letter with id {dead_letter_id}")
    return d


DeadLetterId = Annotated[int, Path(ge=1, le=2**63 - 1, description="The dead letter's id.")]


@router.get(
    "/{dead_letter_id}",
    response_model=DeadLetterRecord,
    responses=problem_responses(404, 422, 503),
    summary="One dead letter: payload, headers, error, attempts, position and replay state",
)
def get_dead_letter(dead_letter_id: DeadLetterId, store: StoreDep) -> DeadLetterRecord:
    """Return everything stored about one dead letter; 404 if unknown."""
    d = _found(store, dead_letter_id)
    return DeadLetterRecord.model_validate({
        **_summary_fields(d), "payload": d.payload, "headers": d.headers, "position": dead_letter_position(d),
        "last_replay_at": d.last_replay_at, "last_replay_detail": d.last_replay_detail,
    })


@router.post(
    "/replay",
    response_model=DeadLetterReplayResponse,
    responses=problem_responses(400, 422, 503),
    summary="Replay dead letters through the outbox (idempotent, rate-limited)",
)
def replay_dead_letters(
    body: DeadLetterReplayRequest, store: StoreDep, settings: SettingsDep, on_accept: OnAcceptDep, principal: AdminDep
) -> DeadLetterReplayResponse:
    """Replay dead letters by ``ids`` or by ``filter`` (at most 1000 per request).

    An event already in the outbox is set back to pending and published again by the relay; a
    CloudEvent payload is accepted into the outbox (idempotent on its id); a source record is
    mapped again with the source's current mapping. Event ids are deterministic, so a replay never
    creates a second outbox row or score. Dead letters replayed already are skipped unless
    ``again``. The request paces the replay at ``rate`` per second and answers when done; a
    selection that would take longer than 300 s at that rate gets a 422. Each item says what
    happened or why it cannot be replayed.
    """
    _one_of(body.ids, body.filter)
    flt = body.filter or DeadLetterFilterIn()
    selection = DeadLetterSelection(
        ids=tuple(body.ids or ()), stage=flt.stage, source_name=flt.source, error_class=flt.error_class,
        state=flt.state, limit=min(body.limit, REPLAY_MAX_ROWS),
    )
    replayer = DeadLetterReplayer(store, settings.sources, rate=body.rate, on_replayed=on_accept)
    rows, missing = replayer.select(selection, again=body.again)
    work = sum(1 for d in rows if body.again or d.replayed_at is None)
    if not body.dry_run and work / body.rate > MAX_REPLAY_SECONDS:
        raise ApiProblem(
            422, "replay-too-slow", "Replay would take too long",
            f"{work} dead letter(s) at {body.rate:g} per second take {work / body.rate:.0f} s, more than "
            f"{MAX_REPLAY_SECONDS:.0f} s per request: raise rate or lower limit",
            errors=[{"loc": ["body", "rate"], "msg": f"at least {work / MAX_REPLAY_SECONDS:g} for this selection"}],
        )
    report = replayer.replay_rows(rows, again=body.again, dry_run=body.dry_run, not_found=missing)
    if not body.dry_run:
        replayed = [i.id for i in report.items if i.outcome in ("requeued", "accepted")]
        failed = [i.id for i in report.items if i.outcome == "failed"]
        if replayed or failed:
            store.record_audit(principal.actor, "dead_letters.replay", f"dead-letters:{len(replayed)}",
                               {"replayed": replayed, "failed": failed, "again": body.again})
    return DeadLetterReplayResponse.model_validate(report.to_dict())


@router.delete(
    "/{dead_letter_id}",
    status_code=204,
    response_class=Response,
    responses=problem_responses(404, 422, 503),
    summary="Delete one dead letter",
)
def delete_dead_letter(dead_letter_id: DeadLetterId, store: StoreDep, principal: AdminDep) -> Response:
    """Delete one dead letter (after inspecting or replaying it); 404 if unknown."""
    if not store.delete_dead_letters([dead_letter_id]):
        raise HTTPException(404, f"no dead letter with id {dead_letter_id}")
    log.warning("dead letter deleted through the API: %d", dead_letter_id)
    store.record_audit(principal.actor, "dead_letters.delete", f"dead-letter:{dead_letter_id}",
                       {"ids": [dead_letter_id]})
    return Response(status_code=204)


@router.post(
    "/delete",
    response_model=DeadLetterDeleteResponse,
    responses=problem_responses(400, 409, 422, 503),
    summary="Delete dead letters by ids or filter, confirming the expected count",
)
def delete_dead_letters(
    body: DeadLetterDeleteRequest, store: StoreDep, principal: AdminDep
) -> DeadLetterDeleteResponse:
    """Delete the dead letters ``ids`` or ``filter`` select -- only if they are exactly ``confirm``.

    A filter with no state selects open and replayed ones. When the selection holds another number
    of dead letters than ``confirm`` (a typo in the filter, new arrivals), nothing is deleted and
    the 409 problem says how many matched: check them, then send that number. At most
    10 000 per request.
    """
    _one_of(body.ids, body.filter)
    if body.ids is not None:
        ids = [d.id for d in store.get_dead_letters(body.ids)]
    else:
        flt = body.filter or DeadLetterFilterIn()
        query = {"stage": flt.stage, "source_name": flt.source, "error_class": flt.error_class, "state": flt.state}
        matched = store.count_dead_letters(**query)
        if matched > MAX_DELETE_ROWS:
            raise ApiProblem(422, "selection-too-large", "Selection too large",
                             f"{matched} dead letters match; delete at most {MAX_DELETE_ROWS} per request "
                             "(narrow the filter)", errors=[{"loc": ["body", "filter"], "msg": "too many matches"}])
        ids = [d.id for d in store.list_dead_letters(**query, limit=MAX_DELETE_ROWS)]
    if len(ids) != body.confirm:
        problem = ApiProblem(
            409, "confirm-mismatch", "Confirmation does not match",
            f"{len(ids)} dead letter(s) match, confirm says {body.confirm}: nothing was deleted; check the "
            f"selection and send confirm: {len(ids)}",
        )
        problem.errors = [{"loc": ["body", "confirm"], "msg": f"{len(ids)} match"}]
        raise problem
    deleted = store.delete_dead_letters(ids)
    log.warning("dead letters deleted through the API: %s", ids)
    if deleted:
        store.record_audit(principal.actor, "dead_letters.delete", f"dead-letters:{deleted}", {"ids": ids})
    return DeadLetterDeleteResponse(deleted=deleted, ids=ids)
