"""``/v1/sources``: source status, pause, resume, run now, and the cursor with a preview (scope ``sources:admin``).

The REST twins of ``gateway sources list|pause|resume|run|cursor``: both call
:mod:`gateway.sources.ops`. A key restricted to some sources sees only those; any other name --
configured or not -- is a 404 that names nothing else. Operator wishes go through the store, so
the source's runner acts on them within its ``status_interval``, whichever process runs it.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query

from gateway.api.auth import Principal, SourcesAdminDep
from gateway.api.deps import SettingsDep, StoreDep
from gateway.api.problems import ApiProblem, problem_responses
from gateway.api.schemas import (
    SourceActionResponse,
    SourceCursorMove,
    SourceCursorOut,
    SourceCursorSetRequest,
    SourceList,
    SourceOut,
)
from gateway.config import Settings
from gateway.errors import ConfigurationError
from gateway.events import utcnow
from gateway.sources import ops
from gateway.store import EventStore

__all__ = ["router"]

log = logging.getLogger("gateway.api.sources")

router = APIRouter(prefix="/sources", tags=["sources"])

_AUTH = (401, 403, 429)
NameParam = Annotated[str, Path(description="The source's name in the configuration.", max_length=128)]


def _not_found(name: str) -> ApiProblem:
    shown = name if len(name) <= 80 else name[:80] + "..."
    return ApiProblem(
        404, "source-not-found", "Source not found",
        f"no source named {shown!r} is configured (or this API key may not manage it); GET /v1/sources lists "
        "the sources the key may manage",
    )


def _check(settings: Settings, principal: Principal, name: str) -> None:
    """404 unless ``name`` is configured and the key may manage it (the same answer for both)."""
    if not principal.allows_source(name) or name not in {s.name for s in settings.sources}:
        raise _not_found(name)


def _view(settings: Settings, store: EventStore, name: str) -> SourceOut:
    return SourceOut.model_validate(ops.source_view(settings, store, name))


@router.get("", response_model=SourceList, responses=problem_responses(*_AUTH, 503), summary="List sources with their status")
def list_sources(principal: SourcesAdminDep, settings: SettingsDep, store: StoreDep) -> SourceList:
    """Every configured source the key may manage, with state, last poll, cursor and lag, counts,
    breaker, drift, lease holder and runners (the same as ``gateway sources list --json``)."""
    names = principal.sources  # None: every source
    return SourceList(items=[SourceOut.model_validate(v) for v in ops.source_views(settings, store, names)])


@router.get("/{name}", response_model=SourceOut, responses=problem_responses(*_AUTH, 404, 422, 503), summary="One source with its status")
def get_source(name: NameParam, principal: SourcesAdminDep, settings: SettingsDep, store: StoreDep) -> SourceOut:
    """One source's status; 404 when it is not configured or the key may not manage it."""
    _check(settings, principal, name)
    return _view(settings, store, name)


@router.post(
    "/{name}/pause", status_code=202, response_model=SourceActionResponse,
    responses=problem_responses(*_AUTH, 404, 422, 503), summary="Pause a source",
)
def pause_source(name: NameParam, principal: SourcesAdminDep, settings: SettingsDep, store: StoreDep) -> SourceActionResponse:
    """Stop polling: the runner reports ``paused-by-operator`` within the source's ``status_interval``
    and polls again after a resume. Idempotent."""
    _check(settings, principal, name)
    ops.pause(settings, store, name)
    interval = settings.source(name).status_interval
    return SourceActionResponse(
        source=name, action="pause", status=_view(settings, store, name),
        detail=f"pause requested; its runner stops polling within {interval:g} s (state paused-by-operator)",
    )


@router.post(
    "/{name}/resume", status_code=202, response_model=SourceActionResponse,
    responses=problem_responses(*_AUTH, 404, 422, 503), summary="Resume a source",
)
def resume_source(name: NameParam, principal: SourcesAdminDep, settings: SettingsDep, store: StoreDep) -> SourceActionResponse:
    """Let a paused, failed or drift-stopped source poll again, from its committed cursor."""
    _check(settings, principal, name)
    _, row = ops.resume(settings, store, name)
    note = ops.resume_note(row.state)
    return SourceActionResponse(
        source=name, action="resume", status=_view(settings, store, name),
        detail=f"resume requested (was {row.state}).{' ' + note if note else ''}",
    )


@router.post(
    "/{name}/run", status_code=202, response_model=SourceActionResponse,
    responses=problem_responses(*_AUTH, 404, 409, 422, 503), summary="Run a source now",
)
def run_source(name: NameParam, principal: SourcesAdminDep, settings: SettingsDep, store: StoreDep) -> SourceActionResponse:
    """Poll at once instead of waiting for the rest of the interval: the runner sees the request
    within the source's ``status_interval``. 409 when the source is paused, failed or
    drift-stopped (resume it instead; a resume polls at once)."""
    _check(settings, principal, name)
    try:
        row = ops.run_now(settings, store, name, principal.name)
    except ops.SourceNotRunnableError as exc:
        raise ApiProblem(409, "source-not-runnable", "Source cannot run now", str(exc)) from None
    return SourceActionResponse(
        source=name, action="run", status=_view(settings, store, name),
        detail=ops.run_now_note(row, settings.source(name)),
    )


@router.get(
    "/{name}/cursor", response_model=SourceCursorOut,
    responses=problem_responses(*_AUTH, 404, 422, 503), summary="A source's committed cursor",
)
def get_cursor(name: NameParam, principal: SourcesAdminDep, settings: SettingsDep, store: StoreDep) -> SourceCursorOut:
    """The committed cursor, its epoch and the lease (``gateway sources cursor NAME``)."""
    _check(settings, principal, name)
    state = store.get_cursor(name)
    if state is None:
        return SourceCursorOut(source=name, cursor=None, committed=False, lease="-")
    return SourceCursorOut(
        source=name, cursor=state.cursor, committed=state.cursor is not None, committed_at=state.updated_at,
        events_total=state.events_total, epoch=state.epoch, lease=ops.lease_word(state, utcnow()),  # type: ignore[arg-type]
        lease_owner=state.lease_owner, lease_until=state.lease_until,
    )


def _move(
    settings: Settings, store: EventStore, principal: Principal, name: str, target: Any, *, reset: bool, dry_run: bool
) -> SourceCursorMove:
    _check(settings, principal, name)
    try:
        preview = ops.preview_cursor_move(settings, store, name, target, reset=reset)
    except ConfigurationError as exc:
        raise ApiProblem(409, "source-misconfigured", "Source misconfigured", str(exc)) from None
    new_epoch = None if dry_run else ops.apply_cursor_move(store, preview, principal.actor)
    if new_epoch is not None:
        log.warning("source %r: cursor moved through the API by key %s (%s): %s -> %s; epoch %d -> %d",
                    name, principal.key_id, principal.name, preview.before, preview.after, preview.epoch, new_epoch)
    return SourceCursorMove(
        source=name, dry_run=dry_run, reset=reset, before=preview.before, after=preview.after, epoch=preview.epoch,
        new_epoch=new_epoch, rows_read_again=preview.rows_read_again, rows_skipped=preview.rows_skipped,
        unknown_reason=preview.unknown_reason,
    )


@router.put(
    "/{name}/cursor", response_model=SourceCursorMove,
    responses=problem_responses(*_AUTH, 404, 409, 422, 503), summary="Move a source's cursor (preview by default)",
)
def set_cursor(
    name: NameParam, body: SourceCursorSetRequest, principal: SourcesAdminDep, settings: SettingsDep, store: StoreDep
) -> SourceCursorMove:
    """Preview moving the cursor to ``cursor``: the rows the source would read again or skip (when
    the adapter can count them). With ``"dry_run": false`` the move is applied: the fencing epoch
    is bumped (a running runner drops its batch in flight and continues from the new cursor) and
    the move is written to the audit log (``source.cursor.set``)."""
    return _move(settings, store, principal, name, body.cursor, reset=False, dry_run=body.dry_run)


@router.delete(
    "/{name}/cursor", response_model=SourceCursorMove,
    responses=problem_responses(*_AUTH, 404, 409, 422, 503), summary="Reset a source's cursor (preview by default)",
)
def reset_cursor(
    name: NameParam,
    principal: SourcesAdminDep,
    settings: SettingsDep,
    store: StoreDep,
    dry_run: Annotated[bool, Query(description="Only preview the reset (default); false applies it.")] = True,
) -> SourceCursorMove:
    """Preview moving the cursor back to the adapter's initial cursor; ``?dry_run=false`` applies
    it (new epoch, audit log ``source.cursor.reset``)."""
    return _move(settings, store, principal, name, None, reset=True, dry_run=dry_run)
