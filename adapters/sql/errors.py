"""DBAPI errors of the ``sql`` adapter in the gateway taxonomy (the one ``classify_error``)."""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError

from gateway.errors import GatewayError, PermanentError, TransientError

__all__ = ["classify_db_error"]

#: DBAPI exception classes that mean "the database is not reachable right now".
_TRANSIENT = frozenset({"OperationalError", "InterfaceError"})


def classify_db_error(exc: BaseException, source_name: str) -> GatewayError | None:
    """Classify a DBAPI error: connection-level errors are transient, the rest permanent.

    Returns:
        The gateway error, or ``None`` when ``exc`` is not a DBAPI error (the caller decides).
    """
    if isinstance(exc, GatewayError):
        return exc
    if not isinstance(exc, DBAPIError):
        return None
    name = type(exc.orig).__name__
    if exc.connection_invalidated or name in _TRANSIENT:
        err: GatewayError = TransientError(f"source {source_name!r}: database unavailable: {name}")
    else:
        err = PermanentError(f"source {source_name!r}: query failed: {name}: {exc.orig}")
    err.__cause__ = exc
    return err
