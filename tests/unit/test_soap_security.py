"""SEC-01: the SOAP adapter refuses hostile XML quickly, loads nothing, and leaks no payload."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import lxml
import pytest

from adapters.soap import SoapSource
from adapters.soap.simulator import SoapSimulator
from gateway.errors import PermanentError
from tests.unit.test_soap_source import soap_config

SECRET = "TOP-SECRET-MARKER-7f3a9c"
PAYLOAD = "PAYLOAD-MARKER-b81e"
ENV_OPEN = (
    '<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/" xmlns:tns="urn:legacy:orders">'
    "<soap:Body><tns:GetOrdersSinceResponse><tns:orders><tns:id>1</tns:id><tns:customer>"
)
ENV_CLOSE = (
    "</tns:customer><tns:amount>1</tns:amount><tns:status>NEW</tns:status>"
    "<tns:updatedAt>2024-01-01T00:00:00Z</tns:updatedAt></tns:orders>"
    "</tns:GetOrdersSinceResponse></soap:Body></soap:Envelope>"
)


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    p = tmp_path / "secret.txt"
    p.write_text(SECRET)
    return p


@pytest.fixture
def sim() -> Iterator[SoapSimulator]:
    with SoapSimulator() as s:
        yield s


def _xxe_file(sim: SoapSimulator, secret: Path) -> bytes:
    return (f'<?xml version="1.0"?><!DOCTYPE soap:Envelope [<!ENTITY xxe SYSTEM "{secret.as_uri()}">]>'
            f"{ENV_OPEN}{PAYLOAD}&xxe;{ENV_CLOSE}").encode()


def _xxe_http(sim: SoapSimulator, secret: Path) -> bytes:
    return (f'<?xml version="1.0"?><!DOCTYPE soap:Envelope [<!ENTITY xxe SYSTEM "{sim.base_url}/evil-entity">]>'
            f"{ENV_OPEN}{PAYLOAD}&xxe;{ENV_CLOSE}").encode()


def _billion_laughs(sim: SoapSimulator, secret: Path) -> bytes:
    ents = ['<!ENTITY lol0 "lol">'] + [f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10)]
    return (f'<?xml version="1.0"?><!DOCTYPE soap:Envelope [{"".join(ents)}]>'
            f"{ENV_OPEN}{PAYLOAD}&lol9;{ENV_CLOSE}").encode()


def _external_dtd(sim: SoapSimulator, secret: Path) -> bytes:
    return (f'<?xml version="1.0"?><!DOCTYPE soap:Envelope SYSTEM "{sim.base_url}/evil.dtd">'
            f"{ENV_OPEN}{PAYLOAD}{ENV_CLOSE}").encode()


def _deep(sim: SoapSimulator, secret: Path) -> bytes:
    n = 100_000
    return (ENV_OPEN + PAYLOAD + "<x>" * n + "</x>" * n + ENV_CLOSE).encode()


def _huge_text(sim: SoapSimulator, secret: Path) -> bytes:
    return (ENV_OPEN + PAYLOAD + "A" * (20 * 1024 * 1024) + ENV_CLOSE).encode()


ATTACKS: dict[str, Callable[[SoapSimulator, Path], bytes]] = {
    "xxe-file": _xxe_file,
    "xxe-http": _xxe_http,
    "billion-laughs": _billion_laughs,
    "external-dtd": _external_dtd,
    "deep-nesting-100k": _deep,
    "text-node-20mb": _huge_text,
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attack_is_refused_fast_without_loads_or_leaks(
    attack: str, sim: SoapSimulator, secret_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    src = SoapSource(SoapSource.parse_config(soap_config(sim)), source_name="legacy-orders")  # type: ignore[arg-type]
    src.open()
    transport = src.transport
    loads, refused = list(transport.loads), list(transport.refused)
    requests_before = list(sim.requests)
    sim.serve_raw(ATTACKS[attack](sim, secret_file))
    t0 = time.monotonic()
    with pytest.raises(PermanentError) as ei:
        src.fetch(None, 10)
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0, f"{attack} took {elapsed:.2f}s"
    err = ei.value
    assert "hardened XML parser" in str(err)
    # Nothing was loaded: no document through the transport, no request to the simulator but the call.
    assert transport.loads == loads and transport.refused == refused
    assert sim.requests[len(requests_before):] == [("POST", "/soap")]
    # No trace of the payload or the secret: message, chained errors, logs.
    chain = [err, err.__cause__, err.__context__]
    text = " ".join(repr(e) + str(e) for e in chain if e is not None) + caplog.text
    assert SECRET not in text and PAYLOAD not in text
    assert err.__cause__ is None
    src.close()


def test_loads_outside_the_wsdl_location_are_refused_and_recorded(sim: SoapSimulator, tmp_path: Path) -> None:
    src = SoapSource(SoapSource.parse_config(soap_config(sim)), source_name="s")  # type: ignore[arg-type]
    src.open()
    t = src.transport
    for url in ("http://169.254.169.254/latest/meta-data/", "file:///etc/passwd", "/etc/passwd", sim.base_url.replace("127.0.0.1", "localhost") + "/x"):
        with pytest.raises(Exception, match="refused to load"):
            t.load(url)
    assert len(t.refused) == 4 and t.loads == [sim.wsdl_url.replace("/?wsdl", "/")]
    src.close()


def test_dependency_floor_and_mandatory_operation_timeout(sim: SoapSimulator) -> None:
    major, minor = (int(x) for x in lxml.__version__.split(".")[:2])
    assert (major, minor) >= (6, 1), lxml.__version__
    src = SoapSource(SoapSource.parse_config(soap_config(sim)), source_name="s")  # type: ignore[arg-type]
    src.open()
    assert src.transport.operation_timeout is not None and src.transport.operation_timeout > 0
    s = src.client.settings
    assert (s.strict, s.xml_huge_tree, s.forbid_dtd, s.forbid_entities, s.forbid_external) == (True, False, True, True, True)
    src.close()
