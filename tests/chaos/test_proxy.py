"""ChaosProxy itself, against a local echo server (fast; no services, not marked chaos)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.chaos.proxy import ChaosProxy


class EchoServer:
    """Echoes every byte back; counts the connections it sees open and closed by the peer."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.opened = 0
        self.eofs = 0
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.opened += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    break
                if not data:
                    self.eofs += 1
                    break
                with contextlib.suppress(OSError):
                    conn.sendall(data)

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[ChaosProxy]:
    p = ChaosProxy("127.0.0.1", echo.port)
    yield p
    p.close()


def _client(proxy: ChaosProxy, timeout: float = 2.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", proxy.listen_port), timeout=timeout)
    return s


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def _until(check, timeout: float = 2.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return check()


def test_forwards_both_ways_and_counts(proxy: ChaosProxy) -> None:
    payload = bytes(range(256)) * 1000  # 256 kB: several chunks
    with _client(proxy) as s:
        s.sendall(payload)
        assert _recv_exactly(s, len(payload)) == payload
    assert proxy.accepted == 1
    assert _until(lambda: proxy.bytes_up == len(payload) and proxy.bytes_down == len(payload))
    assert _until(lambda: proxy.active == 0)  # the client's close went through
    assert proxy.listen_host == "127.0.0.1" and proxy.listen_port > 0


def test_cut_closes_every_connection_and_new_ones_work(proxy: ChaosProxy, echo: EchoServer) -> None:
    a, b = _client(proxy), _client(proxy)
    for s in (a, b):
        s.sendall(b"ping")
        assert _recv_exactly(s, 4) == b"ping"
    assert proxy.cut() == 2
    for s in (a, b):
        with contextlib.suppress(ConnectionResetError):  # EOF or reset: both mean closed
            assert s.recv(10) == b""
        s.close()
    assert _until(lambda: echo.eofs == 2)  # the upstream side was closed as well
    with _client(proxy) as c:
        c.sendall(b"again")
        assert _recv_exactly(c, 5) == b"again"
    assert proxy.accepted == 3 and proxy.cuts == 1


def test_blackhole_drops_silently_both_ways_then_restore_closes_the_broken_link(proxy: ChaosProxy, echo: EchoServer) -> None:
    s = _client(proxy, timeout=0.5)
    s.sendall(b"before")
    assert _recv_exactly(s, 6) == b"before"
    proxy.blackhole()
    s.sendall(b"lost")
    with pytest.raises(socket.timeout):  # nothing comes back, and the connection is not closed
        s.recv(10)
    assert proxy.bytes_dropped >= 4 and proxy.active == 1
    # A connection opened during the black hole is accepted but hears nothing either.
    late = _client(proxy, timeout=0.5)
    late.sendall(b"hello")
    with pytest.raises(socket.timeout):
        late.recv(10)
    # The client gives up: its end of stream is not passed on to the upstream side.
    late.close()
    time.sleep(0.2)
    assert echo.eofs == 0
    assert proxy.restore() == 2  # both lost bytes: closed now
    with contextlib.suppress(ConnectionResetError):
        assert s.recv(10) == b""
    s.close()
    assert _until(lambda: echo.eofs == 2 and proxy.active == 0)
    with _client(proxy) as c:
        c.sendall(b"after")
        assert _recv_exactly(c, 5) == b"after"


def test_delay_adds_latency_per_chunk(proxy: ChaosProxy) -> None:
    with _client(proxy) as s:
        started = time.monotonic()
        s.sendall(b"x")
        assert _recv_exactly(s, 1) == b"x"
        fast = time.monotonic() - started
        proxy.delay(0.2)
        started = time.monotonic()
        s.sendall(b"y")
        assert _recv_exactly(s, 1) == b"y"
        slow = time.monotonic() - started
        proxy.restore()
        started = time.monotonic()
        s.sendall(b"z")
        assert _recv_exactly(s, 1) == b"z"
        again = time.monotonic() - started
    assert fast < 0.1 and again < 0.1
    assert slow >= 0.4  # 0.2 s up and 0.2 s down
    with pytest.raises(ValueError):
        proxy.delay(-1)


def test_close_stops_listening(echo: EchoServer) -> None:
    p = ChaosProxy("127.0.0.1", echo.port)
    s = _client(p)
    p.close()
    with contextlib.suppress(ConnectionResetError):
        assert s.recv(10) == b""
    s.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", p.listen_port), timeout=0.5).close()
    p.close()  # idempotent


def test_upstream_down_closes_the_client(echo: EchoServer) -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nothing listens there now
    with ChaosProxy("127.0.0.1", port) as p, _client(p) as s:
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(10) == b""
        assert p.accepted == 0


def test_url_for_keeps_credentials_and_path() -> None:
    with ChaosProxy("127.0.0.1", 5672) as p:
        url = p.url_for("amqp://guest:guest@127.0.0.1:5672/%2F")
        assert url == f"amqp://guest:guest@127.0.0.1:{p.listen_port}/%2F"
        assert p.url_for("postgresql+psycopg://postgres@127.0.0.1:5432/test") == (
            f"postgresql+psycopg://postgres@127.0.0.1:{p.listen_port}/test"
        )
