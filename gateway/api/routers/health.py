"""Operational endpoints outside ``/v1``: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import logging
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.api.deps import BusDep, MetricsDep, SettingsDep, StoreDep
from gateway.api.problems import PROBLEM_TYPE_BASE, problem_response, problem_responses, redact
from gateway.api.schemas import BreakerReadiness, CheckResult, Liveness, Readiness, SourceBreaker, SourceReadiness
from gateway.bus.protocols import Bus
from gateway.store import EventStore, StoredSourceStatus

__all__ = ["router", "CHECK_TIMEOUT_SECONDS"]

log = logging.getLogger(__name__)

router = APIRouter(tags=["operations"])

#: Longest a single readiness check may take before it counts as failed.
CHECK_TIMEOUT_SECONDS = 5.0


@router.get("/healthz", response_model=Liveness, summary="Liveness")
async def healthz() -> Liveness:
    """Always 200 while the process serves requests."""
    return Liveness()


def _store_check(store: EventStore) -> CheckResult:
    try:
        store.ping()
    except Exception as exc:  # any failure means not ready; never echo URLs or credentials
        return CheckResult(ok=False, detail=f"unreachable: {redact(str(exc)) or type(exc).__name__}")
    return CheckResult(ok=True, detail="reachable")


def _bus_check(bus: Bus) -> CheckResult:
    try:
        health = bus.health()
    except Exception as exc:
        return CheckResult(ok=False, detail=f"health check failed: {type(exc).__name__}")
    detail = redact(health.detail) if health.detail else ("reachable" if health.ok else "unreachable")
    return CheckResult(ok=bool(health.ok), detail=f"{health.kind}: {detail}")


async def _bounded(fn: Any, arg: Any) -> CheckResult:
    with anyio.move_on_after(CHECK_TIMEOUT_SECONDS):
        return await anyio.to_thread.run_sync(fn, arg, abandon_on_cancel=True)  # type: ignore[no-any-return]
    return CheckResult(ok=False, detail=f"no answer within {CHECK_TIMEOUT_SECONDS:g} s")


#: Longest ``last_error`` shown per source in ``/readyz``.
_ERROR_CHARS = 300


def _source_readiness(row: StoredSourceStatus | None) -> SourceReadiness:
    if row is None:
        return SourceReadiness(state="unknown")
    snap = row.breaker or {}
    breaker = None
    if snap.get("state"):
        breaker = SourceBreaker(
            name=snap.get("name"),
            state=str(snap["state"]),
            failure_rate=snap.get("failure_rate"),
            retry_after=snap.get("retry_after"),
        )
    error = redact(row.last_error)[:_ERROR_CHARS] if row.last_error else None
    return SourceReadiness(
        state=row.state,
        desired_state=row.desired_state,
        breaker=breaker,
        last_error=error,
        updated_at=row.updated_at,
        drift=row.drift_detected,
    )


def _sources_detail(args: tuple[EventStore, list[str]]) -> dict[str, SourceReadiness]:
    """Per source (configured, or known to the store): its persisted status."""
    store, configured = args
    rows = {r.source_name: r for r in store.list_source_status()}
    return {name: _source_readiness(rows.get(name)) for name in sorted(set(configured) | set(rows))}


async def _bounded_sources(store: EventStore, configured: list[str]) -> dict[str, SourceReadiness]:
    """:func:`_sources_detail` within the check timeout; empty when it fails or takes too long."""
    with anyio.move_on_after(CHECK_TIMEOUT_SECONDS):
        try:
            return await anyio.to_thread.run_sync(_sources_detail, (store, configured), abandon_on_cancel=True)
        except Exception as exc:  # noqa: BLE001 -- detail only: never fails the readiness answer
            log.warning("readyz: source status unavailable (%s)", type(exc).__name__)
            return {}
    return {}


def _breakers_detail(request: Request) -> dict[str, BreakerReadiness]:
    """Every breaker of this process (``app.state.breakers``, a ``BreakerRegistry``), live; empty
    when the app has none (an API-only process) or a snapshot fails."""
    registry = getattr(request.app.state, "breakers", None)
    if registry is None:
        return {}
    try:
        return {
            name: BreakerReadiness(
                name=name,
                state=str(snap["state"]),
                failure_rate=float(snap["failure_rate"]),  # type: ignore[arg-type]
                retry_after=float(snap["retry_after"]),  # type: ignore[arg-type]
            )
            for name, snap in sorted(registry.snapshot().items())
        }
    except Exception as exc:  # noqa: BLE001 -- detail only: never fails the readiness answer
        log.warning("readyz: breaker snapshot failed (%s)", type(exc).__name__)
        return {}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses=problem_responses(503),
    summary="Readiness: store (and bus, when configured) reachable; per-source status as detail",
)
async def readyz(request: Request, store: StoreDep, bus: BusDep, settings: SettingsDep) -> Response:
    """200 when the store answers and the bus (if any) is healthy; else a 503 problem listing checks.

    ``sources`` shows each source's persisted status (state, breaker, last error, drift), and
    ``breakers`` every circuit breaker of this process, live. Both are detail only: a broken
    legacy endpoint must not take the API out of its load balancer.
    """
    checks: dict[str, CheckResult] = {"store": await _bounded(_store_check, store)}
    if bus is not None:
        checks["bus"] = await _bounded(_bus_check, bus)
    sources: dict[str, SourceReadiness] = {}
    if checks["store"].ok:
        sources = await _bounded_sources(store, [s.name for s in settings.sources])
    breakers = _breakers_detail(request)
    if all(c.ok for c in checks.values()):
        return JSONResponse(
            Readiness(status="ready", checks=checks, sources=sources, breakers=breakers).model_dump(mode="json")
        )
    failing = ", ".join(f"{name}: {c.detail}" for name, c in checks.items() if not c.ok)
    return problem_response(
        request,
        503,
        type_=PROBLEM_TYPE_BASE + "not-ready",
        title="Not ready",
        detail=failing,
        headers={"Retry-After": "5"},
        checks={name: c.model_dump() for name, c in checks.items()},
        sources={name: v.model_dump(mode="json") for name, v in sources.items()},
        breakers={name: v.model_dump(mode="json") for name, v in breakers.items()},
    )


@router.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics",
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text exposition."}},
)
def metrics(metrics: MetricsDep) -> Response:
    """Prometheus text exposition of this app's registry (outbox gauges are read at scrape time)."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
