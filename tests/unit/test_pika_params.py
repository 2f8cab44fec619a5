"""pika connection hygiene without a broker (REL-10): parameters, backoff, thread guard, offline behaviour."""

from __future__ import annotations

import threading
import time

import pika
import pytest
from pydantic import SecretStr

from gateway.bus import Message, Outcome, Topology
from gateway.bus.pika_consumer import PikaConsumer
from gateway.bus.pika_params import (
    THREAD_GUARD_ENV,
    Backoff,
    ThreadOwnershipError,
    connection_parameters,
    guard,
    guard_enabled,
    redact,
)
from gateway.bus.pika_publisher import PikaPublisher
from gateway.bus.rabbitmq import RabbitBus
from gateway.config import BusSettings
from gateway.errors import ConfigurationError

SENTINEL = "S3ntinel-Pw-77"


def _settings(url: str = f"amqp://gw:{SENTINEL}@broker.example:5673/prod", **kw: object) -> BusSettings:
    return BusSettings(url=SecretStr(url), **kw)  # type: ignore[arg-type]


def test_connection_parameters_from_settings() -> None:
    s = _settings(heartbeat=17, blocked_connection_timeout=42.0, socket_timeout=7.0)
    p = connection_parameters(s, "gw-publisher-1")
    assert isinstance(p, pika.URLParameters)
    assert (p.host, p.port, p.virtual_host) == ("broker.example", 5673, "prod")
    assert p.credentials.username == "gw" and p.credentials.password == SENTINEL
    assert p.heartbeat == 17
    assert p.blocked_connection_timeout == 42.0
    assert p.socket_timeout == 7.0
    assert p.stack_timeout == 12.0
    assert p.connection_attempts == 1
    assert p.client_properties["connection_name"] == "gw-publisher-1"
    assert SENTINEL not in repr(p)


def test_connection_parameters_defaults_are_explicit() -> None:
    p = connection_parameters(_settings("amqp://guest:guest@127.0.0.1:5672/%2F"))
    assert p.heartbeat == 30 and p.blocked_connection_timeout == 60.0
    assert p.socket_timeout == 10.0 and p.stack_timeout == 15.0
    assert p.virtual_host == "/"


def test_missing_or_bad_url_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="bus.url"):
        connection_parameters(BusSettings())
    with pytest.raises(ConfigurationError) as err:
        connection_parameters(_settings(f"http://gw:{SENTINEL}@host/"))
    assert SENTINEL not in str(err.value)
    with pytest.raises(ConfigurationError):
        RabbitBus(BusSettings(), Topology("gw"))


def test_redact_removes_password_and_url() -> None:
    s = _settings(f"amqp://gw:{SENTINEL}@host/%2F")
    text = redact(f"failed amqp://gw:{SENTINEL}@host/%2F and {SENTINEL}", s)
    assert SENTINEL not in text and "<amqp-url>" in text
    assert redact("plain", None) == "plain"


def test_backoff_is_jittered_exponential_and_capped() -> None:
    b = Backoff(cap=1.0, base=0.1)
    delays = [b.next_delay() for _ in range(8)]
    for n, d in enumerate(delays):
        ceiling = min(1.0, 0.1 * 2**n)
        assert ceiling / 2 <= d <= ceiling
    assert max(delays) <= 1.0
    b.reset()
    assert b.next_delay() <= 0.1


def test_thread_guard_allows_owner_and_rejects_other_threads() -> None:
    target = type("T", (), {"value": 1, "call": lambda self: "ok"})()
    g = guard(target, True, "obj")
    assert g.call() == "ok" and g.value == 1
    g.value = 2
    errors: list[BaseException] = []

    def other() -> None:
        for action in (lambda: g.call(), lambda: setattr(g, "value", 3)):
            try:
                action()
            except ThreadOwnershipError as exc:
                errors.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert len(errors) == 2 and "I/O thread" in str(errors[0])
    assert target.value == 2
    assert guard(target, False, "obj") is target


def test_thread_guard_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(THREAD_GUARD_ENV, raising=False)
    assert guard_enabled() is False
    monkeypatch.setenv(THREAD_GUARD_ENV, "1")
    assert guard_enabled() is True
    assert guard_enabled(False) is False


def _offline(**kw: object) -> BusSettings:
    # Port 1 on loopback: connection refused at once, no broker needed.
    return _settings(f"amqp://gw:{SENTINEL}@127.0.0.1:1/%2F", reconnect_max_delay=0.2, **kw)


def test_publisher_without_broker_resolves_lost_within_timeout() -> None:
    s = _offline(publish_timeout=0.3)
    pub = PikaPublisher(s, Topology.from_settings(s), thread_guard=True)
    pub.start(wait=0.2)
    assert not pub.ready and not pub.blocked
    started = time.monotonic()
    out = pub.publish("gateway.events", [Message(b"x", "a.b", "1")]).result(5)
    assert out == [Outcome.LOST]
    assert time.monotonic() - started < 3
    assert pub.last_error and SENTINEL not in pub.last_error
    pending = pub.publish("gateway.events", [Message(b"y", "a.b", "2")])
    pub.close()
    pub.close()
    assert pending.result(5) == [Outcome.LOST]


def test_consumer_without_broker_returns_empty_batches_and_closes() -> None:
    s = _offline()
    con = PikaConsumer(s, Topology.from_settings(s), "gateway.scoring", 10, thread_guard=True)
    con.start(wait=0.2)
    assert con.get_batch(10, 0.2, 0.01) == []
    con.close()
    con.close()
    assert con.get_batch(10, 5.0, 0.01) == []  # closed: returns at once


def test_health_of_unreachable_broker_hides_password() -> None:
    bus = RabbitBus(_offline(), Topology("gw"))
    h = bus.health()
    assert not h.ok and h.kind == "rabbitmq" and SENTINEL not in h.detail
    bus.close()
