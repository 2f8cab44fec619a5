"""Polling a legacy SOAP operation with zeep, hardened (SEC-01) and always under a timeout.

Each :meth:`SoapSource.fetch` makes one call of the configured operation and returns one page as a
:class:`~adapters.base.Batch`. The cursor holds the last record's ``(time, key)`` and, while a scan
is being paged, the page token and the scan's starting point, so a restart in the middle of paging
resumes at the next page: no loss and no duplicates.

Security: the zeep client parses with DTDs, entities and huge trees forbidden, and its transport
loads documents (WSDL, XSD) only below the configured WSDL's own location; every refused load is
recorded. Error messages about rejected XML never contain the payload.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import time
from collections import deque
from collections.abc import Mapping
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlparse

import requests
import requests.auth
from lxml import etree
from zeep import Client, Settings
from zeep import exceptions as zx
from zeep.helpers import serialize_object
from zeep.transports import Transport
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from adapters.base import Batch, PollingSource, Record, SourceConfig
from gateway.errors import ConfigurationError, GatewayError, PermanentError, TransientError
from gateway.events import jsonable, parse_time, to_utc

__all__ = [
    "GuardedTransport",
    "LoadRefused",
    "SoapAuth",
    "SoapConfig",
    "SoapFaultError",
    "SoapSource",
    "SoapTimeouts",
    "to_plain",
]

log = logging.getLogger("gateway.sources.soap")

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_KNOWN = frozenset({"cursor.time", "cursor.key", "page_token", "page_size"})
_TRANSIENT_HTTP = frozenset({408, 429, 502, 503, 504})


# ---------------------------------------------------------------------------- configuration
class SoapTimeouts(BaseModel):
    """Timeouts of every network call; none of them can be switched off."""

    model_config = ConfigDict(extra="forbid")

    connect: float = Field(5.0, gt=0, le=300, description="Seconds to establish a TCP/TLS connection.")
    read: float = Field(30.0, gt=0, le=3600, description="Seconds to wait for each chunk of a response.")
    operation: float = Field(
        60.0, gt=0, le=3600,
        description="Most seconds one SOAP call (connect, send, whole response) may take; never unlimited.",
    )


class SoapAuth(BaseModel):
    """How the adapter authenticates to the service."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["none", "basic"] = Field("none", description="none, or HTTP basic auth.")
    username: str | None = Field(None, description="User name (basic).")
    password: SecretStr | None = Field(None, description="Password (basic); use ${ENV} interpolation.")

    @model_validator(mode="after")
    def _basic_needs_credentials(self) -> SoapAuth:
        if self.type == "basic" and (not self.username or self.password is None):
            raise ValueError("auth type basic needs username and password")
        return self


def _check_placeholders(value: Any, where: str) -> None:
    if isinstance(value, str):
        for name in _PLACEHOLDER.findall(value):
            if name not in _KNOWN:
                raise ValueError(
                    f"arguments.{where}: unknown placeholder {{{name}}} (known: "
                    + ", ".join("{" + k + "}" for k in sorted(_KNOWN)) + ")"
                )
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _check_placeholders(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_placeholders(v, f"{where}[{i}]")


class SoapConfig(SourceConfig):
    """Settings of the ``soap`` adapter."""

    wsdl: str = Field(..., description="WSDL location: a file path (a vendored copy, preferred) or an http(s) URL.")
    service: str | None = Field(None, description="Service name in the WSDL (default: the first).")
    port: str | None = Field(None, description="Port name of the service (default: the first).")
    endpoint: str | None = Field(None, description="Endpoint URL overriding the port's soap:address.")
    operation: str = Field(..., description="Operation to call on each poll.")
    arguments: dict[str, Any] = Field(
        default_factory=dict,
        description="Operation arguments. String values may contain {cursor.time}, {cursor.key}, "
        "{page_token} and {page_size}; a value that is exactly one placeholder gets the raw value "
        "(None when unset, which omits an optional element).",
    )
    records_path: str = Field(..., description="Dotted path of the record list in the response, e.g. 'orders'.")
    next_page_token_path: str | None = Field(
        None, description="Dotted path of the next-page token in the response (none: no token paging)."
    )
    key_field: str = Field(..., description="Record field with the unique key (cursor tie-breaker).")
    time_field: str = Field(..., description="Record field with the last-change time (cursor).")
    page_size: int = Field(100, ge=1, le=10_000, description="Records asked for per call ({page_size}).")
    start_time: str = Field(
        "1970-01-01T00:00:00Z", description="{cursor.time} of a source that never ran (RFC 3339)."
    )
    auth: SoapAuth = Field(default_factory=SoapAuth, description="Authentication.")
    timeouts: SoapTimeouts = Field(default_factory=SoapTimeouts, description="Connect, read and operation timeouts.")
    strict: bool = Field(
        True, description="Strict XML/schema parsing; false parses non-conformant responses leniently "
        "and flags their records as lenient.",
    )
    transient_fault_codes: list[str] = Field(
        default_factory=list,
        description="Fault codes (faultcode local name or detail errorCode) to retry like transient errors.",
    )
    max_response_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024, description="Largest response body accepted."
    )
    use_env_proxies: bool = Field(False, description="Honour HTTP(S)_PROXY/NO_PROXY from the environment.")

    @field_validator("arguments")
    @classmethod
    def _placeholders(cls, v: dict[str, Any]) -> dict[str, Any]:
        _check_placeholders(v, "")
        return v

    @field_validator("start_time")
    @classmethod
    def _start_time(cls, v: str) -> str:
        parse_time(v)
        return v


# ---------------------------------------------------------------------------- errors
class SoapFaultError(PermanentError):
    """A SOAP fault that is a business answer: retrying cannot help.

    Attributes:
        fault_code: the fault code (``soap:Client``, ``soap:Sender`` ...).
        fault_string: the fault text.
        detail_code: the ``errorCode`` (or first element text) of the fault detail, if any.
    """

    def __init__(self, message: str, *, fault_code: str | None, fault_string: str | None, detail_code: str | None) -> None:
        super().__init__(message)
        self.fault_code = fault_code
        self.fault_string = fault_string
        self.detail_code = detail_code


class LoadRefused(Exception):
    """The transport refused to load a document outside the allowed location (SEC-01)."""


class ResponseTooLarge(Exception):
    """A response body exceeded ``max_response_bytes``."""


# ---------------------------------------------------------------------------- transport
def _location(url_or_path: str) -> tuple[str, str]:
    """``(kind, normalized)``: kind ``url`` (http/https) or ``file`` (absolute real path)."""
    parsed = urlparse(url_or_path)
    if parsed.scheme in ("http", "https"):
        path = posixpath.normpath(unquote(parsed.path) or "/")
        if (parsed.path or "/").endswith("/") and not path.endswith("/"):
            path += "/"
        return "url", f"{parsed.scheme}://{parsed.netloc.lower()}{path}"
    if parsed.scheme == "file":
        return "file", os.path.realpath(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # a Windows drive letter is not a scheme
        return "other", url_or_path
    return "file", os.path.realpath(os.path.expanduser(url_or_path))


def _allowed_prefix(wsdl: str) -> tuple[str, str]:
    kind, norm = _location(wsdl)
    if kind == "url":
        return kind, norm if norm.endswith("/") else norm.rsplit("/", 1)[0] + "/"
    if kind == "file":
        return kind, os.path.dirname(norm) + os.sep
    raise ConfigurationError(f"wsdl {wsdl!r}: only file paths and http(s) URLs are supported")


class GuardedTransport(Transport):  # type: ignore[misc]
    """A zeep transport that loads documents only below one location and bounds every call.

    Attributes:
        loads: documents loaded (normalized locations).
        refused: loads refused (normalized locations), for tests and audits.
    """

    def __init__(self, allowed: tuple[str, str], *, connect: float, read: float, operation: float,
                 max_bytes: int, session: requests.Session) -> None:
        super().__init__(timeout=read, operation_timeout=operation, session=session)
        self.allowed_kind, self.allowed_prefix = allowed
        self.connect_timeout, self.read_timeout = connect, read
        self.max_bytes = max_bytes
        self.loads: list[str] = []
        self.refused: list[str] = []
        #: HTTP status of the last operation response (classifies bodies that are not SOAP faults).
        self.last_status: int | None = None

    # -- documents (WSDL, XSD): allowlisted
    def load(self, url: str) -> bytes:
        if not url:
            raise ValueError("No url given to load")
        kind, norm = _location(str(url))
        if kind != self.allowed_kind or not norm.startswith(self.allowed_prefix):
            self.refused.append(norm)
            log.warning("refused to load %s (allowed: below %s)", norm, self.allowed_prefix)
            raise LoadRefused(f"refused to load {norm}: only documents below {self.allowed_prefix} may be loaded")
        self.loads.append(norm)
        if kind == "file":
            with open(norm, "rb") as fh:
                data = fh.read(self.max_bytes + 1)
            if len(data) > self.max_bytes:
                raise ResponseTooLarge(f"{norm} is larger than {self.max_bytes} bytes")
            return data
        return self._bounded("GET", str(url), data=None, headers=None, check=True).content

    def _load_remote_data(self, url: str) -> bytes:  # only reached through load()
        return self.load(url)

    # -- operations: bounded in time and size
    def post(self, address: str, message: bytes, headers: Mapping[str, str]) -> requests.Response:
        return self._bounded("POST", address, data=message, headers=headers, check=False)

    def get(self, address: str, params: Any, headers: Mapping[str, str]) -> requests.Response:
        return self._bounded("GET", address, data=None, headers=headers, check=False, params=params)

    def _bounded(self, method: str, url: str, *, data: Any, headers: Any, check: bool, params: Any = None) -> requests.Response:
        op = float(self.operation_timeout)
        deadline = time.monotonic() + op
        resp = self.session.request(
            method, url, data=data, headers=headers, params=params, stream=True,
            timeout=(min(self.connect_timeout, op), min(self.read_timeout, op)),
        )
        self.last_status = resp.status_code
        try:
            if check:
                resp.raise_for_status()
            buf = bytearray()
            for chunk in resp.iter_content(65536):
                buf += chunk
                if len(buf) > self.max_bytes:
                    raise ResponseTooLarge(f"response larger than {self.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise requests.exceptions.Timeout(f"operation timeout ({op:g} s) exceeded")
            resp._content = bytes(buf)  # noqa: SLF001 -- the documented way to pre-load a body
            resp._content_consumed = True  # noqa: SLF001
        finally:
            resp.close()
        return resp


# ---------------------------------------------------------------------------- conversion
def to_plain(value: Any) -> Any:
    """zeep results as JSON-safe data: exact decimals (text), UTC ISO-8601 datetimes, nil as None.

    Runs ``zeep.helpers.serialize_object`` first, then normalizes: naive datetimes are read as UTC,
    durations become ISO-8601 durations, leftover XML elements (lenient parsing) become
    ``{"tag", "text"}``; :func:`gateway.events.jsonable` does the rest.
    """
    return jsonable(_normalize(serialize_object(value, target_cls=dict)))


def _normalize(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int, float, Decimal)):
        return value
    if isinstance(value, datetime):
        return to_utc(value)
    if isinstance(value, date):
        return value
    if isinstance(value, Mapping):
        return {str(k): _normalize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, deque)):
        return [_normalize(v) for v in value]
    if isinstance(value, timedelta):
        import isodate

        return isodate.duration_isoformat(value)
    if isinstance(value, etree._Element):  # noqa: SLF001 -- lenient parsing leaves raw elements
        return {"tag": etree.QName(value).localname, "text": value.text}
    if isinstance(value, etree.QName):
        return value.text
    try:
        return jsonable(value)
    except TypeError:
        return str(value)


def _dig(data: Any, path: str) -> Any:
    for part in path.split("."):
        if data is None:
            return None
        if isinstance(data, Mapping):
            data = data.get(part)
        else:
            raise ContractErrorPath(path)
    return data


class ContractErrorPath(Exception):
    def __init__(self, path: str) -> None:
        super().__init__(f"path {path!r} does not lead through the response")


def _substitute(value: Any, values: Mapping[str, Any]) -> Any:
    """Replace placeholders (plain text substitution; nothing is evaluated)."""
    if isinstance(value, str):
        whole = _PLACEHOLDER.fullmatch(value)
        if whole and whole.group(1) in values:
            return values[whole.group(1)]
        return _PLACEHOLDER.sub(lambda m: "" if values.get(m.group(1)) is None else str(values[m.group(1)]), value)
    if isinstance(value, Mapping):
        return {k: _substitute(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, values) for v in value]
    return value


def _sort_key(t: datetime, k: Any) -> tuple[datetime, int, Any]:
    # Keys of mixed types compare as text; numbers before text.
    return (t, 0, k) if isinstance(k, (int, float, Decimal)) and not isinstance(k, bool) else (t, 1, str(k))


# ---------------------------------------------------------------------------- adapter
class SoapSource(PollingSource[SoapConfig]):
    """Polls one operation of a legacy SOAP service."""

    kind = "soap"
    config_model = SoapConfig

    def __init__(self, config: SoapConfig, *, source_name: str) -> None:
        super().__init__(config, source_name=source_name)
        self.client: Any = None
        self.transport: Any = None
        self._service: Any = None

    # ---------------------------------------------------------------- lifecycle
    def _settings(self) -> Any:
        return Settings(
            strict=self.config.strict,
            xml_huge_tree=False,
            forbid_dtd=True,
            forbid_entities=True,
            forbid_external=True,
        )

    def open(self) -> None:
        """Load the WSDL (through the guarded transport) and bind the operation."""
        if self._service is not None:
            return
        cfg = self.config
        session = requests.Session()
        session.trust_env = cfg.use_env_proxies
        if cfg.auth.type == "basic":
            assert cfg.auth.password is not None
            session.auth = requests.auth.HTTPBasicAuth(cfg.auth.username or "", cfg.auth.password.get_secret_value())
        allowed = _allowed_prefix(cfg.wsdl)
        t = cfg.timeouts
        transport = GuardedTransport(
            allowed, connect=t.connect, read=t.read, operation=t.operation, max_bytes=cfg.max_response_bytes, session=session
        )
        kind, norm = _location(cfg.wsdl)
        wsdl = norm if kind == "file" else cfg.wsdl
        if kind == "file" and not Path(norm).is_file():
            raise ConfigurationError(f"source {self.source_name!r}: config.wsdl: no such file {norm}")
        failure: BaseException | None = None
        try:
            client = Client(wsdl, transport=transport, settings=self._settings())
            service, port = self._select(client)
            binding = port.binding
            if cfg.operation not in binding._operations:  # noqa: SLF001 -- zeep has no public accessor
                raise ConfigurationError(
                    f"source {self.source_name!r}: config.operation: no operation {cfg.operation!r} in port "
                    f"{port.name!r} (operations: {', '.join(sorted(binding._operations))})"  # noqa: SLF001
                )
            address = cfg.endpoint or port.binding_options.get("address")
            if not address:
                raise ConfigurationError(f"source {self.source_name!r}: port {port.name!r} has no address; set config.endpoint")
            self._service = client.create_service(binding.name, address)
        except Exception as exc:  # noqa: BLE001 -- classified below
            failure = exc
        if failure is not None:
            session.close()
            err = self.classify_error(failure)
            if isinstance(err, PermanentError) and not isinstance(err, SoapFaultError):
                err = ConfigurationError(f"source {self.source_name!r}: cannot load WSDL {cfg.wsdl!r}: {err}")
            failure = None
            raise err
        self.client, self.transport = client, transport

    def _select(self, client: Any) -> tuple[Any, Any]:
        cfg = self.config
        services = client.wsdl.services
        if cfg.service is not None and cfg.service not in services:
            raise ConfigurationError(
                f"source {self.source_name!r}: config.service: no service {cfg.service!r} (services: {', '.join(services)})"
            )
        if not services:
            raise ConfigurationError(f"source {self.source_name!r}: the WSDL defines no service")
        service = services[cfg.service] if cfg.service else next(iter(services.values()))
        if cfg.port is not None and cfg.port not in service.ports:
            raise ConfigurationError(
                f"source {self.source_name!r}: config.port: no port {cfg.port!r} in service "
                f"{service.name!r} (ports: {', '.join(service.ports)})"
            )
        port = service.ports[cfg.port] if cfg.port else next(iter(service.ports.values()))
        return service, port

    def close(self) -> None:
        """Close the HTTP session."""
        if self.transport is not None:
            self.transport.session.close()
        self.client = self.transport = self._service = None

    # ---------------------------------------------------------------- reading
    def fetch(self, cursor: Any, limit: int) -> Batch:
        """Call the operation for the next page after ``cursor`` (one page per call)."""
        self.open()
        cfg = self.config
        cur: dict[str, Any] = dict(cursor or {})
        token = cur.get("page_token")
        scan_time = (cur.get("since") if token else cur.get("time")) or cfg.start_time
        scan_key = cur.get("since_key") if token else cur.get("key")
        page_size = min(cfg.page_size, limit)
        args = _substitute(
            cfg.arguments,
            {"cursor.time": scan_time, "cursor.key": scan_key, "page_token": token, "page_size": page_size},
        )
        failure: BaseException | None = None
        result: Any = None
        try:
            result = self._service[cfg.operation](**args)
        except Exception as exc:  # noqa: BLE001 -- classified below, outside the handler
            failure = exc
        if failure is not None:
            err = self.classify_error(failure)
            failure = None  # drop the native error (it may hold the payload)
            raise err
        try:
            data = to_plain(result)
            raw_records = _dig(data, cfg.records_path)
            next_token = _dig(data, cfg.next_page_token_path) if cfg.next_page_token_path else None
        except ContractErrorPath as exc:
            raise PermanentError(f"source {self.source_name!r}: records_path/next_page_token_path: {exc}") from None
        if raw_records is None:
            raw_records = []
        elif isinstance(raw_records, Mapping):
            raw_records = [raw_records]
        elif not isinstance(raw_records, list):
            raise PermanentError(
                f"source {self.source_name!r}: records_path {cfg.records_path!r} holds {type(raw_records).__name__}, expected a list"
            )
        last = None
        if cur.get("time") is not None:
            last = _sort_key(parse_time(cur["time"]), cur.get("key"))
        best = last
        best_pos: dict[str, Any] | None = {"time": cur["time"], "key": cur.get("key")} if last else None
        records: list[Record] = []
        for raw in raw_records:
            if not isinstance(raw, Mapping):
                raw = {"value": raw}
            pos = self._position(raw)
            if pos is not None:
                sk = _sort_key(parse_time(pos["time"]), pos["key"])
                if last is not None and sk <= last:
                    continue  # already read: "since" is inclusive on many services
                if best is None or sk > best:
                    best, best_pos = sk, pos
            records.append(Record(data=raw, position=pos, lenient=not cfg.strict))
        next_token = next_token or None
        new_cursor: dict[str, Any] | None = dict(best_pos) if best_pos else None
        if next_token:
            new_cursor = {**(new_cursor or {}), "since": scan_time, "since_key": scan_key, "page_token": str(next_token)}
            has_more = True
        else:
            has_more = cfg.next_page_token_path is None and len(raw_records) >= page_size and bool(records)
        return Batch(records=records, cursor=new_cursor, has_more=has_more, meta={"page_records": len(raw_records)})

    def _position(self, record: Mapping[str, Any]) -> dict[str, Any] | None:
        t, k = record.get(self.config.time_field), record.get(self.config.key_field)
        if not isinstance(t, str) or k is None:
            return None  # the mapper dead-letters records without key or time
        try:
            parse_time(t)
        except ValueError:
            return None
        return {"time": t, "key": k}

    # ---------------------------------------------------------------- errors
    def classify_error(self, exc: BaseException) -> GatewayError:
        """zeep, requests and lxml errors in the gateway taxonomy.

        Transient: connection errors, timeouts, HTTP 408/429/502/503/504, soap:Server/Receiver
        faults and configured ``transient_fault_codes``. Permanent: other faults (business answers,
        with code and text), rejected XML (never with the payload), other HTTP statuses.
        Configuration: HTTP 401/403 (credentials rejected) and refused document loads.
        """
        name = self.source_name
        if isinstance(exc, GatewayError):
            return exc
        xml_kind = None
        if isinstance(exc, zx.DTDForbidden):
            xml_kind = "a DTD is forbidden"
        elif isinstance(exc, zx.EntitiesForbidden):
            xml_kind = "entity declarations are forbidden"
        elif isinstance(exc, (zx.XMLSyntaxError, etree.XMLSyntaxError)) or (
            isinstance(exc, zx.TransportError) and isinstance(exc.__context__, (zx.XMLSyntaxError, etree.XMLSyntaxError))
        ):
            xml_kind = "invalid XML, or beyond the depth/size limits"
        elif isinstance(exc, zx.ExternalReferenceForbidden):
            xml_kind = "an external reference is forbidden"
        elif isinstance(exc, ResponseTooLarge):
            xml_kind = f"the response exceeds {self.config.max_response_bytes} bytes"
        http_status = getattr(exc, "status_code", None)
        if isinstance(exc, zx.TransportError) and http_status and http_status != 200:
            xml_kind = None  # an HTTP error with a non-XML body: classified by its status below
        if xml_kind is not None:
            status = getattr(exc, "status_code", None)
            # No __cause__: the native exception carries the payload in its message and attributes.
            return PermanentError(
                f"source {name!r}: SOAP response rejected by the hardened XML parser: {xml_kind} "
                f"({type(exc).__name__}{f', HTTP {status}' if status else ''}; payload not shown)"
            )
        if isinstance(exc, LoadRefused):
            err: GatewayError = ConfigurationError(f"source {name!r}: {exc}")
        elif isinstance(exc, zx.Fault) and exc.code is None and not isinstance(exc.detail, etree._Element):  # noqa: SLF001
            # Not a SOAP fault: an HTTP error whose body happened to be XML (an HTML error page).
            status = getattr(self.transport, "last_status", None) or 0
            if status in _TRANSIENT_HTTP:
                return TransientError(f"source {name!r}: service unavailable (HTTP {status})")
            if status in (401, 403):
                return ConfigurationError(f"source {name!r}: the service rejected the credentials (HTTP {status})")
            return PermanentError(f"source {name!r}: unexpected HTTP {status} without a SOAP fault")
        elif isinstance(exc, zx.Fault):
            err = self._fault(exc)
        elif isinstance(exc, (zx.TransportError, requests.exceptions.HTTPError)):
            status = getattr(exc, "status_code", None) or getattr(getattr(exc, "response", None), "status_code", 0)
            if status in (401, 403):
                err = ConfigurationError(f"source {name!r}: the service rejected the credentials (HTTP {status})")
            elif status in _TRANSIENT_HTTP:
                err = TransientError(f"source {name!r}: service unavailable (HTTP {status})")
            else:
                err = PermanentError(f"source {name!r}: unexpected HTTP {status} from the service")
            return err  # no __cause__: zeep's TransportError message embeds the response body
        elif isinstance(exc, (requests.exceptions.Timeout, requests.exceptions.ConnectionError)):
            err = TransientError(f"source {name!r}: {type(exc).__name__}: {_short(exc)}")
        elif isinstance(exc, (zx.ValidationError, TypeError)):
            err = PermanentError(f"source {name!r}: the arguments do not fit operation {self.config.operation!r}: {_short(exc)}")
        else:
            return super().classify_error(exc)
        err.__cause__ = exc
        return err

    def _fault(self, exc: Any) -> GatewayError:
        code = exc.code or ""
        local = str(code).rsplit(":", 1)[-1].rsplit("}", 1)[-1]
        detail_code = None
        if isinstance(exc.detail, etree._Element):  # noqa: SLF001
            for el in exc.detail.iter():
                if isinstance(el.tag, str) and etree.QName(el).localname in ("errorCode", "ErrorCode", "code") and el.text:
                    detail_code = el.text.strip()[:100]
                    break
        text = (exc.message or "")[:500]
        label = f"{code}" + (f" [{detail_code}]" if detail_code else "")
        transient = set(self.config.transient_fault_codes)
        if local in ("Server", "Receiver") or local in transient or (detail_code and detail_code in transient):
            return TransientError(f"source {self.source_name!r}: SOAP fault {label}: {text}")
        return SoapFaultError(
            f"source {self.source_name!r}: SOAP fault {label}: {text}",
            fault_code=str(code) or None,
            fault_string=text or None,
            detail_code=detail_code,
        )


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 300 else text[:300] + "..."
