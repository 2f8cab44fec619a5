"""A legacy SOAP order service, served over real HTTP on 127.0.0.1 (standard library only).

Document/literal, SOAP 1.1 and SOAP 1.2 bindings, one operation::

    GetOrdersSince(since: dateTime, pageToken: string?, pageSize: int)
        -> orders: Order*, nextPageToken: string?

Orders with ``updatedAt >= since`` are returned ordered by ``(updatedAt, id)``; the page token is an
opaque keyset position (the last ``(updatedAt, id)`` of the page), so updates between pages never
shift later pages. ``since`` is inclusive, the way many legacy services behave: the client must
filter what it already has.

Test controls (all thread-safe): :meth:`add_orders`, :meth:`upsert`, :meth:`require_auth`,
:meth:`fail_next` (N transient faults: HTTP 503 or soap:Server), :meth:`business_fault` (a permanent
soap:Client fault with a code), ``delay`` (seconds before answering), ``hang`` (accept, never
answer) and :meth:`serve_raw` (answer operations with a given body: attack payloads).

Use it as a context manager, or call :meth:`start` and :meth:`close`; ``close`` stops the server
and joins every thread it started.
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from lxml import etree

__all__ = ["Order", "SoapSimulator", "WSDL_PATH", "XSD_PATH", "T0"]

HERE = Path(__file__).resolve().parent
WSDL_PATH = HERE / "legacy_orders.wsdl"
XSD_PATH = HERE / "legacy_orders.xsd"
TNS = "urn:legacy:orders"
SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
T0 = datetime(2024, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


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
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _parse_dt(text: str) -> datetime:
    text = text.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _order_xml(o: Order) -> str:
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
    parts.append("</tns:orders>")
    return "".join(parts)


def _envelope(soap_ns: str, body: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>'
        f'<soap:Envelope xmlns:soap="{soap_ns}" xmlns:tns="{TNS}" '
        f'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        f"<soap:Body>{body}</soap:Body></soap:Envelope>"
    ).encode("utf-8")


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


class SoapSimulator:
    """The simulated service. Args: ``host`` (loopback) and ``port`` (0: ephemeral)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._lock = threading.Lock()
        self._orders: dict[int, Order] = {}
        self._auth: str | None = None
        self._transient: list[str] = []
        self._business: tuple[str, str] | None = None
        self._raw: tuple[bytes, int, str] | None = None
        self._stop = threading.Event()
        self.delay = 0.0
        self.hang = False
        #: Every request as (method, path), including refused ones.
        self.requests: list[tuple[str, str]] = []
        #: Operation calls that reached the service (after auth).
        self.calls = 0
        sim = self

        class Handler(_Handler):
            simulator = sim

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = False  # server_close() joins handler threads
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle
    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

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

    def __enter__(self) -> SoapSimulator:
        return self.start()

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

    def fail_next(self, n: int, kind: str = "http503") -> None:
        """The next ``n`` operation calls fail: ``http503`` or ``soap_server`` (soap:Server fault)."""
        assert kind in ("http503", "soap_server")
        with self._lock:
            self._transient.extend([kind] * n)

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


class _Handler(BaseHTTPRequestHandler):
    simulator: SoapSimulator
    timeout = 10  # a client that never sends its request does not hold a thread forever
    server_version = "LegacySoap/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 -- quiet
        pass

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

    def do_GET(self) -> None:  # noqa: N802
        sim = self.simulator
        sim.requests.append(("GET", self.path))
        if not self._authorized():
            return
        if self.path in ("/?wsdl", "/soap?wsdl"):
            self._send(200, sim.wsdl_document())
        else:
            self._send(404, b"not found", "text/plain")

    def do_POST(self) -> None:  # noqa: N802
        sim = self.simulator
        sim.requests.append(("POST", self.path))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if not self._authorized():
            return
        ctype = self.headers.get("Content-Type", "")
        soap_ns = SOAP12 if "application/soap+xml" in ctype else SOAP11
        out_ctype = ("application/soap+xml" if soap_ns == SOAP12 else "text/xml") + "; charset=utf-8"
        with sim._lock:
            sim.calls += 1
            transient = sim._transient.pop(0) if sim._transient else None
            business, raw = sim._business, sim._raw
        if sim.hang:
            sim._stop.wait()  # accept, read, never answer (released by close())
            return
        if sim.delay:
            sim._stop.wait(sim.delay)
        if transient == "http503":
            self._send(503, b"<html><body>Service Unavailable</body></html>", "text/html")
            return
        if transient == "soap_server":
            self._send(500, _fault(soap_ns, "Server", "backend temporarily unavailable"), out_ctype)
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
            token = doc.findtext(f".//{{{TNS}}}pageToken") or None
            size = int(doc.findtext(f".//{{{TNS}}}pageSize") or "100")
            page, nxt = sim.get_orders(since, token, size)
        except Exception as exc:  # noqa: BLE001 -- a malformed request is the client's fault
            self._send(500, _fault(soap_ns, "Client", f"bad request: {type(exc).__name__}", "BAD-REQUEST"), out_ctype)
            return
        resp = "".join(_order_xml(o) for o in page)
        if nxt:
            resp += f"<tns:nextPageToken>{nxt}</tns:nextPageToken>"
        self._send(200, _envelope(soap_ns, f"<tns:GetOrdersSinceResponse>{resp}</tns:GetOrdersSinceResponse>"), out_ctype)
