"""ChaosProxy: an in-test TCP proxy (threads + sockets, loopback only) that injects network faults.

Toxiproxy is not installable here (reliability.md), so the chaos tests put this proxy between a
gateway client and RabbitMQ (or PostgreSQL) and break the path on purpose:

* :meth:`ChaosProxy.cut` closes every open connection, both ways (a reset / a dead peer);
* :meth:`ChaosProxy.blackhole` keeps every connection open but silently drops every byte, both
  ways, also on connections opened meanwhile (a partition: no FIN, no RST, nothing);
* :meth:`ChaosProxy.delay` adds latency to every chunk forwarded;
* :meth:`ChaosProxy.restore` ends a black hole or a delay. A connection that lost bytes in a black
  hole is closed then: its byte stream has a hole, so resuming it would hand the peers a corrupt
  protocol stream (a real partition heals by TCP retransmission; ours dropped the bytes for good).
  Peers with working heartbeats have given that connection up by then anyway.

While black-holed, an end of stream from one side is *not* passed on to the other side either: the
other peer must find out by itself (heartbeats), exactly as across a real partition.

Counters: ``accepted`` connections, ``active`` connections, ``bytes_up`` (client to upstream),
``bytes_down`` (upstream to client), ``bytes_dropped`` and ``cuts``.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time
from dataclasses import dataclass, field

__all__ = ["ChaosProxy"]

_CHUNK = 65536


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's socket and ours to the upstream."""

    id: int
    client: socket.socket
    upstream: socket.socket
    tainted: bool = False  #: lost bytes in a black hole: closed on restore()
    closed: bool = False
    threads: list[threading.Thread] = field(default_factory=list)


class ChaosProxy:
    """Forward ``127.0.0.1:listen_port`` to ``upstream_host:upstream_port``, with faults on demand.

    Args:
        upstream_host: where connections go (loopback in the tests).
        upstream_port: the upstream's port.
        listen_host: the address to listen on (loopback only, by default).
        listen_port: 0 picks a free port; see :attr:`listen_port`.
    """

    def __init__(self, upstream_host: str, upstream_port: int, *, listen_host: str = "127.0.0.1", listen_port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._lock = threading.Lock()
        self._links: dict[int, _Link] = {}
        self._ids = itertools.count(1)
        self._blackholed = False
        self._delay = 0.0
        self._closed = False
        self.accepted = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.bytes_dropped = 0
        self.cuts = 0
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind((listen_host, listen_port))
        self._server.listen(128)
        self.listen_host = listen_host
        self.listen_port: int = self._server.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"chaos-proxy-{self.listen_port}", daemon=True)
        self._acceptor.start()

    # ------------------------------------------------------------------ faults
    def cut(self) -> int:
        """Close every open connection both ways; returns how many were closed. New ones still work."""
        with self._lock:
            links = list(self._links.values())
            self.cuts += 1
        for link in links:
            self._close(link)
        return len(links)

    def blackhole(self) -> None:
        """From now on drop every byte both ways, on open and new connections, without closing any."""
        with self._lock:
            self._blackholed = True
            for link in self._links.values():
                link.tainted = True

    def delay(self, seconds: float) -> None:
        """Add ``seconds`` of latency to every chunk forwarded (0 switches it off)."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        self._delay = float(seconds)

    def restore(self) -> int:
        """Forward normally again; close the connections that lost bytes. Returns how many were closed."""
        with self._lock:
            self._blackholed = False
            self._delay = 0.0
            tainted = [link for link in self._links.values() if link.tainted]
        for link in tainted:
            self._close(link)
        return len(tainted)

    def close(self) -> None:
        """Stop listening and close every connection. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            links = list(self._links.values())
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        for link in links:
            self._close(link)
        self._acceptor.join(2.0)

    def __enter__(self) -> ChaosProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ state
    @property
    def active(self) -> int:
        """Connections currently open through the proxy."""
        with self._lock:
            return len(self._links)

    @property
    def blackholed(self) -> bool:
        return self._blackholed

    def url_for(self, url: str) -> str:
        """``url`` (amqp://, postgresql+psycopg://...) with its host:port replaced by the proxy's."""
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(url)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@" if auth else ""
        return urlunsplit(parts._replace(netloc=f"{netloc}{self.listen_host}:{self.listen_port}"))

    # ------------------------------------------------------------------ internals
    def _accept_loop(self) -> None:
        while True:
            try:
                client, _addr = self._server.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.upstream, timeout=5.0)
                upstream.settimeout(None)
            except OSError:
                client.close()  # upstream down: the client sees a closed connection, like a refusal
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                link = _Link(next(self._ids), client, upstream, tainted=self._blackholed)
                self._links[link.id] = link
                self.accepted += 1
            for src, dst, up in ((client, upstream, True), (upstream, client, False)):
                t = threading.Thread(target=self._pump, args=(link, src, dst, up), daemon=True,
                                     name=f"chaos-proxy-{self.listen_port}-{link.id}-{'up' if up else 'down'}")
                link.threads.append(t)
                t.start()

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket, up: bool) -> None:
        while True:
            try:
                data = src.recv(_CHUNK)
            except OSError:
                break
            if not data:
                break
            if self._blackholed:
                link.tainted = True
                self._count_dropped(len(data))
                continue
            if self._delay:
                time.sleep(self._delay)
                if self._blackholed:  # the black hole started while this chunk was in flight
                    link.tainted = True
                    self._count_dropped(len(data))
                    continue
            try:
                dst.sendall(data)
            except OSError:
                break
            with self._lock:
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
        if self._blackholed and link.tainted and not link.closed:
            # Across a partition the other side hears nothing: it must time out by itself. The
            # link is closed for good by restore() or close().
            return
        self._close(link)

    def _count_dropped(self, n: int) -> None:
        with self._lock:
            self.bytes_dropped += n

    def _close(self, link: _Link) -> None:
        with self._lock:
            if link.closed:
                return
            link.closed = True
            self._links.pop(link.id, None)
        for s in (link.client, link.upstream):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
