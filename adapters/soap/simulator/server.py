"""A legacy SOAP order service, served over real HTTP on 127.0.0.1 (standard library only).

Document/literal, SOAP 1.1 and SOAP 1.2 bindings, two operations::

    GetOrdersSince(since: dateTime, pageToken: string?, pageSize: int)
        -> orders: Order*, nextPageToken: string?
    ListOrders(since: dateTime, pageNumber: int, pageSize: int) -> orders: Order*

Orders with ``updatedAt >= since`` are returned ordered by ``(updatedAt, id)``; the page token is an
opaque keyset position (the last ``(updatedAt, id)`` of the page), so updates between pages never
shift later pages. ``since`` is inclusive, the way many legacy services behave: the client must
filter what it already has.

Test controls (all thread-safe): :meth:`add_orders`, :meth:`upsert`, :meth:`require_auth`,
:meth:`fail_next` (N failures: HTTP 502/503/504, soap:Server, or a soap:Client fault with a code the
source may configure as transient), :meth:`business_fault` (a permanent
soap:Client fault with a code), ``delay`` (seconds before answering), ``hang`` (accept, never
answer), ``trickle`` (seconds between the bytes of an answer) and :meth:`serve_raw` (answer
operations with a given body: attack payloads).

Authentication: :meth:`require_auth` (HTTP basic), :meth:`require_wsse` (a WS-Security
UsernameToken, PasswordText or PasswordDigest, with freshness and nonce-replay checks) and
``SoapSimulator(tls=ssl_context)`` (HTTPS; the context decides whether a client certificate is
required).

Use it as a context manager, or call :meth:`start` and :meth:`close`; ``close`` stops the server
and joins every thread it started.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import ssl
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from xml.sax.saxutils import escape

from lxml import etree

__all__ = ["FAIL_KINDS", "T0", "WSDL_PATH", "XSD_PATH", "Order", "SoapSimulator"]

HERE = Path(__file__).resolve().parent
WSDL_PATH = HERE / "legacy_orders.wsdl"
XSD_PATH = HERE / "legacy_orders.xsd"
TNS = "urn:legacy:orders"
SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
T0 = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)
#: What :meth:`SoapSimulator.fail_next` can inject.
FAIL_KINDS = ("http502", "http503", "http504", "soap_server", "soap_client")


@dataclass(frozen=True)
class Order:
    """One order of the simulated service."""

    id: int
    customer: str
    amount: Decimal
    status: str = "NEW"
    updated_at: datetime = T0
    note: str | None = None
    note_present: bool = False  #: emit <note xsi:nil="true"/> when note is None
    currency: str | None = "EUR"
    lines: tuple[tuple[str, int], ...] = field(default_factory=tuple)


def _fmt_dt(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _parse_dt(text: str) -> datetime:
    text = text.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _order_xml(o: Order, *, nonconformant: bool = False) -> str:
    attr = f' currency="{escape(o.currency)}"' if o.currency is not None else ""
    parts = [
        f"<tns:orders{attr}>",
        f"<tns:id>{o.id}</tns:id>",
        f"<tns:customer>{escape(o.customer)}</tns:customer>",
        f"<tns:amount>{o.amount}</tns:amount>",
        f"<tns:status>{o.status}</tns:status>",
        f"<tns:updatedAt>{_fmt_dt(o.updated_at)}</tns:updatedAt>",
    ]
    if o.note is not None:
        parts.append(f"<tns:note>{escape(o.note)}</tns:note>")
    elif o.note_present:
        parts.append('<tns:note xsi:nil="true"/>')
    for sku, qty in o.lines:
        parts.append(f"<tns:lines><tns:sku>{escape(sku)}</tns:sku><tns:qty>{qty}</tns:qty></tns:lines>")
    if nonconformant:  # an element the schema does not declare, as legacy services add over time
        parts.append("<tns:legacyFlag>Y</tns:legacyFlag>")
    parts.append("</tns:orders>")
    return "".join(parts)


def _envelope(soap_ns: str, body: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>'
        f'<soap:Envelope xmlns:soap="{soap_ns}" xmlns:tns="{TNS}" '
        f'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        f"<soap:Body>{body}</soap:Body></soap:Envelope>"
    ).encode()


def _fault(soap_ns: str, side: str, text: str, code: str | None = None) -> bytes:
    detail = (
        f"<tns:OrderFault><tns:errorCode>{escape(code)}</tns:errorCode>"
        f"<tns:message>{escape(text)}</tns:message></tns:OrderFault>"
        if code
        else ""
    )
    if soap_ns == SOAP11:
        body = (
            f"<soap:Fault><faultcode>soap:{side}</faultcode><faultstring>{escape(text)}</faultstring>"
            + (f"<detail>{detail}</detail>" if detail else "")
            + "</soap:Fault>"
        )
    else:
        value = "soap:Sender" if side == "Client" else "soap:Receiver"
        body = (
            f"<soap:Fault><soap:Code><soap:Value>{value}</soap:Value></soap:Code>"
            f'<soap:Reason><soap:Text xml:lang="en">{escape(text)}</soap:Text></soap:Reason>'
            + (f"<soap:Detail>{detail}</soap:Detail>" if detail else "")
            + "</soap:Fault>"
        )
    return _envelope(soap_ns, body)


def _encode_token(updated_at: datetime, oid: int, since: datetime) -> str:
    raw = json.dumps({"t": _fmt_dt(updated_at), "id": oid, "s": _fmt_dt(since)}).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii")


def _decode_token(token: str) -> tuple[datetime, int, datetime]:
    data = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
    return _parse_dt(data["t"]), int(data["id"]), _parse_dt(data["s"])


# ---------------------------------------------------------------------------- WS-Security
WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
WSU = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"
_UT_PROFILE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-username-token-profile-1.0"
PASSWORD_TEXT = _UT_PROFILE + "#PasswordText"
PASSWORD_DIGEST = _UT_PROFILE + "#PasswordDigest"
#: Oldest (and furthest in the future) a Created may be; seen nonces are kept this long.
WSSE_WINDOW = timedelta(minutes=5)


def password_digest(nonce: bytes, created: str, password: str) -> str:
    """``Base64(SHA-1(nonce + created + password))`` (OASIS UsernameToken Profile 1.0, 3.1)."""
    return base64.b64encode(hashlib.sha1(nonce + created.encode() + password.encode()).digest()).decode("ascii")


def _wsse_fault(soap_ns: str, code: str = "FailedAuthentication") -> bytes:
    """A WS-Security fault: faultcode ``wsse:<code>`` (SOAP 1.1), Sender with that subcode (SOAP 1.2)."""
    text = "The security token could not be authenticated or authorized"
    if soap_ns == SOAP11:
        body = (
            f'<soap:Fault xmlns:wsse="{WSSE}"><faultcode>wsse:{code}</faultcode>'
            f"<faultstring>{text}</faultstring></soap:Fault>"
        )
    else:
        body = (
            f'<soap:Fault xmlns:wsse="{WSSE}"><soap:Code><soap:Value>soap:Sender</soap:Value>'
            f"<soap:Subcode><soap:Value>wsse:{code}</soap:Value></soap:Subcode></soap:Code>"
            f'<soap:Reason><soap:Text xml:lang="en">{text}</soap:Text></soap:Reason></soap:Fault>'
        )
    return _envelope(soap_ns, body)


class _Server(ThreadingHTTPServer):
    """The HTTP server; failed TLS handshakes are recorded, not printed."""

    simulator: SoapSimulator

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        tls = self.simulator._tls is not None
        if isinstance(exc, ssl.SSLError) or (tls and isinstance(exc, (ConnectionError, TimeoutError))):
            with self.simulator._lock:
                self.simulator.tls_failures.append(f"{type(exc).__name__}: {exc}")
            return
        super().handle_error(request, client_address)


class SoapSimulator:
    """The simulated service.

    Args:
        host: address to listen on (loopback).
        port: port to listen on (0: ephemeral).
        tls: serve HTTPS with this server-side context (``CERT_REQUIRED`` in it: client
            certificates are required); ``None``: plain HTTP.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, tls: ssl.SSLContext | None = None) -> None:
        self._lock = threading.Lock()
        self._orders: dict[int, Order] = {}
        self._auth: str | None = None
        self._transient: list[tuple[str, str]] = []
        self._business: tuple[str, str] | None = None
        self._raw: tuple[bytes, int, str] | None = None
        self._stop = threading.Event()
        self.delay = 0.0
        self.hang = False
        #: Seconds between the bytes of an answer (0: send at once): a server that trickles its answer
        #: never trips a read timeout; only the operation timeout ends the call.
        self.trickle = 0.0
        #: Add an element the schema does not declare to every order (strict parsing rejects it).
        self.nonconformant = False
        #: Every request as (method, path), including refused ones.
        self.requests: list[tuple[str, str]] = []
        #: Operation calls that reached the service (after auth).
        self.calls = 0
        self._wsse: tuple[str, str, bool | None] | None = None
        self._nonces: dict[str, datetime] = {}
        #: Now, for the WS-Security freshness check (tests may replace it).
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)
        #: Why WS-Security checks failed, one entry per refused call.
        self.auth_failures: list[str] = []
        #: Failed TLS handshakes (no or untrusted client certificate, ...).
        self.tls_failures: list[str] = []
        #: Body of the last POST, as received (tests re-post it to check replay protection).
        self.last_body: bytes | None = None
        sim = self

        class Handler(_Handler):
            simulator = sim

        self._httpd = _Server((host, port), Handler)
        self._httpd.simulator = sim
        self._httpd.daemon_threads = False  # server_close() joins handler threads
        self._tls = tls
        if tls is not None:
            # The handshake runs in the handler thread (see _Handler.setup), not in the accept loop.
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True, do_handshake_on_connect=False)
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle
    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"{'https' if self._tls is not None else 'http'}://{host}:{port}"

    @property
    def wsdl_url(self) -> str:
        return self.base_url + "/?wsdl"

    @property
    def endpoint(self) -> str:
        return self.base_url + "/soap"

    def start(self) -> SoapSimulator:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="soapsim", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving, release hung handlers and join every thread."""
        self._stop.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ data
    def add_orders(self, n: int, *, start: int = 1, t0: datetime = T0, step: timedelta = timedelta(seconds=1)) -> None:
        """Add orders ``start..start+n-1``, updatedAt ``t0 + i*step``."""
        with self._lock:
            for i in range(start, start + n):
                self._orders[i] = Order(
                    id=i,
                    customer=f"C{i % 97:04d}",
                    amount=Decimal(i % 1000) + Decimal("0.25"),
                    updated_at=t0 + step * i,
                )

    def upsert(self, order: Order) -> None:
        with self._lock:
            self._orders[order.id] = order

    def update(self, oid: int, **changes: Any) -> Order:
        """Change an order (``updated_at`` defaults to one hour after the newest order)."""
        with self._lock:
            if "updated_at" not in changes:
                changes["updated_at"] = max(o.updated_at for o in self._orders.values()) + timedelta(hours=1)
            new = replace(self._orders[oid], **changes)
            self._orders[oid] = new
            return new

    def require_auth(self, username: str | None, password: str | None = None) -> None:
        """Require HTTP basic auth on every path (``None``: no auth)."""
        with self._lock:
            self._auth = (
                None if username is None else base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
            )

    def require_wsse(self, username: str | None, password: str | None = None, *, digest: bool | None = None) -> None:
        """Require a WS-Security UsernameToken on every operation call (``None``: no WS-Security).

        Args:
            username: the expected ``wsse:Username``.
            password: the expected password.
            digest: ``True`` requires PasswordDigest, ``False`` PasswordText, ``None`` accepts both.

        A ``Created`` (of the token or of a ``wsu:Timestamp``) more than 5 minutes old or ahead, or a
        nonce seen before, is refused too; a refusal answers a ``wsse:FailedAuthentication`` fault
        (HTTP 500) and its reason is appended to :attr:`auth_failures`.
        """
        with self._lock:
            self._wsse = None if username is None else (username, password or "", digest)
            self._nonces.clear()

    def _check_wsse(self, body: bytes) -> str | None:
        """Why the request's UsernameToken is refused, or ``None`` when it is accepted."""
        with self._lock:
            expected = self._wsse
        if expected is None:
            return None
        username, password, digest = expected
        try:
            doc = etree.fromstring(body, etree.XMLParser(resolve_entities=False, no_network=True))
        except etree.XMLSyntaxError:
            return "malformed request"
        security = doc.find(f"./{{{SOAP11}}}Header/{{{WSSE}}}Security")
        if security is None:
            security = doc.find(f"./{{{SOAP12}}}Header/{{{WSSE}}}Security")
        tokens = [] if security is None else security.findall(f"{{{WSSE}}}UsernameToken")
        if len(tokens) != 1:
            return "no wsse:Security header with one UsernameToken"
        token = tokens[0]
        pw = token.find(f"{{{WSSE}}}Password")
        if pw is None:
            return "no Password"
        nonce_text = token.findtext(f"{{{WSSE}}}Nonce")
        created = token.findtext(f"{{{WSU}}}Created")
        now = self.clock()
        for text in (created, security.findtext(f"{{{WSU}}}Timestamp/{{{WSU}}}Created")):
            if text is None:
                continue
            try:
                when = _parse_dt(text)
            except ValueError:
                return "malformed Created"
            if now - when > WSSE_WINDOW:
                return "stale Created"
            if when - now > WSSE_WINDOW:
                return "Created in the future"
        kind = pw.get("Type", PASSWORD_TEXT)  # the profile's default is PasswordText
        if kind == PASSWORD_DIGEST:
            if digest is False:
                return "PasswordText required"
            if not nonce_text or not created:
                return "PasswordDigest without Nonce and Created"
            try:
                nonce = base64.b64decode(nonce_text, validate=True)
            except ValueError:
                return "malformed Nonce"
            wanted = password_digest(nonce, created, password)
        elif kind == PASSWORD_TEXT:
            if digest is True:
                return "PasswordDigest required"
            wanted = password
        else:
            return "unknown password type"
        ok = hmac.compare_digest((pw.text or "").strip().encode(), wanted.encode())
        if token.findtext(f"{{{WSSE}}}Username") != username or not ok:
            return "wrong username or password"
        if nonce_text:
            with self._lock:
                for seen, at in list(self._nonces.items()):
                    if now - at > WSSE_WINDOW:
                        del self._nonces[seen]  # older than any acceptable Created
                if nonce_text in self._nonces:
                    return "replayed nonce"
                self._nonces[nonce_text] = now
        return None

    def fail_next(self, n: int, kind: str = "http503", *, code: str = "ORD-BUSY") -> None:
        """The next ``n`` operation calls fail, then the service answers normally again.

        Args:
            n: how many calls fail.
            kind: ``http502``, ``http503`` or ``http504`` (an HTML error page with that status, as
                a proxy in front of the service sends), ``soap_server`` (a soap:Server /
                soap:Receiver fault) or ``soap_client`` (a soap:Client / soap:Sender fault whose
                detail ``errorCode`` is ``code``: permanent unless the source lists the code in
                ``transient_fault_codes``).
            code: the detail ``errorCode`` of ``soap_client`` faults.
        """
        if kind not in FAIL_KINDS:
            raise ValueError(f"fail_next: unknown kind {kind!r} (expected one of {', '.join(FAIL_KINDS)})")
        with self._lock:
            self._transient.extend([(kind, code)] * n)

    def business_fault(self, code: str | None, text: str = "business rule violated") -> None:
        """Every operation call answers a soap:Client fault with ``code`` (``None``: stop)."""
        with self._lock:
            self._business = None if code is None else (code, text)

    def serve_raw(self, body: bytes | None, *, status: int = 200, content_type: str = "text/xml; charset=utf-8") -> None:
        """Answer every operation call with ``body`` (``None``: back to normal)."""
        with self._lock:
            self._raw = None if body is None else (body, status, content_type)

    # ------------------------------------------------------------ service
    def wsdl_document(self) -> bytes:
        """The WSDL with the XSD inlined and the addresses pointing at this server."""
        parser = etree.XMLParser(resolve_entities=False, no_network=True, remove_comments=True)
        wsdl = etree.parse(str(WSDL_PATH), parser).getroot()
        xsd = etree.parse(str(XSD_PATH), parser).getroot()
        types = wsdl.find("{http://schemas.xmlsoap.org/wsdl/}types")
        for child in list(types):
            types.remove(child)
        types.append(xsd)
        for addr in wsdl.iter("{http://schemas.xmlsoap.org/wsdl/soap/}address", "{http://schemas.xmlsoap.org/wsdl/soap12/}address"):
            addr.set("location", self.endpoint)
        return etree.tostring(wsdl, xml_declaration=True, encoding="UTF-8")

    def get_orders(self, since: datetime, token: str | None, size: int) -> tuple[list[Order], str | None]:
        size = max(1, min(size, 1000))
        with self._lock:
            orders = sorted(self._orders.values(), key=lambda o: (o.updated_at, o.id))
        if token:
            after_t, after_id, since = _decode_token(token)
            pending = [o for o in orders if o.updated_at >= since and (o.updated_at, o.id) > (after_t, after_id)]
        else:
            pending = [o for o in orders if o.updated_at >= since]
        page = pending[:size]
        nxt = _encode_token(page[-1].updated_at, page[-1].id, since) if len(pending) > size else None
        return page, nxt


    def list_orders(self, since: datetime, page_number: int, size: int) -> list[Order]:
        """``ListOrders``: page ``page_number`` (1-based) of the orders with ``updatedAt >= since``.

        Offset paging over ``(updatedAt, id)``, as legacy services do it; a page past the end is
        empty.
        """
        size = max(1, min(size, 1000))
        start = (max(page_number, 1) - 1) * size
        with self._lock:
            orders = sorted((o for o in self._orders.values() if o.updated_at >= since), key=lambda o: (o.updated_at, o.id))
        return orders[start : start + size]


class _Handler(BaseHTTPRequestHandler):
    simulator: SoapSimulator
    timeout = 10  # a client that never sends its request does not hold a thread forever
    server_version = "LegacySoap/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()  # sets the socket timeout first: a client that never handshakes is bounded too
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()  # a failure goes to _Server.handle_error

    def _wsse_authorized(self, body: bytes, soap_ns: str, ctype: str) -> bool:
        sim = self.simulator
        reason = sim._check_wsse(body)
        if reason is None:
            return True
        with sim._lock:
            sim.auth_failures.append(reason)
        self._send(500, _wsse_fault(soap_ns), ctype)
        return False

    def _send(self, status: int, body: bytes, content_type: str = "text/xml; charset=utf-8", extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self) -> bool:
        expected = self.simulator._auth
        if expected is None:
            return True
        if self.headers.get("Authorization", "") == f"Basic {expected}":
            return True
        self._send(401, b"unauthorized", "text/plain", {"WWW-Authenticate": 'Basic realm="legacy"'})
        return False

    def do_GET(self) -> None:
        sim = self.simulator
        sim.requests.append(("GET", self.path))
        if not self._authorized():
            return
        if self.path in ("/?wsdl", "/soap?wsdl"):
            self._send(200, sim.wsdl_document())
        else:
            self._send(404, b"not found", "text/plain")

    def do_POST(self) -> None:
        sim = self.simulator
        sim.requests.append(("POST", self.path))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if not self._authorized():
            return
        ctype = self.headers.get("Content-Type", "")
        soap_ns = SOAP12 if "application/soap+xml" in ctype else SOAP11
        out_ctype = ("application/soap+xml" if soap_ns == SOAP12 else "text/xml") + "; charset=utf-8"
        sim.last_body = body
        if not self._wsse_authorized(body, soap_ns, out_ctype):
            return
        with sim._lock:
            sim.calls += 1
            transient = sim._transient.pop(0) if sim._transient else None
            business, raw = sim._business, sim._raw
        if sim.hang:
            sim._stop.wait()  # accept, read, never answer (released by close())
            return
        if sim.delay:
            sim._stop.wait(sim.delay)
        if transient is not None:
            kind, code = transient
            if kind.startswith("http"):
                status = int(kind[4:])
                self._send(status, f"<html><body>HTTP {status}</body></html>".encode(), "text/html")
            elif kind == "soap_server":
                self._send(500, _fault(soap_ns, "Server", "backend temporarily unavailable"), out_ctype)
            else:
                self._send(500, _fault(soap_ns, "Client", "order service busy, try again later", code), out_ctype)
            return
        if business is not None:
            self._send(500, _fault(soap_ns, "Client", business[1], business[0]), out_ctype)
            return
        if raw is not None:
            self._send(raw[1], raw[0], raw[2])
            return
        try:
            parser = etree.XMLParser(resolve_entities=False, no_network=True)
            doc = etree.fromstring(body, parser)
            since = _parse_dt(doc.findtext(f".//{{{TNS}}}since") or "")
            size = int(doc.findtext(f".//{{{TNS}}}pageSize") or "100")
            if doc.find(f".//{{{TNS}}}ListOrders") is not None:
                op, nxt = "ListOrders", None
                page = sim.list_orders(since, int(doc.findtext(f".//{{{TNS}}}pageNumber") or "1"), size)
            else:
                op = "GetOrdersSince"
                page, nxt = sim.get_orders(since, doc.findtext(f".//{{{TNS}}}pageToken") or None, size)
        except Exception as exc:  # noqa: BLE001 -- a malformed request is the client's fault
            self._send(500, _fault(soap_ns, "Client", f"bad request: {type(exc).__name__}", "BAD-REQUEST"), out_ctype)
            return
        resp = "".join(_order_xml(o, nonconformant=sim.nonconformant) for o in page)
        if nxt:
            resp += f"<tns:nextPageToken>{nxt}</tns:nextPageToken>"
        body = _envelope(soap_ns, f"<tns:{op}Response>{resp}</tns:{op}Response>")
        if sim.trickle:
            self._trickle(body, out_ctype, sim.trickle)
            return
        self._send(200, body, out_ctype)

    def _trickle(self, body: bytes, content_type: str, every: float) -> None:
        """Send ``body`` one byte every ``every`` seconds, until done, the client leaves or close()."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            for i in range(len(body)):
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()
                if self.simulator._stop.wait(every):
                    return
        except OSError:
            return  # the client gave up
