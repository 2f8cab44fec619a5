"""``/v1/scoring``: the shadow comparison report (docs/scoring.md, Shadow scoring)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query

from gateway.api.auth import EventsReadDep
from gateway.api.deps import SettingsDep, StoreDep
from gateway.api.problems import ApiProblem, problem_responses

__all__ = ["router"]

router = APIRouter(prefix="/scoring", tags=["scoring"])


@router.get(
    "/compare", summary="Compare a shadow model with the primary", responses=problem_responses(400, 401, 403, 422, 429)
)
def compare(
    principal: EventsReadDep,
    settings: SettingsDep,
    store: StoreDep,
    primary: Annotated[str | None, Query(description="Primary model name (default: scoring.model).")] = None,
    shadow: Annotated[str | None, Query(description="Shadow model name (default: scoring.shadow.model).")] = None,
    threshold: Annotated[float, Query(ge=0.0, le=1.0, description="Decision threshold of the agreement.")] = 0.5,
) -> dict[str, Any]:
    """On the events both models scored: count, agreement at ``threshold`` (both >= t or both < t),
    mean absolute difference, and 10-bin score histograms of both.

    Needs ``events:read`` on every source: the comparison spans all sources' events, so a key
    limited to some sources gets 403."""
    if principal.restricted:
        raise ApiProblem(403, "forbidden-source", "Forbidden",
                         f"API key {principal.key_id} is limited to some sources; the scoring comparison spans "
                         "every source and needs an unrestricted key")
    sc = settings.scoring
    shadow = shadow or (sc.shadow.model if sc.shadow is not None else None)
    if not shadow:
        raise HTTPException(status_code=400, detail="no shadow model: configure scoring.shadow or pass ?shadow=")
    return store.compare_scores(primary or sc.model, shadow, threshold=threshold).to_dict()
