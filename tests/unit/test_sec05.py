"""SEC-05: secrets never reach logs, stderr, HTTP error bodies or repr; AMQP transport rules.

Transport rules (``Settings._prod_transport_security``): outside the dev profile (test and prod) the
``guest`` broker user and plaintext ``amqp://`` are refused for non-loopback hosts, and an
``amqps://`` URL may not carry ``ssl_options`` (parsed by pika's URLParameters) that turn off
certificate or hostname verification; prod refuses ``guest`` on loopback too.
"""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path

import pika
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from gateway.api import create_app
from gateway.bus import bus_from_settings
from gateway.bus.pika_params import connection_parameters
from gateway.config import Settings, format_validation_error, load_settings
from gateway.errors import ConfigurationError
from gateway.store import EventStore
from gateway.store.engine import make_engine

SENTINEL = "sentinelPW7f3a9c2b"


def _bus(url: str, profile: str = "test") -> Settings:
    return Settings(profile=profile, bus={"url": url})


def _refused(url: str, match: str, profile: str = "test") -> None:
    with pytest.raises(ValidationError, match=match) as err:
        _bus(url, profile)
    # What operators see (load_settings, `gateway check`): the rule, never the URL or password.
    assert SENTINEL not in format_validation_error(err.value, "<config>")


def test_a_directly_built_settings_error_hides_the_password() -> None:
    with pytest.raises(ValidationError) as err:
        Settings(profile="test", bus={"url": f"amqp://gw:{SENTINEL}@h/"})  # the repr tail shows the password
    assert SENTINEL not in str(err.value)


# ------------------------------------------------------------------------------- guest
@pytest.mark.parametrize("profile", ["test", "prod"])
@pytest.mark.parametrize("url", [
    f"amqps://guest:{SENTINEL}@rabbit.example.internal:5671/%2F",
    "amqps://rabbit.example.internal/%2F",  # no user: pika logs in as guest
])
def test_guest_is_refused_for_a_remote_broker_outside_dev(profile: str, url: str) -> None:
    _refused(url, "refuses the 'guest' broker user", profile)


def test_guest_on_loopback_is_allowed_in_test_but_not_in_prod() -> None:
    url = f"amqp://guest:{SENTINEL}@127.0.0.1:5672/%2F"
    assert _bus(url, "test").bus.url is not None
    _refused(url, "profile prod refuses the 'guest' broker user", "prod")


# ------------------------------------------------------------------------- plaintext
@pytest.mark.parametrize("profile", ["test", "prod"])
@pytest.mark.parametrize("host", ["rabbit.example.internal", "10.0.0.5", "[2001:db8::1]"])
def test_plaintext_amqp_to_a_remote_host_is_refused_outside_dev(profile: str, host: str) -> None:
    _refused(f"amqp://gw:{SENTINEL}@{host}:5672/%2F", "refuses plaintext amqp://", profile)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "[::1]"])
def test_loopback_plaintext_is_allowed_in_test(host: str) -> None:
    assert _bus(f"amqp://gw:{SENTINEL}@{host}:5672/%2F", "test").profile == "test"
    assert _bus(f"amqp://guest:guest@{host}:5672/%2F", "test").profile == "test"


def test_dev_allows_everything() -> None:
    assert _bus(f"amqp://guest:{SENTINEL}@far.example/%2F?ssl_options={{'protocol':2}}", "dev").profile == "dev"


# ------------------------------------------------------------------------------ amqps
VERIFY_OFF = [
    # pika builds ssl.SSLContext(protocol): PROTOCOL_TLS (2) and PROTOCOL_TLS_SERVER verify nothing
    f"{{'protocol': {int(ssl.PROTOCOL_TLS)}}}",
    f"{{'protocol': {int(ssl.PROTOCOL_TLS_SERVER)}}}",
    # pika ignores these keys; whoever writes them means to turn verification off
    "{'cert_reqs': 0}",
    f"{{'cert_reqs': {int(ssl.CERT_OPTIONAL)}}}",
    "{'verify_mode': 0}",
    "{'check_hostname': False}",
    "None",  # pika: amqps with ssl_options=None (no TLS at all)
]


@pytest.mark.parametrize("profile", ["test", "prod"])
@pytest.mark.parametrize("opts", VERIFY_OFF)
def test_amqps_with_verification_turned_off_is_refused(profile: str, opts: str) -> None:
    url = f"amqps://gw:{SENTINEL}@rabbit.example.internal:5671/%2F?ssl_options={opts}"
    with pytest.raises(ValidationError) as err:
        _bus(url, profile)
    text = format_validation_error(err.value, "<config>")
    assert SENTINEL not in text
    assert ("requires TLS certificate and hostname verification" in text) or ("None disables TLS" in text)


@pytest.fixture
def ca_file(tmp_path: Path) -> str:
    """A CA bundle: pika's ssl_options need one of ca_certs/ca_path/ca_data."""
    trustme = pytest.importorskip("trustme")
    path = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


@pytest.mark.parametrize("opts", [
    "",
    f"?ssl_options={{'ca_certs': '{{ca}}', 'protocol': {int(ssl.PROTOCOL_TLS_CLIENT)}}}",
    ("?ssl_options={'ca_certs': '{ca}', 'server_hostname': 'rabbit.example.internal', 'cert_reqs': 2, "
     "'check_hostname': True}"),
])
def test_amqps_with_verification_is_accepted_and_pika_verifies(opts: str, ca_file: str) -> None:
    opts = opts.replace("{ca}", ca_file)
    settings = _bus(f"amqps://gw:{SENTINEL}@rabbit.example.internal:5671/%2F{opts}", "prod")
    context = connection_parameters(settings.bus).ssl_options.context  # what pika will really use
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


@pytest.mark.parametrize("opts", VERIFY_OFF[:2])
def test_the_refused_options_really_turn_verification_off_in_pika(opts: str, ca_file: str) -> None:
    """The rule is about pika's real behaviour, not a guess: these contexts verify nothing."""
    opts = opts[:-1] + f", 'ca_certs': '{ca_file}'}}"
    params = pika.URLParameters(f"amqps://gw:pw@rabbit.example.internal:5671/%2F?ssl_options={opts}")
    assert params.ssl_options.context.verify_mode == ssl.CERT_NONE and not params.ssl_options.context.check_hostname


def test_yaml_config_errors_name_the_rule_not_the_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMQP_PASSWORD", SENTINEL)
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("profile: test\nbus:\n  url: amqp://gw:${AMQP_PASSWORD}@rabbit.example.internal/%2F\n")
    with pytest.raises(ConfigurationError, match="refuses plaintext amqp://") as err:
        load_settings(cfg)
    assert SENTINEL not in str(err.value)


# --------------------------------------------------------------------------- sentinel
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_sentinel_password_never_reaches_logs_stderr_error_bodies_or_repr(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    db_port, amqp_port = _closed_port(), _closed_port()
    settings = Settings(
        profile="test",
        store={"url": f"postgresql+psycopg://gw:{SENTINEL}@127.0.0.1:{db_port}/gateway?connect_timeout=2"},
        bus={"url": f"amqp://gw:{SENTINEL}@127.0.0.1:{amqp_port}/%2F", "socket_timeout": 2.0},
        api={"key_secret": f"{SENTINEL}-{'k' * 32}"},
        governance={"pii": {"secret": f"{SENTINEL}-{'p' * 32}", "policies": []}},
    )
    seen: list[str] = []  # every text a user or operator could see
    caplog.set_level(logging.DEBUG)

    seen += [repr(settings), str(settings), settings.model_dump_json(), repr(settings.model_dump())]
    seen += [repr(settings.store), repr(settings.bus), repr(settings.api)]

    # The DB is down (closed port): the store, the API's auth lookup and /readyz all fail.
    engine = make_engine(settings.store.url.get_secret_value())
    store = EventStore(engine)
    with pytest.raises(Exception) as db_err:
        store.ping()
    seen += [str(db_err.value), repr(db_err.value), str(db_err.getrepr())]
    # The broker is down too: the bus's own connect fails.
    bus = bus_from_settings(settings.bus)
    try:
        with pytest.raises(Exception) as bus_err:
            bus.declare_topology()
        seen += [str(bus_err.value), repr(bus_err.value), str(bus_err.getrepr())]
        seen.append(repr(bus.health()))
        app = create_app(settings, store, bus)
        with TestClient(app, raise_server_exceptions=False) as client:
            answers = [
                client.get("/readyz"),
                client.get("/v1/events", headers={"Authorization": "Bearer gw_0123456789abcdef_" + "x" * 43}),
                client.post("/v1/events", json={"id": "x"}, headers={"Authorization": "Bearer gw_0123456789abcdef_y"}),
            ]
    finally:
        bus.close()
        engine.dispose()
    assert answers[0].status_code == 503, answers[0].text
    assert any(r.status_code >= 500 for r in answers[1:]), [r.status_code for r in answers]  # the store was hit
    seen += [f"{r.status_code} {r.headers} {r.text}" for r in answers]

    out = capsys.readouterr()
    seen += [out.out, out.err, caplog.text]
    seen += [f"{r.getMessage()} {r.args!r} {r.__dict__!r}" for r in caplog.records]
    assert caplog.records, "the failures above log something: the log check must not be vacuous"
    leaks = [text[:300] for text in seen if SENTINEL in text]
    assert not leaks, leaks
    assert "**********" in repr(settings.store) and "**********" in repr(settings.bus)


def test_the_sentinel_check_would_catch_a_leak(caplog: pytest.LogCaptureFixture) -> None:
    """Guards the test above: the same checks fail when a secret is logged or put in a body."""
    caplog.set_level(logging.DEBUG)
    settings = Settings(profile="test", store={"url": f"postgresql+psycopg://gw:{SENTINEL}@127.0.0.1:1/x"})
    logging.getLogger("gateway.test").debug("connecting to %s", settings.store.url.get_secret_value())
    assert SENTINEL in caplog.text
    assert SENTINEL not in repr(settings)



def test_the_legacy_brokers_of_bridges_and_queue_sources_follow_the_same_rule() -> None:
    bridge = {"name": "b", "types": ["#"], "url": "amqp://legacy:pw@mainframe.example/%2F", "routing_key": "q",
              "codec": {"format": "json"}, "fields": {"id": "data.id"}}
    with pytest.raises(ValidationError, match=r"bridges\[0\]\.url: profile test refuses plaintext amqp://"):
        Settings(profile="test", bridges=[bridge])
    source = {"name": "q", "adapter": "amqp", "config": {"url": "amqp://guest:guest@mq.example/%2F", "queue": "x"},
              "mapping": {"type": "t.x", "entity": "x", "key": ["id"]}}
    with pytest.raises(ValidationError, match=r"sources\[0\]\.config\.url: profile test refuses the 'guest'"):
        Settings(profile="test", sources=[source])
    ok = {**bridge, "url": "amqps://legacy:pw@mainframe.example:5671/%2F"}
    assert Settings(profile="test", bridges=[ok]).bridges[0].name == "b"
    assert Settings(profile="dev", bridges=[bridge]).bridges[0].name == "b"  # dev allows it
