"""``GET /v1/events/stream`` (issue 8): scored events as Server-Sent Events.

An embedded gateway (relay + a real scoring worker, SQLite store, in-process bus) scores events
and publishes them to the scored exchange; the API is served by uvicorn on a loopback port and
read with httpx, as a browser's EventSource would. The slow-client test drives the ASGI app
directly with a ``send`` that stalls, which no real socket does deterministically.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from gateway.api import create_app
from gateway.api.auth import key_secret
from gateway.api.routers.stream import StreamSettings
from gateway.config import Settings
from gateway.events import Event
from gateway.events.scored import scored_event_id
from gateway.runtime import Gateway
from gateway.store import EventStore
from tests.unit.test_api import assert_problem

SECRET = "t" * 40
T0 = "2024-05-01T12:00:00Z"


def event(i: int, *, type_: str = "com.acme.order.changed", source: str = "orders", amount: float = 10.0) -> Event:
    return Event.from_dict({
        "specversion": "1.0", "id": f"{source}-{i}", "source": f"/legacy/{source}", "type": type_, "time": T0,
        "data": {"n": i, "amount": amount}, "sourcename": source,
    })


@dataclass
class Message:
    event: str | None = None
    id: str | None = None
    data: str | None = None
    comments: list[str] = field(default_factory=list)

    @property
    def json(self) -> Any:
        assert self.data is not None
        return json.loads(self.data)


class Stream:
    """An SSE client on a thread: messages as they arrive."""

    def __init__(self, url: str, headers: dict[str, str], params: dict[str, Any] | None = None) -> None:
        self._client = httpx.Client(timeout=httpx.Timeout(10.0, read=None))
        self._cm = self._client.stream("GET", url, headers=headers, params=params)
        self.response = self._cm.__enter__()
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.closed_by_client = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for line in self.response.iter_lines():
                self._lines.put(line)
        except httpx.HTTPError:  # closed by the test
            self.closed_by_client = True
        finally:
            self._lines.put(None)

    def next(self, timeout: float = 10.0) -> Message | None:
        """The next message (``None``: the server ended the stream)."""
        msg, seen = Message(), False
        deadline = time.monotonic() + timeout
        while True:
            line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if line is None:
                return None
            if line == "":
                if seen:
                    return msg
                continue
            seen = True
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "":
                msg.comments.append(value)
            elif name == "data":
                msg.data = value if msg.data is None else msg.data + "\n" + value
            elif name in ("event", "id"):
                setattr(msg, name, value)

    def next_scored(self, timeout: float = 10.0) -> Message:
        """The next ``scored`` message, skipping comments."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.next(max(0.01, deadline - time.monotonic()))
            assert msg is not None, "the stream ended"
            if msg.event is not None:
                assert msg.event == "scored"
                return msg

    def close(self) -> None:
        self.response.close()
        self._cm.__exit__(None, None, None)
        self._client.close()


@dataclass
class Rig:
    gw: Gateway
    app: Any
    base: str
    version: str

    def key(self, scopes: list[str], sources: list[str] | None = None) -> dict[str, str]:
        _, token = self.gw.store.create_api_key("t", scopes, sources, secret=key_secret(self.gw.settings, self.gw.store))
        return {"Authorization": f"Bearer {token}"}

    def stream(self, headers: dict[str, str], **params: Any) -> Stream:
        s = Stream(f"{self.base}/v1/events/stream", headers, params or None)
        assert s.response.status_code == 200, s.response.read()
        assert s.response.headers["content-type"].startswith("text/event-stream")
        opened = s.next()
        assert opened is not None and opened.comments == ["stream open"]  # subscribed from here on
        return s

    def accept(self, *events: Event) -> None:
        for ev in events:
            self.gw.store.accept([ev], source_name=ev.extensions["sourcename"])
        self.gw.wake_relay()

    def scored_id(self, ev: Event) -> str:
        return scored_event_id(ev.id, "guard", self.version)

    @property
    def hub(self) -> Any:
        return self.app.state.stream_hub


def gateway_settings(tmp_path: Path) -> Settings:
    return Settings(
        profile="test", store={"url": f"sqlite:///{tmp_path / 'g.db'}"}, relay={"idle_wait": 0.02},
        api={"key_secret": SECRET},
        scoring={"model": "guard", "checkpoint_interval": 0, "models": {"guard": {"kind": "rules", "options": {
            "rules": [{"when": "data.amount > 100", "score": 0.9, "reason": "big"}], "default": 0.2}}}},
    )


@contextlib.contextmanager
def served(gw: Gateway, stream: StreamSettings) -> Iterator[Rig]:
    """The API of ``gw`` under a real uvicorn on a free loopback port (lifespan on), as a :class:`Rig`.

    On the way out uvicorn must stop although streams may be open: the lifespan's shutdown closes
    the hub, which ends them.
    """
    app = create_app(gw.settings, gw.store, gw.bus)
    app.state.stream_settings = stream
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield Rig(gw, app, f"http://127.0.0.1:{sock.getsockname()[1]}", gw.scorers[0].scorer.version)
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop: an open stream was not ended"


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    gw = Gateway(gateway_settings(tmp_path), roles=["relay", "scorer"])
    gw.start()
    try:
        with served(gw, StreamSettings(heartbeat=0.3, buffer=50, replay=100, send_timeout=5)) as r:
            yield r
    finally:
        gw.stop()


def wait_for(cond: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# ---------------------------------------------------------------------------- delivery
def test_scored_events_of_a_real_scoring_worker_arrive_as_sse(rig: Rig) -> None:
    s = rig.stream(rig.key(["events:read"]))
    try:
        evs = [event(1), event(2, amount=500.0), event(3)]
        rig.accept(*evs)
        got = [s.next_scored() for _ in evs]
        assert sorted(m.id for m in got) == sorted(rig.scored_id(e) for e in evs)  # type: ignore[type-var]
        by_original = {m.json["data"]["event"]["id"]: m for m in got}
        for ev in evs:
            m = by_original[ev.id]
            body = m.json
            assert body["id"] == m.id and body["type"] == f"{ev.type}.scored" and body["specversion"] == "1.0"
            assert body["data"]["model"] == {"name": "guard", "version": rig.version}
            assert body["data"]["score"] == (0.9 if ev.data["amount"] > 100 else 0.2)  # type: ignore[index]
            assert body["data"]["event"]["data"] == ev.data and body["sourcename"] == "orders"
    finally:
        s.close()
    wait_for(lambda: rig.hub.subscribers == 0, "the closed client to be unsubscribed")


def test_filters_type_pattern_source_and_min_score(rig: Rig) -> None:
    key = rig.key(["events:read"])
    payments = rig.stream(key, type="com.acme.payment.#")
    big = rig.stream(key, min_score=0.5)
    billing = rig.stream(key, source="billing", type="*.*.*.changed")
    try:
        small_order, big_payment = event(1), event(2, type_="com.acme.payment.card.received", amount=900.0)
        billing_change = event(3, source="billing", type_="com.acme.invoice.changed")
        billing_deep = event(4, source="billing", type_="com.acme.invoice.line.changed")  # 5 words: not *.*.*.changed
        rig.accept(small_order, big_payment, billing_change, billing_deep)
        assert payments.next_scored().id == rig.scored_id(big_payment)
        assert big.next_scored().id == rig.scored_id(big_payment)
        assert billing.next_scored().id == rig.scored_id(billing_change)
        last = event(5, type_="com.acme.payment.refund", amount=1000.0)
        rig.accept(last)  # each stream's next event shows nothing else came in between
        assert payments.next_scored().id == rig.scored_id(last)
        assert big.next_scored().id == rig.scored_id(last)
        msg = billing.next(timeout=2)
        assert msg is not None and msg.event is None and msg.comments[0].startswith("ping")
    finally:
        for s in (payments, big, billing):
            s.close()


def test_a_restricted_key_never_sees_other_sources(rig: Rig) -> None:
    orders_only = rig.key(["events:read"], ["orders"])
    mine = rig.stream(orders_only)
    asks_other = rig.stream(orders_only, source="billing")
    try:
        other, own = event(1, source="billing"), event(2, source="orders")
        rig.accept(other, own)
        assert mine.next_scored().id == rig.scored_id(own)
        extra = event(3, source="orders")
        rig.accept(extra)
        assert mine.next_scored().id == rig.scored_id(extra)  # the billing event was never sent
        for _ in range(3):  # only heartbeats for a source outside the key's restriction
            msg = asks_other.next(timeout=2)
            assert msg is not None and msg.event is None and msg.data is None
    finally:
        mine.close()
        asks_other.close()


def test_heartbeat_comments_keep_an_idle_stream_alive(rig: Rig) -> None:
    s = rig.stream(rig.key(["events:read"]))
    try:
        started = time.monotonic()
        pings = [s.next(timeout=2) for _ in range(3)]
        assert all(p is not None and p.event is None and p.comments[0].startswith("ping") for p in pings)
        assert 0.6 <= time.monotonic() - started < 3  # every 0.3 s here (15 s by default)
    finally:
        s.close()


def test_last_event_id_replays_what_this_process_kept_after_it(rig: Rig) -> None:
    key = rig.key(["events:read"], ["orders"])
    first = rig.stream(key)
    evs = [event(i) for i in range(1, 4)]
    rig.accept(*evs)
    seen = [first.next_scored() for _ in evs]
    first.close()
    later = [event(4), event(5, source="billing"), event(6)]
    rig.accept(*later)
    wait_for(lambda: len(rig.gw.store.get_scores([e.id for e in later], "guard", rig.version)) == 3, "the later scores")
    time.sleep(0.3)  # the hub has them once published
    again = rig.stream(key, type="#")
    resumed = Stream(f"{rig.base}/v1/events/stream", {**key, "Last-Event-ID": seen[0].id or ""})
    try:
        assert resumed.next() is not None  # "stream open"
        replayed = [resumed.next_scored().id for _ in range(4)]
        expected = [m.id for m in seen[1:]] + [rig.scored_id(later[0]), rig.scored_id(later[2])]
        assert replayed == expected  # in publication order, without the billing event
        unknown = Stream(f"{rig.base}/v1/events/stream", {**key, "Last-Event-ID": "no-such-id"})
        try:
            assert unknown.next() is not None
            note = unknown.next()
            assert note is not None and "is not among the last 100 scored events" in note.comments[0]
        finally:
            unknown.close()
        fresh = event(7)
        rig.accept(fresh)
        assert resumed.next_scored().id == again.next_scored().id == rig.scored_id(fresh)
    finally:
        resumed.close()
        again.close()


# ---------------------------------------------------------------------------- slow clients
def test_a_client_that_falls_behind_its_buffer_is_disconnected(rig: Rig) -> None:
    """The client takes the first chunk, then stalls: the hub's events fill its buffer (3 here),
    the stream is cut, and the subscriber is gone; memory never held more than the buffer."""
    rig.app.state.stream_settings = StreamSettings(heartbeat=60, buffer=3, replay=10, send_timeout=30)  # (no hub yet)
    token = rig.key(["events:read"])["Authorization"]
    sent: list[dict[str, Any]] = []

    async def drive() -> None:
        stalled = asyncio.Event()
        release = asyncio.Event()

        async def receive() -> dict[str, Any]:
            await asyncio.Event().wait()  # the client never disconnects by itself
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and len(sent) == 2:
                stalled.set()
                await release.wait()  # a client that stopped reading

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
            "path": "/v1/events/stream", "raw_path": b"/v1/events/stream", "query_string": b"", "root_path": "",
            "headers": [(b"authorization", token.encode()), (b"host", b"test")],
            "client": ("127.0.0.1", 1234), "server": ("test", 80),
        }
        task = asyncio.create_task(rig.app(scope, receive, send))
        await asyncio.wait_for(stalled.wait(), 10)
        hub = rig.app.state.stream_hub
        assert hub.subscribers == 1
        await asyncio.to_thread(rig.accept, *[event(i) for i in range(10)])
        sub = next(iter(hub._subs))
        deadline = time.monotonic() + 10
        while not sub.overflow:
            assert time.monotonic() < deadline, "the buffer never overflowed"
            await asyncio.sleep(0.01)
        assert sub.queue.qsize() == 3  # bounded: the other events were never buffered
        release.set()
        await asyncio.wait_for(task, 10)
        assert hub.subscribers == 0

    asyncio.run(drive())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    bodies = b"".join(m.get("body", b"") for m in sent[1:]).decode()
    assert bodies.startswith(": stream open")
    assert "closing: this client fell 3 events behind; reconnect with Last-Event-ID" in bodies
    assert "event: scored" not in bodies  # cut off at once, not after the buffered events
    assert sent[-1]["type"] == "http.response.body" and not sent[-1].get("more_body", False)


# ---------------------------------------------------------------------------- errors
def test_status_codes(sqlite_store: EventStore) -> None:
    cfg = Settings(profile="test", api={"key_secret": SECRET})
    _, read = sqlite_store.create_api_key("r", ["events:read"], None, secret=key_secret(cfg, sqlite_store))
    _, write = sqlite_store.create_api_key("w", ["events:write"], None, secret=key_secret(cfg, sqlite_store))
    c = TestClient(create_app(cfg, sqlite_store), raise_server_exceptions=False)  # no bus
    assert_problem(c.get("/v1/events/stream"), 401)
    body = assert_problem(c.get("/v1/events/stream", headers={"Authorization": f"Bearer {write}"}), 403)
    assert "events:read" in body["detail"]
    bad = assert_problem(c.get("/v1/events/stream", params={"type": "a..b"}, headers={"Authorization": f"Bearer {read}"}), 422)
    assert bad["errors"][0]["loc"] == ["query", "type"] and "empty word" in bad["errors"][0]["msg"]
    bad = assert_problem(c.get("/v1/events/stream", params={"min_score": 2}, headers={"Authorization": f"Bearer {read}"}), 422)
    assert bad["errors"][0]["loc"] == ["query", "min_score"]
    gone = assert_problem(c.get("/v1/events/stream", headers={"Authorization": f"Bearer {read}"}), 503)
    assert gone["type"].endswith("stream-unavailable") and gone["detail"] == (
        "this API process has no message bus to read scored events from")
    # Not shadowed by GET /v1/events/{event_id}; documented as a stream.
    spec = c.get("/openapi.json").json()["paths"]["/v1/events/stream"]["get"]
    assert "text/event-stream" in spec["responses"]["200"]["content"]
