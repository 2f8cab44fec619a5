"""How the SOAP adapter authenticates: HTTP basic, WS-Security UsernameToken, client TLS certificates.

:class:`SoapAuth` is the ``auth`` block of the adapter's configuration; :func:`configure` applies it
to the ``requests`` session and returns the zeep ``wsse`` object for ``zeep.Client(..., wsse=...)``.

Secrets reach the configuration only through ``${VAR}`` (or ``VAR_FILE``) interpolation and are
typed ``SecretStr``: they never appear in ``repr()``, logs or error messages. Validation errors of
this block never echo their input. Client keys must be unencrypted PEM files readable by the gateway
only (mode 0600): ``requests`` cannot pass a key password, and OpenSSL would otherwise ask for one on
the terminal.
"""

from __future__ import annotations

import copy
import logging
import os
import ssl
import stat
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import requests
import requests.adapters
import requests.auth
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    SecretStr,
    field_validator,
    model_validator,
)
from zeep.wsse import utils as wsse_utils
from zeep.wsse.username import UsernameToken

__all__ = ["SoapAuth", "TlsSettings", "configure"]

log = logging.getLogger("gateway.sources.soap")

#: Lifetime of the wsu:Timestamp sent with WS-Security messages (Created + 5 minutes = Expires).
TIMESTAMP_TTL = timedelta(minutes=5)


class _EncryptedKey(Exception):
    """Raised from the key-password callback: the key file is encrypted."""


def _refuse_password() -> str:
    raise _EncryptedKey


def _readable(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"no such file {path}")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    return str(path)


class TlsSettings(BaseModel):
    """TLS of the connection: the server's trust anchors and an optional client certificate."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    cert_file: str | None = Field(
        None, description="Client certificate (PEM); may also hold the private key. None: no client certificate."
    )
    key_file: str | None = Field(
        None,
        description="Private key of the client certificate (PEM, unencrypted, mode 0600); "
        "not needed when cert_file holds the key.",
    )
    ca_file: str | None = Field(
        None, description="CA bundle (PEM) to verify the server with (default: the bundle of requests, certifi)."
    )
    verify: bool = Field(
        True, description="Verify the server's certificate; false is insecure and logs a warning at start."
    )

    @field_validator("cert_file", "key_file", "ca_file")
    @classmethod
    def _file_exists(cls, v: str | None) -> str | None:
        return _readable(v)

    @model_validator(mode="after")
    def _loadable(self) -> TlsSettings:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("tls.key_file needs tls.cert_file")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.cert_file is not None:
            try:
                # The callback is only called for an encrypted key; it refuses, so OpenSSL never prompts.
                ctx.load_cert_chain(self.cert_file, self.key_file, password=_refuse_password)
            except _EncryptedKey:
                raise ValueError(
                    f"tls.key_file: the key in {self.key_file or self.cert_file} is encrypted; "
                    "encrypted keys are not supported (store it unencrypted with mode 0600)"
                ) from None
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(
                    f"tls.cert_file/key_file: cannot load the client certificate {self.cert_file}"
                    + (f" with key {self.key_file}" if self.key_file else "")
                    + f" (not PEM, no key, or a key that does not match): {getattr(exc, 'reason', None) or exc}"
                ) from None
        if self.ca_file is not None:
            try:
                ctx.load_verify_locations(cafile=self.ca_file)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(
                    f"tls.ca_file: {self.ca_file} is not a PEM CA bundle: {getattr(exc, 'reason', None) or exc}"
                ) from None
        return self


class SoapAuth(BaseModel):
    """How the adapter authenticates to the service.

    ``type`` chooses the credentials (none, HTTP basic, or a WS-Security UsernameToken in the SOAP
    header); ``tls`` adds a client certificate and the server's trust anchors, with any ``type``.
    """

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    type: Literal["none", "basic", "wsse"] = Field(
        "none", description="none; basic: HTTP basic auth; wsse: a WS-Security UsernameToken in the SOAP header."
    )
    username: str | None = Field(None, description="User name (basic, wsse).")
    password: SecretStr | None = Field(
        None, description="Password (basic, wsse); only through ${VAR} or VAR_FILE interpolation, never printed."
    )
    password_type: Literal["text", "digest"] = Field(
        "text",
        description="wsse only: text sends the password (use HTTPS); digest sends "
        "Base64(SHA-1(nonce + created + password)) with a fresh nonce.",
    )
    timestamp: bool = Field(
        True, description="wsse only: add a wsu:Timestamp (Created, Expires 5 minutes later) to every message."
    )
    tls: TlsSettings | None = Field(None, description="Client certificate and server verification (any type).")

    @model_validator(mode="after")
    def _credentials(self) -> SoapAuth:
        if self.type in ("basic", "wsse") and (
            not self.username or self.password is None or not self.password.get_secret_value()
        ):
            raise ValueError(f"auth type {self.type} needs username and password")
        wsse_only = {"password_type", "timestamp"} & self.model_fields_set
        if self.type != "wsse" and wsse_only:
            raise ValueError(f"auth.{', auth.'.join(sorted(wsse_only))}: only used with auth type wsse (type is {self.type})")
        return self

    # Defined after _credentials on purpose: pydantic runs it outermost, so _credentials (and every
    # field error) sees, and echoes in its error message, the masked input. hide_input_in_errors
    # alone does not help: pydantic honours it only on the outermost model (SoapConfig).
    @model_validator(mode="wrap")
    @classmethod
    def _mask_password(cls, data: Any, handler: ModelWrapValidatorHandler[SoapAuth]) -> SoapAuth:
        if isinstance(data, Mapping) and "password" in data:
            pw = data["password"]
            if isinstance(pw, str):
                data = {**data, "password": SecretStr(pw)}
            elif pw is not None and not isinstance(pw, SecretStr):
                data = {**data, "password": _Hidden()}  # a YAML number or list: refused, not echoed
        return handler(data)


class _Hidden:
    """Stands in for a password of the wrong type, so the type error does not print it."""

    def __repr__(self) -> str:
        return "<hidden: not a string; quote it in YAML>"


class _FreshUsernameToken(UsernameToken):  # type: ignore[misc]
    """zeep's UsernameToken, with a new wsu:Timestamp per message and the password kept secret.

    zeep's ``timestamp_token`` is one fixed element, stale after its lifetime: each message gets a
    copy of this token with a new Timestamp. The plain password exists only in that short-lived copy.
    """

    def __init__(self, username: str, password: SecretStr, *, use_digest: bool, timestamp: bool) -> None:
        super().__init__(username, None, use_digest=use_digest, zulu_timestamp=True)
        self._secret = password
        self._timestamp = timestamp

    def apply(self, envelope: Any, headers: Any) -> Any:
        token = copy.copy(self)
        token.password = self._secret.get_secret_value()
        if self._timestamp:
            now = datetime.now(UTC)
            token.timestamp_token = wsse_utils.WSU.Timestamp(
                wsse_utils.WSU.Created(wsse_utils.get_timestamp(now, zulu_timestamp=True)),
                wsse_utils.WSU.Expires(wsse_utils.get_timestamp(now + TIMESTAMP_TTL, zulu_timestamp=True)),
            )
        return UsernameToken.apply(token, envelope, headers)

    def __repr__(self) -> str:
        kind = "digest" if self.use_digest else "text"
        return f"UsernameToken(username={self.username!r}, password_type={kind!r}, timestamp={self._timestamp})"


class _PinnedTls(requests.adapters.HTTPAdapter):
    """Sends with the configured ``verify`` and ``cert`` whatever the environment says.

    With ``trust_env`` on (``use_env_proxies: true``), requests lets ``REQUESTS_CA_BUNDLE`` or
    ``CURL_CA_BUNDLE`` replace ``session.verify`` on every request; ``auth.tls`` must win.
    """

    def __init__(self, verify: bool | str, cert: str | tuple[str, str] | None) -> None:
        super().__init__()
        self._verify, self._cert = verify, cert

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        kwargs["verify"], kwargs["cert"] = self._verify, self._cert
        return super().send(request, **kwargs)


def _warn_if_key_readable_by_others(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # validated at config time; open() reports a vanished file
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "TLS key file %s is readable by group or others (mode %o); restrict it to the gateway user (chmod 600)",
            path, stat.S_IMODE(mode),
        )


def configure(session: requests.Session, auth: SoapAuth) -> Any:
    """Apply ``auth`` to ``session`` and return the zeep ``wsse`` object (or ``None``).

    Sets ``session.auth`` (basic), ``session.cert`` and ``session.verify`` (tls). Logs a warning
    when server verification is off, or when the private key is readable by group or others.

    Args:
        session: the session of the adapter's transport (used for the WSDL and every call).
        auth: the validated ``auth`` settings.

    Returns:
        The object to pass as ``zeep.Client(..., wsse=...)``: a UsernameToken for type ``wsse``,
        else ``None``.
    """
    if auth.type == "basic":
        assert auth.username is not None and auth.password is not None  # validated
        session.auth = requests.auth.HTTPBasicAuth(auth.username, auth.password.get_secret_value())
    tls = auth.tls
    if tls is not None:
        if tls.cert_file is not None:
            session.cert = (tls.cert_file, tls.key_file) if tls.key_file else tls.cert_file
            _warn_if_key_readable_by_others(tls.key_file or tls.cert_file)
        if not tls.verify:
            log.warning("TLS verification of the server is OFF (auth.tls.verify: false): the connection is not secure")
            session.verify = False
        elif tls.ca_file is not None:
            session.verify = tls.ca_file
        session.mount("https://", _PinnedTls(session.verify, session.cert))
    if auth.type == "wsse":
        assert auth.username is not None and auth.password is not None  # validated
        return _FreshUsernameToken(
            auth.username, auth.password, use_digest=auth.password_type == "digest", timestamp=auth.timestamp
        )
    return None
