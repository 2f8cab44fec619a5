"""A small, real Open Inference Protocol v2 server for tests (stdlib ``http.server``, loopback only).

It serves one model: ``GET /v2/models/<m>[/versions/<v>]`` (metadata), ``POST .../infer`` and the
health endpoints, and validates requests like a strict server (input name, datatype, shape against
the data). The score is deterministic: by default ``sum(row) / 100`` per event (``fn`` replaces it;
it returns the output row of one input row). Faults can be switched on and off while it runs:

* ``fail(status, retry_after=None, times=None)`` -- answer ``status`` with an ``{"error": ...}`` body;
* ``slow(seconds)`` -- wait before answering (``recover()`` releases the waiting requests);
* ``malformed(kind)`` -- a broken answer: ``not-json``, ``no-outputs``, ``wrong-count``, ``nan``,
  ``string``, ``bad-shape``, ``renamed`` (the output under another name);
* ``drop(times)`` -- read the request, then close the connection without answering;
* ``recover()`` -- back to normal.

Every request is recorded (method, path, headers, JSON body) in :attr:`OipServer.requests`.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

__all__ = ["OipServer", "Recorded"]


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True  # a request held by slow() must not keep the test process alive

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that time out and hang up are part of the tests


@dataclass(frozen=True)
class Recorded:
    """One request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


class OipServer:
    """An OIP v2 model server on ``127.0.0.1`` and a free port, served from a daemon thread.

    Args:
        model: model name.
        versions: versions listed in the metadata (and accepted in ``/versions/<v>`` paths).
        width: input width the metadata declares (``-1``: variable) and requests must have.
        input_name, output_name, datatype: tensor names and the input datatype.
        outputs: values per event of the output (2: ``[1 - p, p]`` rows from the default ``fn``).
        nested: answer with nested (``[[...], ...]``) instead of flat data.
        require_headers: headers every request must carry (else 401).
        unknown_model_status: status for an unknown model or version (Triton answers 400).
    """

    def __init__(
        self,
        model: str = "fraud",
        *,
        versions: tuple[str, ...] = ("3",),
        width: int = 2,
        input_name: str = "input-0",
        output_name: str = "output-0",
        datatype: str = "FP32",
        outputs: int = 1,
        nested: bool = False,
        require_headers: dict[str, str] | None = None,
        unknown_model_status: int = 404,
    ) -> None:
        self.model, self.versions, self.width = model, versions, width
        self.input_name, self.output_name, self.datatype = input_name, output_name, datatype
        self.outputs, self.nested = outputs, nested
        self.require_headers = dict(require_headers or {})
        self.unknown_model_status = unknown_model_status
        self.fn: Callable[[list[float]], list[float]] = self._default_fn
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._failure: tuple[int, str | None, int | None] | None = None
        self._delay = 0.0
        self._malformed: str | None = None
        self._drops = 0
        self._httpd = _QuietServer(("127.0.0.1", 0), self._handler())
        self._connections: set[Any] = set()  # open keep-alive connections, cut by stop()
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="oip-server",
                                        daemon=True)

    # ------------------------------------------------------------------ life cycle
    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:40123``."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Self:
        """Serve in the background; returns ``self``."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, release waiting requests and cut open connections (clients see a refusal next)."""
        self._release.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for conn in connections:
            try:
                conn.shutdown(2)
            except OSError:
                pass

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ faults
    def fail(self, status: int, *, retry_after: str | None = None, times: int | None = None) -> None:
        """Answer every model request (``times`` of them, if given) with ``status``."""
        with self._lock:
            self._failure = (status, retry_after, times)

    def slow(self, seconds: float) -> None:
        """Wait ``seconds`` before answering model requests (until :meth:`recover`)."""
        with self._lock:
            self._release.clear()
            self._delay = seconds

    def malformed(self, kind: str) -> None:
        """Answer inference requests with a broken answer of ``kind`` (see the module docstring)."""
        with self._lock:
            self._malformed = kind

    def drop(self, times: int = 1) -> None:
        """Close the next ``times`` connections after reading the request, without an answer."""
        with self._lock:
            self._drops = times

    def recover(self) -> None:
        """Back to normal; requests waiting in :meth:`slow` are answered at once."""
        with self._lock:
            self._failure, self._delay, self._malformed, self._drops = None, 0.0, None, 0
            self._release.set()

    def infer_requests(self) -> list[Recorded]:
        """The inference requests received so far."""
        with self._lock:
            return [r for r in self.requests if r.method == "POST"]

    # ------------------------------------------------------------------ the model
    def _default_fn(self, row: list[float]) -> list[float]:
        p = min(1.0, max(0.0, sum(row) / 100.0))
        return [p] if self.outputs == 1 else [1.0 - p] + [p] * (self.outputs - 1)

    def _metadata(self) -> dict[str, Any]:
        return {
            "name": self.model,
            "versions": list(self.versions),
            "platform": "test_python",
            "inputs": [{"name": self.input_name, "datatype": self.datatype, "shape": [-1, self.width]}],
            "outputs": [{"name": self.output_name, "datatype": "FP32",
                         "shape": [-1] if self.outputs == 1 else [-1, self.outputs]}],
        }

    def _infer(self, body: Any) -> tuple[int, Any]:
        try:
            [tensor] = body["inputs"]
            name, shape, datatype, data = tensor["name"], tensor["shape"], tensor["datatype"], tensor["data"]
        except (KeyError, TypeError, ValueError):
            return 400, {"error": "expected one input with name, shape, datatype and data"}
        if name != self.input_name or datatype != self.datatype:
            return 400, {"error": f"unexpected input {name!r} of {datatype}"}
        if not (isinstance(shape, list) and len(shape) == 2 and shape[1] == self.width
                and len(data) == shape[0] * shape[1]):
            return 400, {"error": f"shape {shape} does not match the data or the width {self.width}"}
        if "outputs" in body and [o.get("name") for o in body["outputs"]] != [self.output_name]:
            return 400, {"error": "unknown output requested"}
        n, w = shape
        rows = [self.fn([float(x) for x in data[i * w:(i + 1) * w]]) for i in range(n)]
        kind = self._malformed
        if kind == "wrong-count":
            rows = rows[:-1] if n > 1 else rows + rows
        if kind == "nan":
            rows[0] = [math.nan] * len(rows[0])
        k = len(rows[0])
        out_shape = [len(rows)] if k == 1 else [len(rows), k]
        data_out: list[Any] = [r[0] for r in rows] if k == 1 else (
            rows if self.nested else [x for r in rows for x in r])
        if kind == "string":
            data_out[0] = "high"
        if kind == "bad-shape":
            out_shape = [len(rows) + 1]
        if kind == "no-outputs":
            return 200, {"model_name": self.model, "id": body.get("id", ""), "outputs": []}
        output = {"name": "other" if kind == "renamed" else self.output_name, "shape": out_shape, "datatype": "FP32", "data": data_out}
        return 200, {"model_name": self.model, "model_version": self.versions[-1] if self.versions else None,
                     "id": body.get("id", ""), "outputs": [output]}

    def _route(self, method: str, path: str) -> tuple[str, bool]:
        """(``metadata``/``infer``/``ready``/``live``/``unknown``, whether the model path is known)."""
        if path in ("/v2/health/ready", "/v2/health/live"):
            return path.rsplit("/", 1)[1], True
        parts = path.strip("/").split("/")
        if parts[:2] != ["v2", "models"] or len(parts) < 3:
            return "unknown", False
        rest = parts[3:]
        known = parts[2] == self.model
        if rest[:1] == ["versions"]:
            known = known and len(rest) >= 2 and rest[1] in self.versions
            rest = rest[2:]
        if rest == [] and method == "GET":
            return "metadata", known
        if rest == ["infer"] and method == "POST":
            return "infer", known
        if rest == ["ready"] and method == "GET":
            return "ready", known
        return "unknown", False

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real model servers do

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def setup(self) -> None:
                super().setup()
                with server._lock:
                    server._connections.add(self.connection)

            def finish(self) -> None:
                with server._lock:
                    server._connections.discard(self.connection)
                try:
                    super().finish()
                except OSError:
                    pass

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                with server._lock:
                    server.requests.append(Recorded(method, self.path, dict(self.headers.items()), body))
                    failure, delay, drop = server._failure, server._delay, server._drops > 0
                    if drop:
                        server._drops -= 1
                    if failure is not None and failure[2] is not None:
                        remaining = failure[2] - 1
                        server._failure = (failure[0], failure[1], remaining) if remaining > 0 else None
                kind, known = server._route(method, self.path)
                if kind in ("live", "ready"):
                    return self._send(200, {kind: True} if kind == "live" else {"ready": True})
                if drop:
                    self.close_connection = True
                    self.connection.shutdown(2)  # no answer at all: the client sees a disconnect
                    return
                if delay:
                    server._release.wait(delay)
                for key, value in server.require_headers.items():
                    if self.headers.get(key) != value:
                        return self._send(401, {"error": "unauthorized"})
                if failure is not None:
                    headers = {"Retry-After": failure[1]} if failure[1] is not None else {}
                    return self._send(failure[0], {"error": f"failing with {failure[0]}"}, headers)
                if not known:
                    return self._send(server.unknown_model_status if kind != "unknown" else 404,
                                      {"error": f"unknown model or path {self.path}"})
                if kind == "metadata":
                    return self._send(200, server._metadata())
                if kind == "ready":
                    return self._send(200, {"name": server.model, "ready": True})
                if server._malformed == "not-json":
                    return self._send_raw(200, b"<html>gateway timeout</html>", "text/html")
                status, answer = server._infer(body)
                self._send(status, answer)

            def _send(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
                self._send_raw(status, json.dumps(obj).encode(), "application/json", headers)

            def _send_raw(self, status: int, data: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout) and closed the connection
                    self.close_connection = True

        return Handler
