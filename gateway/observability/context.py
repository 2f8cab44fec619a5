"""Correlation ids in :mod:`contextvars`: one per API request, relay batch or scoring batch.

Every log record emitted while a correlation id is bound carries it (``correlation_id`` in JSON
logs). Threads start with an empty context, so a worker thread binds its own id per batch; an
API request binds one in :class:`~gateway.observability.http.RequestContextMiddleware`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["bind_correlation", "correlation_id", "new_correlation_id", "set_correlation", "valid_correlation_id"]

_CORRELATION: ContextVar[str | None] = ContextVar("gateway_correlation_id", default=None)

#: What a client may send as ``X-Request-ID``: short and log-safe (no spaces, quotes or newlines).
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def new_correlation_id() -> str:
    """A fresh random id (32 hex digits, like a W3C trace id)."""
    return os.urandom(16).hex()


def valid_correlation_id(value: str | None) -> bool:
    """Whether ``value`` may be used (and echoed) as a correlation id."""
    return bool(value) and _SAFE_ID.match(value) is not None  # type: ignore[arg-type]


def correlation_id() -> str | None:
    """The correlation id bound in the current context, if any."""
    return _CORRELATION.get()


def set_correlation(value: str | None) -> None:
    """Bind ``value`` in the current context until the next call (worker loops: one per batch)."""
    _CORRELATION.set(value)


@contextmanager
def bind_correlation(value: str | None = None) -> Iterator[str]:
    """Bind ``value`` (a new id when ``None``) for the ``with`` block, then restore the previous one."""
    cid = value or new_correlation_id()
    token = _CORRELATION.set(cid)
    try:
        yield cid
    finally:
        _CORRELATION.reset(token)
