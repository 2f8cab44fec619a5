"""httpx errors of remote inference servers in the gateway taxonomy: the one place that
classifies them (for scorers that call a model over HTTP); mapping table in ``docs/resilience.md``."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

from gateway.errors import (
    BackpressureError,
    ConfigurationError,
    ContractError,
    GatewayError,
    PermanentError,
    TransientError,
)

__all__ = ["classify_http_error", "retry_after_seconds"]

#: Statuses that mean "try again later": timeouts, overload and gateway errors.
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), ``None`` if absent
    or unreadable; never negative."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def classify_http_error(exc: BaseException, context: str = "inference server") -> GatewayError:
    """Translate an httpx error (or a bad JSON answer) into the gateway taxonomy.

    * ``TransientError``: timeouts (connect, read, write, pool), connection and protocol errors,
      and HTTP 408, 425, 500, 502, 503 and 504; ``BackpressureError`` (transient, with
      ``retry_after``) for 429 and for a 503 with ``Retry-After``;
    * ``ConfigurationError``: HTTP 401/403 (credentials) and a URL httpx cannot use;
    * ``ContractError`` (permanent): an answer that is not valid JSON (``json.JSONDecodeError``,
      also raised by ``response.json()``) or cannot be decoded;
    * ``PermanentError``: every other 4xx and other HTTP status, too many redirects, anything
      else. Gateway errors pass through.

    Args:
        exc: the error raised by httpx (``raise_for_status()`` raises ``HTTPStatusError``) or by
            ``response.json()``.
        context: what was called, for the message.

    Returns:
        The gateway error, with ``exc`` as its cause (messages never include the response body).
    """
    if isinstance(exc, GatewayError):
        return exc
    err: GatewayError
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        retry_after = retry_after_seconds(exc.response.headers.get("Retry-After"))
        if status == 429 or (status == 503 and retry_after is not None):
            err = BackpressureError(f"{context}: HTTP {status}: overloaded", retry_after=retry_after or 1.0)
        elif status in _TRANSIENT_STATUS:
            err = TransientError(f"{context}: HTTP {status}")
        elif status in (401, 403):
            err = ConfigurationError(f"{context}: HTTP {status}: the credentials were rejected")
        else:
            err = PermanentError(f"{context}: HTTP {status}: the request was refused")
    elif isinstance(exc, (json.JSONDecodeError, httpx.DecodingError)):
        err = ContractError(f"{context}: the answer is not valid JSON ({type(exc).__name__})")
    elif isinstance(exc, (httpx.UnsupportedProtocol, httpx.InvalidURL)):
        err = ConfigurationError(f"{context}: unusable URL: {type(exc).__name__}")
    elif isinstance(exc, httpx.TooManyRedirects):
        err = PermanentError(f"{context}: too many redirects")
    elif isinstance(exc, (httpx.TimeoutException, httpx.TransportError, OSError)):
        err = TransientError(f"{context} unavailable: {type(exc).__name__}")
    else:
        err = PermanentError(f"{context}: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err
