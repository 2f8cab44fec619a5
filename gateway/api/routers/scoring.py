"""``/v1/scoring``: the models in use and the shadow comparison report (docs/scoring.md)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query

from gateway.api.auth import EventsReadDep
from gateway.api.deps import SettingsDep, StoreDep
from gateway.api.problems import ApiProblem, problem_responses

__all__ = ["router"]

router = APIRouter(prefix="/scoring", tags=["scoring"])


def _redacted(value: Any, path: str = "") -> Any:
    """Model options as configured, with every value under a secret-looking key replaced."""
    from gateway.scoring.registry import _SECRET_WORDS

    if isinstance(value, dict):
        return {k: ("***" if any(w in str(k).lower() for w in _SECRET_WORDS) and not isinstance(v, (dict, list))
                    else _redacted(v, f"{path}.{k}")) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v, path) for v in value]
    return value


@router.get("/models", summary="The models in use", responses=problem_responses(401, 403, 429, 503))
def models(principal: EventsReadDep, settings: SettingsDep, store: StoreDep) -> dict[str, Any]:
    """The scoring routes (default route first: type patterns, model, fallback, shadow), the
    configured model instances (kind and options, secret-looking values hidden), and per model
    name and version what the store holds: scores and the last time one was stored."""
    sc = settings.scoring
    routes = []
    for name in sc.route_names():
        r = sc.for_route(name)
        types = ["(every type of no other route)"] if name is None else next(
            list(x.types) for x in sc.routes if x.name == name)
        routes.append({
            "route": name or "default", "types": types, "model": r.model, "fallback": r.fallback,
            "shadow": r.shadow.model_dump() if r.shadow is not None else None,
        })
    configured = {
        name: {"kind": m.kind, "options": _redacted(m.options)} for name, m in sorted(sc.models.items())
    }
    return {"routes": routes, "models": configured, "versions": store.score_versions()}


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
