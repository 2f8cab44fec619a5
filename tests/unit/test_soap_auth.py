"""SOAP adapter authentication: WS-Security UsernameToken and client TLS certificates.

Real HTTP(S) over loopback against the SOAP simulator; TLS material comes from ``trustme``.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import trustme
from cryptography.hazmat.primitives import serialization
from lxml import etree
from pydantic import ValidationError

from adapters.soap import SoapSource
from adapters.soap.auth import SoapAuth
from adapters.soap.simulator import SoapSimulator
from adapters.soap.simulator.server import PASSWORD_DIGEST, PASSWORD_TEXT, WSSE, WSU
from adapters.soap.source import SoapFaultError
from gateway.errors import ConfigurationError, TransientError
from tests.unit.test_soap_source import soap_config

PASSWORD = "pw-Secret-4711"
WRONG = "wrong-pw-0815"
NS = {"wsse": WSSE, "wsu": WSU}


# ---------------------------------------------------------------------------- helpers
def source(cfg: dict[str, Any]) -> SoapSource:
    return SoapSource(SoapSource.parse_config(cfg), source_name="legacy-orders")  # type: ignore[arg-type]


def fetch_all(cfg: dict[str, Any]) -> list[Any]:
    src = source(cfg)
    try:
        src.open()
        return src.fetch(None, 100).records
    finally:
        src.close()


def fails(cfg: dict[str, Any]) -> ConfigurationError:
    """Open and fetch; the ConfigurationError raised (anything else fails the test)."""
    src = source(cfg)
    try:
        with pytest.raises(ConfigurationError) as ei:
            src.open()
            src.fetch(None, 100)
    finally:
        src.close()
    return ei.value


def token_of(body: bytes) -> etree._Element:
    doc = etree.fromstring(body, etree.XMLParser(resolve_entities=False, no_network=True))
    found = doc.findall(".//wsse:Security/wsse:UsernameToken", NS)
    assert len(found) == 1
    return found[0]


def wsse(password_type: str, password: str = PASSWORD, **more: Any) -> dict[str, Any]:
    return {"type": "wsse", "username": "gateway", "password": password, "password_type": password_type, **more}


@pytest.fixture
def sim() -> Iterator[SoapSimulator]:
    before = set(threading.enumerate())
    with SoapSimulator() as s:
        s.add_orders(3)
        yield s
    assert not [t for t in threading.enumerate() if t not in before and t.is_alive()]


# ---------------------------------------------------------------------------- WS-Security
@pytest.mark.parametrize("port", ["LegacyOrdersSoap11Port", "LegacyOrdersSoap12Port"])
def test_wsse_text_succeeds(sim: SoapSimulator, port: str) -> None:
    sim.require_wsse("gateway", PASSWORD, digest=False)
    assert len(fetch_all(soap_config(sim, port=port, auth=wsse("text")))) == 3
    assert sim.auth_failures == [] and sim.calls == 1
    token = token_of(sim.last_body or b"")
    assert token.find("wsse:Password", NS).get("Type") == PASSWORD_TEXT  # type: ignore[union-attr]
    # timestamp: true (the default) adds a fresh wsu:Timestamp, 5 minutes long.
    created = token.getparent().findtext("wsu:Timestamp/wsu:Created", namespaces=NS)  # type: ignore[union-attr]
    expires = token.getparent().findtext("wsu:Timestamp/wsu:Expires", namespaces=NS)  # type: ignore[union-attr]
    assert created and expires and created.endswith("Z")
    when = datetime.fromisoformat(created)
    assert abs(datetime.now(UTC) - when) < timedelta(minutes=1)
    assert datetime.fromisoformat(expires) - when == timedelta(minutes=5)


@pytest.mark.parametrize("port", ["LegacyOrdersSoap11Port", "LegacyOrdersSoap12Port"])
def test_wsse_digest_succeeds_and_the_digest_follows_the_profile(sim: SoapSimulator, port: str) -> None:
    sim.require_wsse("gateway", PASSWORD, digest=True)
    src = source(soap_config(sim, port=port, auth=wsse("digest")))
    assert len(src.fetch(None, 100).records) == 3
    first = sim.last_body or b""
    src.fetch(None, 100)
    second = sim.last_body or b""
    src.close()
    assert sim.auth_failures == [] and sim.calls == 2  # the simulator verified both digests
    token = token_of(first)
    pw = token.find("wsse:Password", NS)
    assert pw is not None and pw.get("Type") == PASSWORD_DIGEST
    nonce, created = token.findtext("wsse:Nonce", namespaces=NS), token.findtext("wsu:Created", namespaces=NS)
    assert nonce and created
    # Recomputed here, independently of the simulator: Base64(SHA-1(nonce + created + password)).
    expected = base64.b64encode(hashlib.sha1(base64.b64decode(nonce) + created.encode() + PASSWORD.encode()).digest())
    assert pw.text == expected.decode()
    assert PASSWORD.encode() not in first
    # Every message has its own nonce.
    assert token_of(second).findtext("wsse:Nonce", namespaces=NS) != nonce


@pytest.mark.parametrize("port", ["LegacyOrdersSoap11Port", "LegacyOrdersSoap12Port"])
@pytest.mark.parametrize("password_type", ["text", "digest"])
def test_wrong_password_is_a_configuration_error_without_the_password(
    sim: SoapSimulator, port: str, password_type: str, caplog: pytest.LogCaptureFixture
) -> None:
    sim.require_wsse("gateway", PASSWORD)
    caplog.set_level(logging.DEBUG)
    err = fails(soap_config(sim, port=port, auth=wsse(password_type, WRONG)))
    assert "rejected the credentials" in str(err) and "FailedAuthentication" in str(err)
    assert not isinstance(err, (SoapFaultError, TransientError))
    assert WRONG not in str(err) and WRONG not in repr(err) and WRONG not in str(err.__cause__)
    assert WRONG not in caplog.text
    assert sim.auth_failures == ["wrong username or password"] and sim.calls == 0


def test_digest_required_but_text_sent_is_rejected(sim: SoapSimulator) -> None:
    sim.require_wsse("gateway", PASSWORD, digest=True)
    assert "rejected the credentials" in str(fails(soap_config(sim, auth=wsse("text"))))
    sim.require_wsse("gateway", PASSWORD, digest=False)
    assert "rejected the credentials" in str(fails(soap_config(sim, auth=wsse("digest"))))
    assert sim.auth_failures == ["PasswordDigest required", "PasswordText required"]


def test_replayed_nonce_is_rejected(sim: SoapSimulator) -> None:
    sim.require_wsse("gateway", PASSWORD, digest=True)
    assert len(fetch_all(soap_config(sim, auth=wsse("digest")))) == 3
    captured = sim.last_body
    assert captured is not None
    resp = requests.post(sim.endpoint, data=captured, headers={"Content-Type": "text/xml; charset=utf-8"}, timeout=5)
    assert resp.status_code == 500 and b"wsse:FailedAuthentication" in resp.content
    assert sim.auth_failures == ["replayed nonce"] and sim.calls == 1


def test_stale_created_is_rejected(sim: SoapSimulator) -> None:
    sim.require_wsse("gateway", PASSWORD, digest=True)
    sim.clock = lambda: datetime.now(UTC) + timedelta(minutes=6)  # the message is 6 minutes old on arrival
    fails(soap_config(sim, auth=wsse("digest")))
    assert sim.auth_failures == ["stale Created"]


def test_wsdl_loads_without_wsse_and_the_token_repr_hides_the_password(sim: SoapSimulator) -> None:
    sim.require_wsse("gateway", PASSWORD)
    src = source(soap_config(sim, auth=wsse("digest")))
    src.open()  # the WSDL GET carries no SOAP header and is not refused
    assert PASSWORD not in repr(src.client.wsse) and PASSWORD not in repr(vars(src.client.wsse))
    src.close()


# ---------------------------------------------------------------------------- TLS
@dataclass
class Pki:
    ca_file: str
    cert_file: str
    key_file: str
    combined_file: str
    other_ca_file: str
    server_ctx: ssl.SSLContext


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    client = ca.issue_cert("gateway.example.com")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED  # client certificates are required ...
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    ctx.load_verify_locations(cafile=str(d / "ca.pem"))  # ... and must come from our CA
    other.cert_pem.write_to_path(str(d / "other-ca.pem"))
    client.cert_chain_pems[0].write_to_path(str(d / "client.crt"))
    client.private_key_pem.write_to_path(str(d / "client.key"))
    client.private_key_and_cert_chain_pem.write_to_path(str(d / "client.pem"))
    for name in ("client.key", "client.pem"):
        (d / name).chmod(0o600)
    return Pki(str(d / "ca.pem"), str(d / "client.crt"), str(d / "client.key"), str(d / "client.pem"),
               str(d / "other-ca.pem"), ctx)


@pytest.fixture
def tls_sim(pki: Pki) -> Iterator[SoapSimulator]:
    before = set(threading.enumerate())
    with SoapSimulator(tls=pki.server_ctx) as s:
        s.add_orders(3)
        yield s
    assert not [t for t in threading.enumerate() if t not in before and t.is_alive()]


def test_client_certificate_fetches_records(tls_sim: SoapSimulator, pki: Pki) -> None:
    assert tls_sim.wsdl_url.startswith("https://127.0.0.1:")
    tls = {"cert_file": pki.cert_file, "key_file": pki.key_file, "ca_file": pki.ca_file}
    assert len(fetch_all(soap_config(tls_sim, auth={"tls": tls}))) == 3
    # The key may also sit in the certificate file.
    assert len(fetch_all(soap_config(tls_sim, auth={"tls": {"cert_file": pki.combined_file, "ca_file": pki.ca_file}}))) == 3
    assert tls_sim.tls_failures == []


def test_client_certificate_combines_with_wsse_digest(tls_sim: SoapSimulator, pki: Pki) -> None:
    tls_sim.require_wsse("gateway", PASSWORD, digest=True)
    tls = {"cert_file": pki.combined_file, "ca_file": pki.ca_file}
    assert len(fetch_all(soap_config(tls_sim, auth=wsse("digest", tls=tls)))) == 3
    assert tls_sim.auth_failures == [] and tls_sim.tls_failures == []


def test_without_the_client_certificate_tls_fails_as_a_configuration_error(tls_sim: SoapSimulator, pki: Pki) -> None:
    err = fails(soap_config(tls_sim, auth={"tls": {"ca_file": pki.ca_file}}))
    assert "TLS" in str(err) and "cert_file" in str(err)  # not a retried TransientError
    assert tls_sim.tls_failures and tls_sim.calls == 0


def test_unknown_server_ca_fails_certificate_verification(tls_sim: SoapSimulator, pki: Pki) -> None:
    err = fails(soap_config(tls_sim, auth={"tls": {"cert_file": pki.combined_file, "ca_file": pki.other_ca_file}}))
    assert "TLS" in str(err) and "certificate verification" in str(err) and "ca_file" in str(err)
    # Without ca_file, the default trust (requests' bundle) does not know the test CA either.
    err = fails(soap_config(tls_sim, auth={"tls": {"cert_file": pki.combined_file}}))
    assert "certificate verification" in str(err)


def test_verify_false_is_allowed_with_a_warning(tls_sim: SoapSimulator, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.sources.soap")
    assert len(fetch_all(soap_config(tls_sim, auth={"tls": {"cert_file": pki.combined_file, "verify": False}}))) == 3
    assert "verification of the server is OFF" in caplog.text


def test_ca_file_wins_over_the_ca_bundle_environment(
    tls_sim: SoapSimulator, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With use_env_proxies, requests would let REQUESTS_CA_BUNDLE replace the configured ca_file.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", pki.other_ca_file)
    tls = {"cert_file": pki.combined_file, "ca_file": pki.ca_file}
    assert len(fetch_all(soap_config(tls_sim, use_env_proxies=True, auth={"tls": tls}))) == 3


def test_group_readable_key_logs_a_warning(pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from adapters.soap.auth import configure

    loose = tmp_path / "loose.key"
    loose.write_bytes(Path(pki.key_file).read_bytes())
    loose.chmod(0o640)
    caplog.set_level(logging.WARNING, logger="gateway.sources.soap")
    with requests.Session() as session:
        configure(session, SoapAuth.model_validate({"tls": {"cert_file": pki.cert_file, "key_file": pki.key_file}}))
        assert "readable by group or others" not in caplog.text
        assert session.cert == (pki.cert_file, pki.key_file)
        configure(session, SoapAuth.model_validate({"tls": {"cert_file": pki.cert_file, "key_file": str(loose)}}))
    assert "readable by group or others" in caplog.text and str(loose) in caplog.text


# ---------------------------------------------------------------------------- configuration
BASE = {"wsdl": "x.wsdl", "operation": "Op", "records_path": "r", "key_field": "id", "time_field": "t"}


def invalid(auth: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as ei:
        SoapSource.parse_config({**BASE, "auth": auth})
    return str(ei.value)


def test_missing_credentials_name_the_type() -> None:
    for auth in ({"type": "wsse", "password": PASSWORD}, {"type": "wsse", "username": "u"},
                 {"type": "wsse", "username": "u", "password": ""}):
        text = invalid(auth)
        assert "auth type wsse needs username and password" in text and "auth" in text
        assert PASSWORD not in text  # the input is not echoed
    assert "auth.password_type: only used with auth type wsse" in invalid(
        {"type": "basic", "username": "u", "password": PASSWORD, "password_type": "digest"}
    )
    assert "password_type" in invalid(wsse("plain"))
    # An unquoted numeric password from YAML is refused without being echoed.
    text = invalid({"type": "wsse", "username": "u", "password": 98765432})
    assert "auth.password" in text and "98765432" not in text


def test_missing_or_unusable_files_name_the_field_and_path(pki: Pki, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    for field in ("cert_file", "key_file", "ca_file"):
        tls = {"cert_file": pki.cert_file, field: missing}
        text = invalid({"tls": tls})
        assert f"auth.tls.{field}" in text and f"no such file {missing}" in text
    assert "key_file needs tls.cert_file" in invalid({"tls": {"key_file": pki.key_file}})
    # A certificate without its key, a key that is not PEM, a CA file that is not PEM.
    assert "cannot load the client certificate" in invalid({"tls": {"cert_file": pki.cert_file}})
    junk = tmp_path / "junk.pem"
    junk.write_text("not a pem")
    assert "tls.ca_file" in invalid({"tls": {"ca_file": str(junk)}})
    # An encrypted key: refused clearly (requests cannot pass its password; OpenSSL would prompt).
    key = serialization.load_pem_private_key(Path(pki.key_file).read_bytes(), password=None)
    enc = tmp_path / "enc.key"
    enc.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"kpw")
    ))
    assert "is encrypted" in invalid({"tls": {"cert_file": pki.cert_file, "key_file": str(enc)}})


def test_repr_and_str_never_show_the_password(pki: Pki) -> None:
    tls = {"cert_file": pki.cert_file, "key_file": pki.key_file}
    for auth in (wsse("digest", tls=tls), {"type": "basic", "username": "u", "password": PASSWORD}):
        cfg = SoapSource.parse_config({**BASE, "auth": auth})
        for text in (repr(cfg), str(cfg), repr(cfg.auth), str(cfg.auth), cfg.model_dump_json()):  # type: ignore[attr-defined]
            assert PASSWORD not in text
