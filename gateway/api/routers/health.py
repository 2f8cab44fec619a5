"""Operational endpoints outside ``/v1``: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import logging
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.api.deps import BusDep, MetricsDep, StoreDep
from gateway.api.problems import PROBLEM_TYPE_BASE, problem_response, problem_responses, redact
from gateway.api.schemas import CheckResult, Liveness, Readiness
from gateway.bus.protocols import Bus
from gateway.store import EventStore

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


@router.get(
    "/readyz",
    response_model=Readiness,
    responses=problem_responses(503),
    summary="Readiness: store (and bus, when configured) reachable",
)
async def readyz(request: Request, store: StoreDep, bus: BusDep) -> Response:
    """200 when the store answers and the bus (if any) is healthy; else a 503 problem listing checks."""
    checks: dict[str, CheckResult] = {"store": await _bounded(_store_check, store)}
    if bus is not None:
        checks["bus"] = await _bounded(_bus_check, bus)
    if all(c.ok for c in checks.values()):
        return JSONResponse(Readiness(status="ready", checks=checks).model_dump())
    failing = ", ".join(f"{name}: {c.detail}" for name, c in checks.items() if not c.ok)
    return problem_response(
        request,
        503,
        type_=PROBLEM_TYPE_BASE + "not-ready",
        title="Not ready",
        detail=failing,
        headers={"Retry-After": "5"},
        checks={name: c.model_dump() for name, c in checks.items()},
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
