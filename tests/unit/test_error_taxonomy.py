"""The error taxonomy (style rule 1) and the one classifier per integration (REL-12).

Each classifier is fed the native errors its client library really raises and must answer with
the taxonomy class that says what to do: retry (``TransientError``), dead-letter or fail
(``PermanentError``, ``ContractError``) or stop at start-up (``ConfigurationError``).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pika.exceptions as px
import pytest
import zeep.exceptions as zx
from sqlalchemy import exc as sa_exc

import gateway.errors as errors_module
from adapters.amqp.source import AmqpSource
from adapters.soap import SoapSource
from adapters.sql.errors import classify_db_error
from gateway.bus.errors import classify_pika_error
from gateway.errors import (
    BackpressureError,
    CircuitOpenError,
    ConfigurationError,
    ContractError,
    FencingError,
    GatewayError,
    NotConnectedError,
    PermanentError,
    SkippableError,
    StoreUnavailableError,
    TransientError,
)
from gateway.scoring.errors import classify_http_error, retry_after_seconds

# ---------------------------------------------------------------------------- the taxonomy


def test_every_exception_is_exported_and_the_branches_say_what_to_do() -> None:
    exported = {getattr(errors_module, name) for name in errors_module.__all__}
    defined = {
        obj for obj in vars(errors_module).values()
        if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == errors_module.__name__
    }
    assert exported == defined
    for branch in (TransientError, PermanentError, SkippableError, ConfigurationError, NotConnectedError):
        assert issubclass(branch, GatewayError)
    for transient in (BackpressureError, CircuitOpenError, StoreUnavailableError):
        assert issubclass(transient, TransientError)
    for permanent in (ContractError, FencingError):
        assert issubclass(permanent, PermanentError)
    # No class is both: the retry decision is never ambiguous.
    assert not issubclass(PermanentError, TransientError) and not issubclass(TransientError, PermanentError)
    assert not issubclass(ConfigurationError, TransientError) and not issubclass(SkippableError, TransientError)


# ---------------------------------------------------------------------------- classifiers

def _request() -> httpx.Request:
    return httpx.Request("POST", "http://model.internal/v1/score")


def http_status(status: int, **headers: str) -> httpx.HTTPStatusError:
    """The error ``response.raise_for_status()`` raises."""
    response = httpx.Response(status, headers=headers, request=_request())
    try:
        response.raise_for_status()
    except httpx.HTTPStatusError as exc:
        return exc
    raise AssertionError(f"{status} did not raise")


def invalid_json() -> json.JSONDecodeError:
    """What ``response.json()`` raises for a body that is not JSON."""
    try:
        httpx.Response(200, content=b"<html>oops</html>", request=_request()).json()
    except json.JSONDecodeError as exc:
        return exc
    raise AssertionError("parsed")


def soap_source() -> SoapSource:
    cfg = {
        "wsdl": "https://erp.example/orders?wsdl", "operation": "GetOrders", "records_path": "orders",
        "key_field": "id", "time_field": "updatedAt", "transient_fault_codes": ["BUSY"],
    }
    return SoapSource(SoapSource.parse_config(cfg), source_name="orders")


def amqp_source() -> AmqpSource:
    cfg = {"url": "amqp://guest:guest@127.0.0.1:5672/%2F", "queue": "legacy.bookings", "codec": {"format": "json"}}
    return AmqpSource(AmqpSource.parse_config(cfg), source_name="bookings")


def db_error(cls: type[sa_exc.DBAPIError], orig: Exception) -> sa_exc.DBAPIError:
    return cls("SELECT 1", {}, orig)


def classify_sql(exc: BaseException) -> GatewayError:
    result = classify_db_error(exc, "orders")
    assert result is not None
    return result


NATIVE: list[tuple[str, Callable[[], BaseException], Callable[[BaseException], GatewayError], type[GatewayError]]] = [
    # httpx (remote inference servers)
    ("httpx-connect-timeout", lambda: httpx.ConnectTimeout("timed out"), classify_http_error, TransientError),
    ("httpx-read-timeout", lambda: httpx.ReadTimeout("timed out"), classify_http_error, TransientError),
    ("httpx-connect-error", lambda: httpx.ConnectError("refused"), classify_http_error, TransientError),
    ("http-500", lambda: http_status(500), classify_http_error, TransientError),
    ("http-502", lambda: http_status(502), classify_http_error, TransientError),
    ("http-503", lambda: http_status(503), classify_http_error, TransientError),
    ("http-429", lambda: http_status(429, **{"Retry-After": "7"}), classify_http_error, BackpressureError),
    ("http-400", lambda: http_status(400), classify_http_error, PermanentError),
    ("http-404", lambda: http_status(404), classify_http_error, PermanentError),
    ("http-422", lambda: http_status(422), classify_http_error, PermanentError),
    ("http-401", lambda: http_status(401), classify_http_error, ConfigurationError),
    ("http-invalid-json", invalid_json, classify_http_error, ContractError),
    # pika (the gateway's bus and the legacy-queue source)
    ("pika-connection", lambda: px.AMQPConnectionError("refused"), classify_pika_error, TransientError),
    ("pika-stream-lost", lambda: px.StreamLostError("lost"), classify_pika_error, TransientError),
    ("pika-heartbeat", lambda: px.AMQPHeartbeatTimeout("missed"), classify_pika_error, TransientError),
    ("pika-closed-320", lambda: px.ConnectionClosedByBroker(320, "CONNECTION_FORCED"), classify_pika_error, TransientError),
    ("pika-channel-wrong-state", lambda: px.ChannelWrongStateError("closed"), classify_pika_error, TransientError),
    ("pika-nack", lambda: px.NackError([object()]), classify_pika_error, BackpressureError),
    ("pika-blocked", lambda: px.ConnectionBlockedTimeout("blocked"), classify_pika_error, BackpressureError),
    ("pika-auth", lambda: px.ProbableAuthenticationError("refused"), classify_pika_error, ConfigurationError),
    ("pika-access", lambda: px.ProbableAccessDeniedError("vhost"), classify_pika_error, ConfigurationError),
    ("pika-channel-404", lambda: px.ChannelClosedByBroker(404, "NOT_FOUND"), classify_pika_error, ConfigurationError),
    ("pika-channel-406", lambda: px.ChannelClosedByBroker(406, "PRECONDITION_FAILED"), classify_pika_error,
     ConfigurationError),
    ("pika-too-long", lambda: px.ShortStringTooLong("k" * 300), classify_pika_error, PermanentError),
    ("socket-refused", lambda: ConnectionRefusedError(111, "refused"), classify_pika_error, TransientError),
    # SQL (DBAPI errors as SQLAlchemy wraps them)
    ("sql-operational", lambda: db_error(sa_exc.OperationalError, sqlite3.OperationalError("database is locked")),
     classify_sql, TransientError),
    ("sql-interface", lambda: db_error(sa_exc.InterfaceError, sqlite3.InterfaceError("closed")), classify_sql,
     TransientError),
    ("sql-pool-timeout", lambda: sa_exc.TimeoutError("QueuePool limit reached"), classify_sql, TransientError),
    ("sql-integrity", lambda: db_error(sa_exc.IntegrityError, sqlite3.IntegrityError("UNIQUE failed")), classify_sql,
     PermanentError),
    ("sql-programming", lambda: db_error(sa_exc.ProgrammingError, sqlite3.ProgrammingError("no such column")),
     classify_sql, PermanentError),
    # SOAP (zeep and requests)
    ("soap-business-fault", lambda: zx.Fault("Order 42 not found", code="soap:Client"),
     lambda e: soap_source().classify_error(e), PermanentError),
    ("soap-server-fault", lambda: zx.Fault("database down", code="soap:Server"),
     lambda e: soap_source().classify_error(e), TransientError),
    ("soap-configured-transient-fault", lambda: zx.Fault("try later", code="BUSY"),
     lambda e: soap_source().classify_error(e), TransientError),
    ("soap-http-503", lambda: zx.TransportError("unavailable", status_code=503, content=b""),
     lambda e: soap_source().classify_error(e), TransientError),
    ("soap-http-404", lambda: zx.TransportError("not found", status_code=404, content=b""),
     lambda e: soap_source().classify_error(e), PermanentError),
    ("soap-http-401", lambda: zx.TransportError("denied", status_code=401, content=b""),
     lambda e: soap_source().classify_error(e), ConfigurationError),
    # the legacy-queue source delegates to classify_pika_error
    ("amqp-source-connection", lambda: px.AMQPConnectionError("refused"), lambda e: amqp_source().classify_error(e),
     TransientError),
    ("amqp-source-missing-queue", lambda: px.ChannelClosedByBroker(404, "NOT_FOUND"),
     lambda e: amqp_source().classify_error(e), ConfigurationError),
]


@pytest.mark.parametrize(("case", "make", "classify", "expected"), NATIVE, ids=[c[0] for c in NATIVE])
def test_classifier_maps_native_error(
    case: str, make: Callable[[], BaseException], classify: Callable[[BaseException], GatewayError],
    expected: type[GatewayError],
) -> None:
    native = make()
    err = classify(native)
    assert isinstance(err, expected), f"{case}: {native!r} -> {err!r}"
    # The decision is unambiguous: a transient answer is never also permanent, and vice versa.
    assert isinstance(err, TransientError) != isinstance(err, (PermanentError, ConfigurationError))


@pytest.mark.parametrize("classify", [classify_http_error, classify_pika_error, lambda e: soap_source().classify_error(e)])
def test_gateway_errors_pass_through_unchanged(classify: Callable[[BaseException], GatewayError]) -> None:
    err = ContractError("bad record")
    assert classify(err) is err


def test_http_retry_after_is_kept_and_parsed_both_ways() -> None:
    err = classify_http_error(http_status(429, **{"Retry-After": "12"}))
    assert isinstance(err, BackpressureError) and err.retry_after == 12.0
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert retry_after_seconds(format_datetime(now + timedelta(seconds=30), usegmt=True), now=now) == 30.0
    assert retry_after_seconds("not a date") is None and retry_after_seconds(None) is None
    # 503 with Retry-After is an explicit "come back later"; without it, a plain transient error.
    assert isinstance(classify_http_error(http_status(503, **{"Retry-After": "3"})), BackpressureError)
    plain = classify_http_error(http_status(503))
    assert isinstance(plain, TransientError) and not isinstance(plain, BackpressureError)


def test_classified_messages_never_carry_the_url_password() -> None:
    err = classify_pika_error(px.AMQPConnectionError("amqp://gw:hunter2@rabbit:5672/ refused"))
    assert "hunter2" not in str(err)
    http = classify_http_error(httpx.ConnectError("http://user:hunter2@model/ refused"))
    assert "hunter2" not in str(http)
    assert isinstance(err.__cause__, px.AMQPConnectionError)  # the native error stays attached for logs
