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

import hashlib
import logging
import os
import posixpath
import re
import time
from collections import deque
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urljoin, urlparse

import requests
import urllib3
from lxml import etree
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from zeep import Client, Settings
from zeep import exceptions as zx
from zeep.transports import Transport
from zeep.xsd.valueobjects import CompoundValue

from adapters.base import Batch, Fingerprint, PollingSource, Record, SourceConfig
from adapters.soap.auth import SoapAuth, configure
from gateway.errors import (
    ConfigurationError,
    GatewayError,
    PermanentError,
    TransientError,
)
from gateway.events import format_time, jsonable, parse_time

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
_KNOWN = frozenset({"cursor.time", "cursor.key", "page_token", "page_size", "page_number"})
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


class SoapDrift(BaseModel):
    """WSDL/XSD drift detection: the documents are hashed at start and every ``check_interval``."""

    model_config = ConfigDict(extra="forbid")

    check_interval: float | None = Field(
        3600.0, gt=0, description="Seconds between drift checks while running (null: only at start)."
    )
    on_drift: Literal["warn", "stop"] = Field(
        "warn", description="warn: log and show the drift in the source status; stop: also stop polling the source."
    )


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
        "{page_token}, {page_number} and {page_size}; a value that is exactly one placeholder gets the raw value "
        "(None when unset, which omits an optional element).",
    )
    records_path: str = Field(..., description="Dotted path of the record list in the response, e.g. 'orders'.")
    next_page_token_path: str | None = Field(
        None, description="Dotted path of the next-page token in the response (paging: token)."
    )
    paging: Literal["token", "page_number", "cursor"] | None = Field(
        None,
        description="How a scan is paged: token (next-page token at next_page_token_path), page_number "
        "({page_number} from page_number_start until a page comes back empty) or cursor (each call asks "
        "again from the newest record read; a full page means more). Default: token when "
        "next_page_token_path is set, else cursor.",
    )
    page_number_start: int = Field(1, ge=0, le=1, description="Number of the first page (paging: page_number).")
    key_field: str = Field(..., description="Record field with the unique key (cursor tie-breaker).")
    time_field: str = Field(..., description="Record field with the last-change time (cursor).")
    page_size: int = Field(100, ge=1, le=10_000, description="Records asked for per call ({page_size}).")
    start_time: str = Field(
        "1970-01-01T00:00:00Z", description="{cursor.time} of a source that never ran (RFC 3339)."
    )
    auth: SoapAuth = Field(default_factory=SoapAuth, description="Authentication.")
    timeouts: SoapTimeouts = Field(default_factory=SoapTimeouts, description="Connect, read and operation timeouts.")
    parsing: Literal["strict", "lenient", "strict_then_lenient"] = Field(
        "strict",
        description="strict: responses must match the schema; lenient: non-conformant responses are "
        "parsed leniently; strict_then_lenient: strict first, and a response that fails schema "
        "validation is parsed again leniently (no second call). Leniently parsed records are flagged "
        "'lenient' in their lineage.",
    )
    drift: SoapDrift = Field(default_factory=lambda: SoapDrift(), description="WSDL/XSD drift detection.")
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

    @model_validator(mode="after")
    def _paging(self) -> SoapConfig:
        if self.paging is None:
            self.paging = "token" if self.next_page_token_path else "cursor"
        if self.paging == "token" and not self.next_page_token_path:
            raise ValueError("paging token needs next_page_token_path")
        if self.paging != "token" and self.next_page_token_path:
            raise ValueError(f"next_page_token_path is only used with paging token (paging is {self.paging})")
        uses_number = "{page_number}" in repr(self.arguments)
        if self.paging == "page_number" and not uses_number:
            raise ValueError("paging page_number needs a {page_number} placeholder in arguments")
        if self.paging != "page_number" and uses_number:
            raise ValueError(f"the {{page_number}} placeholder needs paging page_number (paging is {self.paging})")
        return self

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

    @property
    def details(self) -> dict[str, str | None]:
        """The fault's code, text and detail code (stored with the dead letter)."""
        return {"fault_code": self.fault_code, "fault_string": self.fault_string, "detail_code": self.detail_code}


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
            for chunk in _body_until(resp, deadline, self.read_timeout, op):
                buf += chunk
                if len(buf) > self.max_bytes:
                    raise ResponseTooLarge(f"response larger than {self.max_bytes} bytes")
            resp._content = bytes(buf)
            resp._content_consumed = True
        finally:
            resp.close()
        return resp


def _body_until(resp: requests.Response, deadline: float, read_timeout: float, op: float) -> Iterator[bytes]:
    """The response body as it arrives, never past ``deadline``.

    ``iter_content`` reads fixed-size chunks and waits until a chunk is full: a server that trickles
    one byte per second never trips the read timeout and would hold the call for hours. Here each
    read returns whatever has arrived (``read1``), waits at most the read timeout or what is left
    until the deadline, whichever is shorter, and the deadline is checked between reads.
    """
    raw = resp.raw
    if not hasattr(raw, "read1"):  # urllib3 < 2.2: whole chunks; the deadline is checked between them
        for chunk in resp.iter_content(65536):
            yield chunk
            if time.monotonic() > deadline:
                raise requests.exceptions.Timeout(f"operation timeout ({op:g} s) exceeded")
        return
    sock = getattr(getattr(raw, "connection", None), "sock", None)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise requests.exceptions.Timeout(f"operation timeout ({op:g} s) exceeded")
        if sock is not None:
            sock.settimeout(min(read_timeout, left))
        try:
            chunk = raw.read1(65536, decode_content=True)
        except urllib3.exceptions.ReadTimeoutError:
            if time.monotonic() >= deadline:
                raise requests.exceptions.Timeout(f"operation timeout ({op:g} s) exceeded") from None
            raise requests.exceptions.ReadTimeout(f"read timeout ({read_timeout:g} s) exceeded") from None
        except urllib3.exceptions.ProtocolError as exc:  # what iter_content raises for these
            raise requests.exceptions.ChunkedEncodingError(exc) from None
        except urllib3.exceptions.DecodeError as exc:
            raise requests.exceptions.ContentDecodingError(exc) from None
        except urllib3.exceptions.SSLError as exc:
            raise requests.exceptions.SSLError(exc) from None
        if not chunk:
            return
        yield chunk


# ---------------------------------------------------------------------------- conversion
def to_plain(value: Any) -> Any:
    """zeep results as JSON-safe data: exact decimals (text), UTC ISO-8601 datetimes, nil as None.

    One pass over zeep's objects (what ``zeep.helpers.serialize_object`` and
    :func:`gateway.events.jsonable` would do in two): nested types become objects, repeated
    elements lists, naive datetimes are read as UTC, durations become ISO-8601 durations, leftover
    XML elements (lenient parsing) become ``{"tag", "text"}``.
    """
    return _plain(value)


def _plain(value: Any) -> Any:
    t = type(value)
    if value is None or t is str or t is int or t is bool:
        return value
    if isinstance(value, CompoundValue):
        return {k: _plain(v) for k, v in value.__values__.items()}
    if t is list or isinstance(value, (list, tuple, deque)):
        return [_plain(v) for v in value]
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, timedelta):
        import isodate

        return isodate.duration_isoformat(value)
    if isinstance(value, etree._Element):
        return {"tag": etree.QName(value).localname, "text": value.text}
    if isinstance(value, etree.QName):
        return value.text
    try:
        return jsonable(value)  # floats, dates, times, bytes, enums, str and int subclasses
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
        self._binding: Any = None
        self._operation: Any = None
        self._address: str | None = None

    # ---------------------------------------------------------------- lifecycle
    def _settings(self) -> Any:
        return Settings(
            strict=self.config.parsing != "lenient",
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
        wsse = configure(session, cfg.auth)  # basic auth, client certificate, server trust; wsse token or None
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
            client = Client(wsdl, transport=transport, settings=self._settings(), wsse=wsse)
            _, port = self._select(client)
            binding = port.binding
            if cfg.operation not in binding._operations:
                raise ConfigurationError(
                    f"source {self.source_name!r}: config.operation: no operation {cfg.operation!r} in port "
                    f"{port.name!r} (operations: {', '.join(sorted(binding._operations))})"
                )
            address = cfg.endpoint or port.binding_options.get("address")
            if not address:
                raise ConfigurationError(f"source {self.source_name!r}: port {port.name!r} has no address; set config.endpoint")
            self._service = client.create_service(binding.name, address)
            self._binding, self._operation = binding, binding.get(cfg.operation)
            self._address = address
        except Exception as exc:  # noqa: BLE001 -- classified below, never swallowed
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

    # ---------------------------------------------------------------- breaker and drift
    def breaker_key(self) -> str:
        """One breaker per endpoint: sources calling the same endpoint share it."""
        return f"soap:{self._address}" if self._address else super().breaker_key()

    @property
    def drift_check_interval(self) -> float | None:
        return self.config.drift.check_interval

    @property
    def stop_on_drift(self) -> bool:
        return self.config.drift.on_drift == "stop"

    def fingerprint(self) -> Fingerprint:
        """SHA-256 of the WSDL and of every document it imports or includes, fetched again now.

        Documents are loaded through the guarded transport (same allowlist, timeouts and size cap
        as at start) and parsed with a hardened parser only to find their imports
        (``wsdl:import/@location``, ``xs:import|xs:include|xs:redefine/@schemaLocation``).
        """
        self.open()
        kind, norm = _location(self.config.wsdl)
        parts: dict[str, str] = {}
        todo = [norm if kind == "file" else self.config.wsdl]
        while todo:
            loc = todo.pop()
            key = _location(loc)[1]
            if key in parts:
                continue
            data = self.transport.load(loc)
            parts[key] = hashlib.sha256(data).hexdigest()
            todo.extend(_imports(data, loc))
        return Fingerprint.from_parts(parts)

    def close(self) -> None:
        """Close the HTTP session."""
        if self.transport is not None:
            self.transport.session.close()
        self.client = self.transport = self._service = None

    # ---------------------------------------------------------------- reading
    def fetch(self, cursor: Any, limit: int) -> Batch:
        """Call the operation for the next page after ``cursor`` (one page per call).

        A *scan* reads everything changed since the cursor's ``(time, key)``, over one or more pages.
        While a scan is being paged, the cursor also holds the scan's start (``since``,
        ``since_key``) and the next page (``page_token`` or ``page``), so a restart resumes at the
        next page. Records at or before the scan's start are dropped (``since`` is inclusive on many
        services); records are *not* filtered against the newest record of earlier pages, so a
        service that does not sort by time loses nothing.
        """
        self.open()
        cfg = self.config
        cur: dict[str, Any] = dict(cursor or {})
        in_scan = "page_token" in cur or "page" in cur
        scan_time = (cur.get("since") if in_scan else cur.get("time")) or cfg.start_time
        scan_key = cur.get("since_key") if in_scan else cur.get("key")
        token = cur.get("page_token")
        page_number = int(cur.get("page") or cfg.page_number_start)
        page_size = min(cfg.page_size, limit)
        args = _substitute(
            cfg.arguments,
            {
                "cursor.time": scan_time, "cursor.key": scan_key, "page_token": token,
                "page_size": page_size, "page_number": page_number,
            },
        )
        result, lenient = self._call(args)
        try:
            data = to_plain(result)
            if not isinstance(data, Mapping) and data is not None:
                # zeep returns the only child of a response element unwrapped: it is the path's head.
                data = {cfg.records_path.split(".", 1)[0]: data}
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
        # The scan starts after a record's position (key set), or at start_time (key unset: keep all).
        start = _sort_key(parse_time(scan_time), scan_key) if scan_key is not None else None
        best = _sort_key(parse_time(cur["time"]), cur.get("key")) if cur.get("time") is not None else None
        best_pos: dict[str, Any] | None = {"time": cur["time"], "key": cur.get("key")} if best else None
        records: list[Record] = []
        for raw in raw_records:
            if not isinstance(raw, Mapping):
                raw = {"value": raw}
            pos, sk = self._position(raw)
            if pos is not None:
                if start is not None and sk <= start:
                    continue  # read by an earlier scan: "since" is inclusive on many services
                if best is None or sk > best:
                    best, best_pos = sk, pos
            records.append(Record(data=raw, position=pos, lenient=lenient))
        new_cursor: dict[str, Any] | None = dict(best_pos) if best_pos else None
        scan = {"since": scan_time, "since_key": scan_key}
        if cfg.paging == "token" and next_token:
            new_cursor = {**(new_cursor or {}), **scan, "page_token": str(next_token)}
            has_more = True
        elif cfg.paging == "page_number" and raw_records:
            new_cursor = {**(new_cursor or {}), **scan, "page": page_number + 1}
            has_more = True
        else:
            has_more = cfg.paging == "cursor" and len(raw_records) >= page_size and bool(records)
        return Batch(
            records=records, cursor=new_cursor, has_more=has_more,
            meta={"page_records": len(raw_records), "lenient": lenient},
        )

    def _call(self, args: Mapping[str, Any]) -> tuple[Any, bool]:
        """One call; returns the parsed result and whether it was parsed leniently.

        The response is fetched once (zeep ``raw_response``) and parsed by the binding; with
        ``parsing: strict_then_lenient`` a response that fails *schema* validation is parsed again
        leniently. Invalid or hostile XML is never re-parsed.
        """
        cfg = self.config
        failure: BaseException | None = None
        result: Any = None
        lenient = cfg.parsing == "lenient"
        try:
            with self.client.settings(raw_response=True):
                response = self._service[cfg.operation](**args)
            try:
                result = self._binding.process_reply(self.client, self._operation, response)
            except zx.XMLParseError as exc:
                if cfg.parsing != "strict_then_lenient":
                    raise
                log.warning(
                    "source %r: response does not match the schema (%s); parsed leniently",
                    self.source_name, type(exc).__name__,
                )
                with self.client.settings(strict=False):
                    result = self._binding.process_reply(self.client, self._operation, response)
                lenient = True
        except Exception as exc:  # noqa: BLE001 -- classified below, never swallowed
            failure = exc
        if failure is not None:
            err = self.classify_error(failure)
            failure = None  # drop the native error (it may hold the payload)
            raise err
        return result, lenient

    def _position(self, record: Mapping[str, Any]) -> tuple[dict[str, Any] | None, Any]:
        """The record's cursor position and its sort key (time parsed once), or ``(None, None)``."""
        t, k = record.get(self.config.time_field), record.get(self.config.key_field)
        if not isinstance(t, str) or k is None:
            return None, None  # the mapper dead-letters records without key or time
        try:
            when = parse_time(t)
        except ValueError:
            return None, None
        return {"time": t, "key": k}, _sort_key(when, k)

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
        elif isinstance(exc, zx.Fault) and exc.code is None and not isinstance(exc.detail, etree._Element):
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
        elif isinstance(exc, requests.exceptions.SSLError):
            # Before ConnectionError (its base): a failed TLS handshake is a setup problem, not a blip.
            hint = (
                "the server's certificate failed certificate verification (check auth.tls.ca_file)"
                if "CERTIFICATE_VERIFY_FAILED" in str(exc)
                else "check auth.tls (cert_file, key_file, ca_file) and whether the service wants a client certificate"
            )
            err = ConfigurationError(f"source {name!r}: TLS handshake failed: {hint}: {_short(exc)}")
        elif isinstance(exc, (requests.exceptions.Timeout, requests.exceptions.ConnectionError)):
            err = TransientError(f"source {name!r}: {type(exc).__name__}: {_short(exc)}")
        elif isinstance(exc, zx.XMLParseError):
            hint = "" if self.config.parsing != "strict" else "; parsing: strict_then_lenient accepts such responses"
            err = PermanentError(
                f"source {name!r}: the response does not match the WSDL's schema: {_short(exc)}{hint}"
            )
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
        if isinstance(exc.detail, etree._Element):
            for el in exc.detail.iter():
                if isinstance(el.tag, str) and etree.QName(el).localname in ("errorCode", "ErrorCode", "code") and el.text:
                    detail_code = el.text.strip()[:100]
                    break
        text = (exc.message or "")[:500]
        label = f"{code}" + (f" [{detail_code}]" if detail_code else "")
        subcodes = [str(getattr(q, "localname", q)).rsplit(":", 1)[-1] for q in (getattr(exc, "subcodes", None) or [])]
        if {local, *subcodes} & {"FailedAuthentication", "InvalidSecurityToken", "InvalidSecurity"}:
            # WS-Security faults (SOAP 1.1 faultcode, SOAP 1.2 subcode): the credentials, not the request.
            secret = self.config.auth.password
            if secret is not None and secret.get_secret_value():
                text = text.replace(secret.get_secret_value(), "***")
            label = "/".join([str(code), *subcodes])
            return ConfigurationError(
                f"source {self.source_name!r}: the service rejected the credentials (WS-Security fault {label}: {text})"
            )
        transient = set(self.config.transient_fault_codes)
        if local in ("Server", "Receiver") or local in transient or (detail_code and detail_code in transient):
            return TransientError(f"source {self.source_name!r}: SOAP fault {label}: {text}")
        return SoapFaultError(
            f"source {self.source_name!r}: SOAP fault {label}: {text}",
            fault_code=str(code) or None,
            fault_string=text or None,
            detail_code=detail_code,
        )


_IMPORT_PATHS = etree.XPath(
    "//wsdl:import/@location | //xs:import/@schemaLocation | //xs:include/@schemaLocation"
    " | //xs:redefine/@schemaLocation",
    namespaces={"wsdl": "http://schemas.xmlsoap.org/wsdl/", "xs": "http://www.w3.org/2001/XMLSchema"},
)


def _imports(data: bytes, base: str) -> list[str]:
    """Locations imported or included by a WSDL/XSD document, resolved against ``base``."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError:
        return []  # not XML: hashed, nothing to follow
    out = []
    for ref in _IMPORT_PATHS(root):
        ref = str(ref)
        if urlparse(base).scheme in ("http", "https", "file"):
            out.append(urljoin(base, ref))
        else:
            out.append(os.path.join(os.path.dirname(base), unquote(ref)))
    return out


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 300 else text[:300] + "..."
