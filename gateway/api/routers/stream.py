"""``GET /v1/events/stream``: new scored events as Server-Sent Events (scope ``events:read``).

For clients that cannot speak AMQP. Design (docs/decisions/0012-sse.md): each API process runs
one :class:`StreamHub`, started by the first stream request: one consumer of its own queue bound
to the scored exchange with ``#`` (RabbitMQ: a classic queue ``<prefix>.stream.<host>-<pid>-<id>``
that the broker deletes ``x-expires`` after the process is gone; the in-process bus: a queue of
that bus). The hub fans every scored event out to the connected clients whose filters match,
each through a bounded buffer, and keeps the last ``replay`` events for ``Last-Event-ID``.

Per client:

* filters: ``type`` (an AMQP topic pattern on the original event type, ``*`` one word, ``#``
  zero or more), ``source`` (the gateway source name), ``min_score``; a key restricted to some
  sources only ever receives those sources' events;
* ``event: scored``, ``id: <scored event id>``, ``data: <the scored CloudEvent JSON>``;
* a comment line (``: ping - <time>``) every ``heartbeat`` seconds;
* ``Last-Event-ID``: when that id is among the hub's last ``replay`` events, the stream starts
  with the matching events after it; otherwise a comment says the id is unknown and the stream
  carries new events only;
* a buffer of ``buffer`` events: a client that falls that far behind is disconnected (a final
  comment says so when it can be sent); a send blocked longer than ``send_timeout`` ends the
  stream too. Memory per client is bounded; the client reconnects with ``Last-Event-ID``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Header, Query, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from gateway.api.auth import EventsReadDep, Principal
from gateway.api.deps import BusDep
from gateway.api.problems import ApiProblem, problem_responses
from gateway.bus.topology import QueueSpec, Topology
from gateway.events.jsonsafe import loads
from gateway.events.topics import check_pattern, topic_matches

__all__ = ["StreamHub", "StreamSettings", "close_stream_hub", "router"]

log = logging.getLogger("gateway.api.stream")

router = APIRouter(prefix="/events", tags=["events"])


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """Tuning of ``/v1/events/stream`` (``app.state.stream_settings`` overrides the defaults).

    Attributes:
        heartbeat: seconds between comment lines that keep proxies from closing an idle stream.
        buffer: scored events buffered per client; a client that falls further behind is disconnected.
        replay: scored events the hub keeps for ``Last-Event-ID`` (per API process).
        send_timeout: seconds one write to a client may block before the stream is closed.
        queue_expires_ms: RabbitMQ ``x-expires`` of the hub's queue (deleted this long after its consumer is gone).
        queue_max_length: RabbitMQ ``x-max-length`` of the hub's queue (oldest dropped first) should the hub stall.
        prefetch: unacknowledged deliveries the hub's consumer takes ahead.
    """

    heartbeat: float = 15.0
    buffer: int = 1000
    replay: int = 1000
    send_timeout: float = 30.0
    queue_expires_ms: int = 60_000
    queue_max_length: int = 100_000
    prefetch: int = 500


@dataclass(frozen=True, slots=True)
class _Scored:
    id: str
    type: str  # the original event type (the routing key)
    source_name: str | None
    score: float
    body: str


class _Subscriber:
    """One connected client: its filters and its bounded buffer (lives on the event loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pattern: str, sources: frozenset[str] | None,
                 min_score: float | None, buffer: int) -> None:
        self.loop = loop
        self.pattern = pattern
        self.sources = sources
        self.min_score = min_score
        self.queue: asyncio.Queue[_Scored | None] = asyncio.Queue(maxsize=buffer)
        self.overflow = False
        self.closed = False

    def matches(self, item: _Scored) -> bool:
        if self.sources is not None and item.source_name not in self.sources:
            return False
        if self.min_score is not None and item.score < self.min_score:
            return False
        return topic_matches(self.pattern, item.type)

    def offer(self, item: _Scored | None) -> None:
        """On the loop: buffer ``item``; a full buffer marks the client as too slow (``None``: hub closed)."""
        if item is None:
            self.closed = True
        elif self.queue.full():
            self.overflow = True
        else:
            self.queue.put_nowait(item)
            return
        # Wake a reader waiting on an empty queue; a full queue has no waiting reader.
        if self.queue.empty():
            self.queue.put_nowait(None)


def _parse(body: bytes, routing_key: str) -> _Scored | None:
    """The parts of a scored event the filters need; ``None`` (logged) for a malformed one."""
    try:
        raw = loads(body)
        data = raw["data"]
        score = data["score"]
        if not isinstance(raw["id"], str) or isinstance(score, bool) or not isinstance(score, (int, float)):
            raise TypeError("id or data.score of the wrong type")
        original = data.get("event") if isinstance(data.get("event"), dict) else {}
        kind = routing_key or original.get("type") or ""
        source = raw.get("sourcename")
        return _Scored(raw["id"], kind, source if isinstance(source, str) else None, float(score), body.decode("utf-8"))
    except Exception as exc:  # noqa: BLE001 -- one bad message must not stop the stream
        log.warning("stream: skipped a message on the scored exchange that is not a scored event (%s: %s)",
                    type(exc).__name__, exc)
        return None


class StreamHub:
    """One consumer of the scored exchange per API process, fanned out to the SSE clients.

    Args:
        bus: the gateway's bus (``RabbitBus`` or ``InMemoryBus``).
        settings: the stream tuning.
    """

    def __init__(self, bus: Any, settings: StreamSettings) -> None:
        self.settings = settings
        self._bus = bus
        self._lock = threading.Lock()
        self._subs: set[_Subscriber] = set()
        self._ring: deque[_Scored] = deque(maxlen=max(1, settings.replay))
        self._stop = threading.Event()
        self._consumer: Any = None
        self._thread: threading.Thread | None = None
        topology: Topology = bus.topology
        self.queue = f"{topology.prefix}.stream.{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._spec = QueueSpec(self.queue, self._arguments(bus), ((topology.scored_exchange, "#"),))

    def _arguments(self, bus: Any) -> dict[str, Any]:
        if getattr(bus, "kind", None) == "rabbitmq":
            return {"x-queue-type": "classic", "x-expires": self.settings.queue_expires_ms,
                    "x-max-length": self.settings.queue_max_length}
        return {}  # the in-process bus: the hub drains it continuously (and x-max-length would nack the scorer)

    @property
    def subscribers(self) -> int:
        """Connected clients."""
        with self._lock:
            return len(self._subs)

    def start(self) -> None:
        """Declare the hub's queue and start consuming (idempotent).

        Raises:
            ConfigurationError: the bus refused the declaration.
            TransientError: RabbitMQ is not reachable.
        """
        with self._lock:
            if self._thread is not None:
                return
            bus = self._bus
            if getattr(bus, "kind", None) == "rabbitmq":
                from gateway.bus.pika_consumer import PikaConsumer

                topology = replace(bus.topology, extra_queues=bus.topology.extra_queues + (self._spec,))
                con = PikaConsumer(bus.settings, topology, self.queue, self.settings.prefetch, f"{self.queue}-consumer")
                con.start(wait=bus.settings.socket_timeout + 5.0)
            else:
                bus.declare_exchange(bus.topology.scored_exchange, "topic")
                bus.declare_queue(self._spec)
                con = bus.consumer(self.queue, self.settings.prefetch)
            self._consumer = con
            self._thread = threading.Thread(target=self._run, name="gateway-stream-hub", daemon=True)
            self._thread.start()
        log.info("stream: consuming scored events from %s", self.queue)

    def _run(self) -> None:
        con = self._consumer
        while not self._stop.is_set():
            try:
                batch = con.get_batch(self.settings.prefetch, 0.5, 0.0)
            except Exception as exc:  # noqa: BLE001 -- the hub must outlive a bad moment of the bus
                log.warning("stream: reading the scored events failed (%s: %s)", type(exc).__name__, exc)
                self._stop.wait(0.5)
                continue
            if not batch:
                continue
            items = [_parse(d.body, d.routing_key) for d in batch]
            with self._lock:
                for item in items:
                    if item is None:
                        continue
                    self._ring.append(item)
                    for sub in self._subs:
                        if sub.matches(item):
                            self._deliver(sub, item)
            try:
                con.ack(batch)
            except Exception as exc:  # noqa: BLE001 -- redelivered then; clients may see an id twice
                log.warning("stream: ack failed (%s: %s)", type(exc).__name__, exc)

    @staticmethod
    def _deliver(sub: _Subscriber, item: _Scored | None) -> None:
        try:
            sub.loop.call_soon_threadsafe(sub.offer, item)
        except RuntimeError:  # its loop is closed: the client is gone
            pass

    def subscribe(self, sub: _Subscriber, last_event_id: str | None) -> tuple[list[_Scored], bool]:
        """Register ``sub``; with ``last_event_id``, also the kept events after it that match.

        Returns:
            (events to replay, whether ``last_event_id`` was found); registration and the replay
            are one step, so no event is lost or sent twice between them.
        """
        with self._lock:
            self._subs.add(sub)
            if not last_event_id:
                return [], True
            ids = [s.id for s in self._ring]
            if last_event_id not in ids:
                return [], False
            at = len(ids) - 1 - ids[::-1].index(last_event_id)
            return [s for s in list(self._ring)[at + 1:] if sub.matches(s)], True

    def unsubscribe(self, sub: _Subscriber) -> None:
        with self._lock:
            self._subs.discard(sub)

    def close(self) -> None:
        """Stop consuming and end every client's stream. Idempotent."""
        self._stop.set()
        with self._lock:
            subs, self._subs = list(self._subs), set()
        for sub in subs:
            self._deliver(sub, None)
        if self._thread is not None:
            self._thread.join(5)
        if self._consumer is not None:
            try:
                self._consumer.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("stream: closing the consumer failed (%s: %s)", type(exc).__name__, exc)


_HUB_LOCK = threading.Lock()


def _hub(request: Request, bus: Any) -> StreamHub:
    state = request.app.state
    with _HUB_LOCK:
        hub: StreamHub | None = getattr(state, "stream_hub", None)
        if hub is None:
            hub = StreamHub(bus, getattr(state, "stream_settings", None) or StreamSettings())
            state.stream_hub = hub
    return hub


def close_stream_hub(app: FastAPI) -> None:
    """Close the app's stream hub, if a stream ever started (ends every open stream)."""
    hub = getattr(app.state, "stream_hub", None)
    if hub is not None:
        hub.close()


def _sources(principal: Principal, source: str | None) -> frozenset[str] | None:
    """The source names a client receives: its ``source`` filter within its key's restriction."""
    if source is None:
        return principal.sources
    return frozenset({source}) if principal.allows_source(source) else frozenset()


@router.get(
    "/stream",
    response_class=EventSourceResponse,
    responses={
        200: {"description": "A stream of `event: scored` messages and heartbeat comments.",
              "content": {"text/event-stream": {"schema": {"type": "string"}}}},
        **problem_responses(401, 403, 422, 429, 503),
    },
    summary="Stream new scored events (Server-Sent Events)",
)
async def stream_scored(
    request: Request,
    principal: EventsReadDep,
    bus: BusDep,
    event_type: Annotated[str, Query(alias="type", max_length=255,
                                     description="AMQP topic pattern on the original event type (`*` one word, `#` zero or more).")] = "#",
    source: Annotated[str | None, Query(max_length=128, description="Only events of this gateway source.")] = None,
    min_score: Annotated[float | None, Query(ge=0, le=1, description="Only scores >= this.")] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=128,
                                                description="Resume after this scored event id, if this process still keeps it.")] = None,
) -> EventSourceResponse:
    """New scored events as they are published: ``event: scored``, ``id: <scored event id>``,
    ``data: <scored CloudEvent JSON>``; a comment line every ~15 s. A key restricted to some
    sources receives only their events. See docs/api.md#streaming for ``Last-Event-ID`` and the
    slow-client rule."""
    try:
        check_pattern(event_type)
    except ValueError as exc:
        from fastapi.exceptions import RequestValidationError

        raise RequestValidationError(
            [{"type": "value_error", "loc": ("query", "type"), "msg": f"bad topic pattern: {exc}", "input": event_type}]
        ) from None
    if bus is None:
        raise ApiProblem(503, "stream-unavailable", "Streaming unavailable",
                         "this API process has no message bus to read scored events from",
                         headers={"Retry-After": "5"})
    hub = _hub(request, bus)
    try:
        await asyncio.to_thread(hub.start)
    except Exception as exc:  # noqa: BLE001 -- answered as a problem, detail without URLs
        log.warning("stream: the hub could not start (%s: %s)", type(exc).__name__, exc)
        raise ApiProblem(503, "stream-unavailable", "Streaming unavailable",
                         "could not subscribe to the scored events on the message bus; retry later",
                         headers={"Retry-After": "5"}) from None
    cfg = hub.settings
    sub = _Subscriber(asyncio.get_running_loop(), event_type, _sources(principal, source), min_score, max(1, cfg.buffer))
    replay, found = hub.subscribe(sub, last_event_id)

    def message(item: _Scored) -> ServerSentEvent:
        return ServerSentEvent(data=item.body, event="scored", id=item.id)

    async def events() -> AsyncIterator[ServerSentEvent]:
        try:
            yield ServerSentEvent(comment="stream open")
            if last_event_id and not found:
                yield ServerSentEvent(comment=f"Last-Event-ID {last_event_id[:128]} is not among the last {cfg.replay} "
                                              "scored events this process keeps: new events only")
            for item in replay:
                yield message(item)
            while True:
                if sub.overflow:
                    log.warning("stream: client %s (key %s) fell %d events behind: disconnected",
                                request.client, principal.key_id, cfg.buffer)
                    yield ServerSentEvent(comment=f"closing: this client fell {cfg.buffer} events behind; "
                                                  "reconnect with Last-Event-ID")
                    return
                if sub.closed:
                    yield ServerSentEvent(comment="closing: the server is shutting down")
                    return
                item = await sub.queue.get()
                if item is not None and not sub.overflow:
                    yield message(item)
        finally:
            hub.unsubscribe(sub)

    return EventSourceResponse(
        events(), ping=cfg.heartbeat, send_timeout=cfg.send_timeout,
    )
