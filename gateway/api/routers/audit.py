"""``/v1/audit``: the audit log of admin actions (scope ``admin``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.exceptions import RequestValidationError

from gateway.api.auth import AdminDep
from gateway.api.deps import StoreDep, encode_cursor, page_cursor, page_limit
from gateway.api.problems import problem_responses
from gateway.api.schemas import AuditEntryOut, AuditPage
from gateway.store import AUDIT_ACTIONS

__all__ = ["router"]

router = APIRouter(prefix="/audit", tags=["audit"])


@router.get(
    "",
    response_model=AuditPage,
    responses=problem_responses(401, 403, 422, 429, 503),
    summary="List the audit log (oldest first, cursor pagination)",
)
def list_audit(
    _principal: AdminDep,
    store: StoreDep,
    limit: Annotated[int, Depends(page_limit)],
    after_id: Annotated[int | None, Depends(page_cursor)],
    action: Annotated[str | None, Query(description=f"Only this action: {', '.join(AUDIT_ACTIONS)}.")] = None,
    actor_id: Annotated[str | None, Query(max_length=32, description="Only actions of this API key.")] = None,
) -> AuditPage:
    """Admin actions, oldest first: key changes, dead-letter replays and deletes, cursor moves."""
    if action is not None and action not in AUDIT_ACTIONS:
        raise RequestValidationError([{
            "type": "value_error", "loc": ("query", "action"), "input": action,
            "msg": f"expected one of {', '.join(AUDIT_ACTIONS)}",
        }])
    rows = store.list_audit(action=action, actor_id=actor_id, after_id=after_id, limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return AuditPage(
        items=[AuditEntryOut(id=r.id, at=r.at, actor_id=r.actor_id, actor_name=r.actor_name, action=r.action,
                             target=r.target, details=r.details) for r in rows],
        next_cursor=encode_cursor(rows[-1].id) if more and rows else None,
    )
