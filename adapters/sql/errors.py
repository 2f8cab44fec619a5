"""DBAPI errors of the ``sql`` adapter in the gateway taxonomy (the one ``classify_error``)."""

from __future__ import annotations

from sqlalchemy import exc as sa_exc
from sqlalchemy.exc import DBAPIError

from gateway.errors import GatewayError, PermanentError, TransientError

__all__ = ["classify_db_error"]

#: DBAPI exception classes that mean "the database is not reachable right now".
_TRANSIENT = frozenset({"OperationalError", "InterfaceError"})


def classify_db_error(exc: BaseException, source_name: str) -> GatewayError | None:
    """Classify a DBAPI error: connection-level errors are transient, the rest permanent.

    Transient: ``OperationalError`` and ``InterfaceError`` (connection lost or refused, lock and
    statement timeouts, deadlocks on MariaDB), an invalidated connection, SQLAlchemy's pool
    timeout and ``DisconnectionError``. Permanent: every other DBAPI error -- ``IntegrityError``,
    ``ProgrammingError`` (a missing column), ``DataError`` -- the same query fails again.

    Returns:
        The gateway error, or ``None`` when ``exc`` is not a database error (the caller decides).
    """
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, (sa_exc.TimeoutError, sa_exc.DisconnectionError)):
        pool: GatewayError = TransientError(f"source {source_name!r}: database unavailable: {type(exc).__name__}")
        pool.__cause__ = exc
        return pool
    if not isinstance(exc, DBAPIError):
        return None
    name = type(exc.orig).__name__
    sa_transient = isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError))
    err: GatewayError
    if exc.connection_invalidated or sa_transient or name in _TRANSIENT:
        err = TransientError(f"source {source_name!r}: database unavailable: {name}")
    else:
        err = PermanentError(f"source {source_name!r}: query failed: {name}: {exc.orig}")
    err.__cause__ = exc
    return err
