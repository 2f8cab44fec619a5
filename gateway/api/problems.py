"""RFC 9457 problem details: every error the API answers is ``application/problem+json``.

A problem has ``type``, ``title``, ``status``, ``detail`` and ``instance``; validation problems add
``errors``: a list of ``{"loc": [...], "msg": "..."}``, where ``loc`` is the path to the bad value
(``["body", 0, "time"]``, ``["query", "limit"]``). A 500 never carries exception text.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException

from gateway.errors import BackpressureError, ContractError, StoreUnavailableError

__all__ = [
    "PROBLEM_CONTENT_TYPE",
    "PROBLEM_TYPE_BASE",
    "ApiProblem",
    "ProblemResponse",
    "problem_response",
    "problem_body",
    "problem_responses",
    "contract_error_item",
    "install_problem_handlers",
    "redact",
]

log = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"
#: Prefix of the gateway's own problem types; plain HTTP errors use ``about:blank``.
PROBLEM_TYPE_BASE = "urn:legacy-gateway:problem:"

#: Seconds a client is told to wait after a 503.
RETRY_AFTER_SECONDS = 5

_TITLES = {
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class ProblemResponse(JSONResponse):
    """A JSON response with the ``application/problem+json`` media type."""

    media_type = PROBLEM_CONTENT_TYPE


class ApiProblem(Exception):
    """Raise from an endpoint to answer with a problem document.

    Args:
        status: HTTP status code.
        slug: short problem kind; the ``type`` becomes ``urn:legacy-gateway:problem:<slug>``.
        title: short, stable summary of the problem kind.
        detail: what happened in this request.
        errors: validation errors, each ``{"loc": [...], "msg": str}``.
        headers: extra response headers (``Retry-After``...).
    """

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        *,
        errors: Sequence[Mapping[str, Any]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.type = PROBLEM_TYPE_BASE + slug
        self.title = title
        self.detail = detail
        self.errors = [dict(e) for e in errors] if errors is not None else None
        self.headers = dict(headers or {})


def problem_body(
    request: Request | None,
    status: int,
    *,
    type_: str = "about:blank",
    title: str | None = None,
    detail: str = "",
    errors: Sequence[Mapping[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Build a problem document.

    Args:
        request: the request, whose path becomes ``instance``.
        status: HTTP status code.
        type_: problem type URI.
        title: summary; defaults to the HTTP reason phrase.
        detail: explanation specific to this occurrence.
        errors: validation errors, each ``{"loc": [...], "msg": str}``.
        **extra: further extension members.

    Returns:
        The JSON-safe problem object.
    """
    body: dict[str, Any] = {
        "type": type_,
        "title": title or _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "instance": request.url.path if request is not None else "",
    }
    if errors is not None:
        body["errors"] = [dict(e) for e in errors]
    body.update(extra)
    return body


def problem_response(
    request: Request | None,
    status: int,
    *,
    headers: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> ProblemResponse:
    """A :class:`ProblemResponse`; ``kwargs`` as for :func:`problem_body`."""
    return ProblemResponse(problem_body(request, status, **kwargs), status_code=status, headers=dict(headers or {}))


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries documenting problem answers for ``statuses``."""
    from gateway.api.schemas import Problem

    return {
        s: {"model": Problem, "description": _TITLES.get(s, "Error"), "content": {PROBLEM_CONTENT_TYPE: {}}}
        for s in statuses
    }


# ---------------------------------------------------------------------------- helpers
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
_SECRET_KV = re.compile(r"(?i)\b(password|passwd|pwd|secret|token)\s*[=:]\s*\S+")


def redact(text: str) -> str:
    """Remove URLs (which may hold credentials) and ``password=...`` pairs from ``text``."""
    return _SECRET_KV.sub(r"\1=<redacted>", _URL.sub("<redacted-url>", text))


def _split_where(where: str) -> list[str | int]:
    """``body[0]`` -> ``["body", 0]``."""
    out: list[str | int] = []
    for name, index in re.findall(r"([^\[\]]+)|\[(\d+)\]", where):
        out.append(int(index) if index else name)
    return out


def contract_error_item(exc: ContractError, where: str, obj: Any) -> dict[str, Any]:
    """Turn ``Event.from_dict``'s message (``"<where>.<attr>: <msg>"``) into ``{loc, msg}``.

    The attribute is matched against the object's own keys, so names holding ``": "`` or dots
    still give the right location.
    """
    text = str(exc)
    loc = _split_where(where)
    rest = text[len(where) :] if text.startswith(where) else ": " + text
    if rest.startswith("."):
        names = sorted((k for k in obj if isinstance(k, str)), key=len, reverse=True) if isinstance(obj, Mapping) else []
        for name in names:
            if rest.startswith(f".{name}: "):
                return {"loc": [*loc, name], "msg": rest[len(name) + 3 :]}
        attr, _, msg = rest[1:].partition(": ")
        return {"loc": [*loc, attr], "msg": msg or text}
    return {"loc": loc, "msg": rest[2:] if rest.startswith(": ") else text}


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


# ---------------------------------------------------------------------------- handlers
async def _api_problem(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, ApiProblem)
    return problem_response(
        request, exc.status, type_=exc.type, title=exc.title, detail=exc.detail, errors=exc.errors, headers=exc.headers
    )


async def _http_exception(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, HTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else _TITLES.get(exc.status_code, "")
    return problem_response(request, exc.status_code, detail=detail, headers=exc.headers)


async def _validation(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))} for e in exc.errors()]
    where = ", ".join(".".join(str(p) for p in e["loc"]) for e in errors)
    return problem_response(
        request,
        422,
        type_=PROBLEM_TYPE_BASE + "validation",
        title="Request validation failed",
        detail=f"invalid request parameters: {where}" if where else "invalid request",
        errors=errors,
    )


async def _contract(request: Request, exc: Exception) -> ProblemResponse:
    return problem_response(
        request,
        422,
        type_=PROBLEM_TYPE_BASE + "invalid-event",
        title="Invalid CloudEvent",
        detail=str(exc),
        errors=[{"loc": ["body"], "msg": str(exc)}],
    )


async def _backpressure(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, BackpressureError)
    return problem_response(
        request,
        503,
        type_=PROBLEM_TYPE_BASE + "backpressure",
        title="Gateway is shedding load",
        detail=str(exc),
        headers=_retry_after(exc.retry_after),
    )


async def _store_unavailable(request: Request, exc: Exception) -> ProblemResponse:
    # The store's message may quote driver text (host names, ports); it goes to the log only.
    log.warning("store unavailable while serving %s: %s", request.url.path, redact(str(exc)))
    return problem_response(
        request,
        503,
        type_=PROBLEM_TYPE_BASE + "store-unavailable",
        title="Event store unavailable",
        detail="the event store could not be reached or did not commit; nothing was stored, retry later",
        headers=_retry_after(RETRY_AFTER_SECONDS),
    )


async def _unhandled(request: Request, exc: Exception) -> ProblemResponse:
    log.error("unhandled error serving %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(
        request,
        500,
        type_=PROBLEM_TYPE_BASE + "internal",
        detail="an unexpected error occurred; it was logged",
    )


def install_problem_handlers(app: FastAPI) -> None:
    """Register problem-JSON handlers for HTTP, validation, gateway and unexpected errors."""
    app.add_exception_handler(ApiProblem, _api_problem)
    app.add_exception_handler(HTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(ContractError, _contract)
    app.add_exception_handler(BackpressureError, _backpressure)
    app.add_exception_handler(StoreUnavailableError, _store_unavailable)
    # get_event/list_events/pending_stats do not wrap driver errors: connectivity errors are
    # unavailability (503); anything else from the database is a bug and stays a 500.
    for cls in (OperationalError, InterfaceError, DisconnectionError, PoolTimeoutError):
        app.add_exception_handler(cls, _store_unavailable)
    app.add_exception_handler(Exception, _unhandled)
