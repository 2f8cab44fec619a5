"""JSON logs with correlation ids, secrets redacted, and the API's X-Request-ID (issue 8)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from gateway.config import Settings
from gateway.observability.context import bind_correlation, correlation_id
from gateway.observability.logs import (
    JsonFormatter,
    Redactor,
    TextFormatter,
    configure_logging,
    secrets_of,
)

PASSWORD = "s3cr3t-Pa55word"
KEY_SECRET = "k" * 40


def capture(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"test.obs.{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_time_level_logger_message_correlation_id_and_extra_fields() -> None:
    logger, stream = capture(JsonFormatter())
    logger.info("outside")
    with bind_correlation("req-42"):
        logger.warning("relay: %d of %d not confirmed", 2, 5, extra={"source": "orders", "batch": [1, 2]})
    assert correlation_id() is None
    first, second = lines(stream)
    assert "correlation_id" not in first
    assert second["level"] == "WARNING" and second["logger"] == logger.name
    assert second["message"] == "relay: 2 of 5 not confirmed"
    assert second["correlation_id"] == "req-42" and second["source"] == "orders" and second["batch"] == [1, 2]
    assert str(second["time"]).endswith("Z") and "T" in str(second["time"])


def test_secrets_from_settings_and_secret_patterns_never_reach_a_log_line() -> None:
    settings = Settings(profile="test", bus={"url": f"amqps://gw:{PASSWORD}@broker.example:5671/%2F"},
                        api={"key_secret": KEY_SECRET})
    found = secrets_of(settings)
    assert PASSWORD in found and KEY_SECRET in found
    logger, stream = capture(JsonFormatter(Redactor(found)))
    logger.error("cannot connect with password %s", PASSWORD, extra={"config": {"secret": KEY_SECRET}})
    logger.error("url postgresql://app:hunter2hunter2@db/x and Authorization: Bearer abc.def-123 key gw_abcdefghij12")
    try:
        raise RuntimeError(f"connect failed: amqp://gw:{PASSWORD}@broker.example/")
    except RuntimeError:
        logger.exception("boom")
    text = stream.getvalue()
    for secret in (PASSWORD, KEY_SECRET, "hunter2hunter2", "abc.def-123", "gw_abcdefghij12"):
        assert secret not in text
    records = lines(stream)
    assert records[0]["message"] == "cannot connect with password ***"
    assert records[0]["config"] == {"secret": "***"}
    assert "postgresql://app:***@db/x" in str(records[1]["message"])
    assert "RuntimeError" in str(records[2]["exc_info"])
    logger, stream = capture(TextFormatter(Redactor(found)))
    with bind_correlation("c-1"):
        logger.info("password=%s", PASSWORD)
    assert stream.getvalue().rstrip().endswith("[c-1]: password=***")


def test_configure_logging_chooses_json_off_a_terminal_and_leaves_foreign_setups_alone() -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        stream = io.StringIO()  # not a TTY: auto is json
        assert configure_logging("info", "auto", stream=stream, force=True) is not None
        logging.getLogger("gateway.x").info("hello")
        assert lines(stream)[0]["message"] == "hello"
        other = logging.StreamHandler(io.StringIO())
        root.addHandler(other)  # someone else configured logging: like basicConfig, do nothing
        assert configure_logging("info", "text", stream=io.StringIO()) is None
        with pytest.raises(ValueError, match="auto, json or text"):
            configure_logging("info", "xml", stream=stream, force=True)
    finally:
        root.handlers[:] = saved
        root.setLevel(level)


def test_cli_refuses_an_unknown_log_format() -> None:
    from gateway.cli import app

    result = CliRunner().invoke(app, ["--log-format", "xml", "check", "--help"])
    assert result.exit_code == 2 and "--log-format" in result.output


def _app(tmp_path: Path) -> TestClient:
    from gateway.api import create_app
    from gateway.store import EventStore, engine_from_settings
    from gateway.store.migrate import upgrade

    settings = Settings(profile="test", store={"url": f"sqlite:///{tmp_path / 'g.db'}"})
    engine = engine_from_settings(settings.store)
    upgrade(engine)
    app = create_app(settings, EventStore(engine))

    @app.get("/_log")  # a route that logs, as any handler may
    def _log() -> dict[str, str | None]:
        logging.getLogger("gateway.api.test").warning("handled")
        return {"cid": correlation_id()}

    return TestClient(app)  # create_app installs the RequestContextMiddleware


def test_api_requests_get_a_correlation_id_echoed_and_in_their_log_lines(tmp_path: Path) -> None:
    client = _app(tmp_path)
    logger = logging.getLogger("gateway.api.test")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    try:
        r = client.get("/_log", headers={"X-Request-ID": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123" and r.json() == {"cid": "abc-123"}
        assert lines(stream)[-1]["correlation_id"] == "abc-123"
        tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        r = client.get("/_log", headers={"traceparent": tp, "X-Request-ID": "bad id\nwith newline"})
        assert r.headers["x-request-id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
        r1, r2 = client.get("/healthz"), client.get("/healthz")
        ids = {r1.headers["x-request-id"], r2.headers["x-request-id"]}
        assert len(ids) == 2 and all(len(i) == 32 for i in ids)
    finally:
        logger.removeHandler(handler)


def test_the_gateway_api_echoes_the_request_id_and_makes_one_when_missing(sqlite_store: object) -> None:
    from fastapi.testclient import TestClient

    from gateway.api import create_app
    from gateway.config import Settings

    client = TestClient(create_app(Settings(api={"auth": False}), sqlite_store))
    assert client.get("/healthz", headers={"X-Request-ID": "req-42"}).headers["x-request-id"] == "req-42"
    made = client.get("/healthz").headers.get("x-request-id")
    assert made and made != "req-42"
    too_big = client.post("/v1/events", content=b"x" * 2_000_000, headers={"content-type": "application/json"})
    assert too_big.status_code == 413 and too_big.headers.get("x-request-id")
