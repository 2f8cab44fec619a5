"""pika plumbing shared by the publisher and the consumer (REL-03, REL-10).

Connection parameters, reconnect backoff, the thread guard, asynchronous topology declaration
and :class:`IOThreadClient`, the base of one connection driven by its own I/O thread.

Everything here is shared by the publisher, the consumer and the bus itself, so the connection
hygiene rules live in one place:

* every connection sets ``heartbeat``, ``blocked_connection_timeout`` and the socket and stack
  timeouts, and makes exactly one connection attempt (reconnects use our own jittered backoff);
* the AMQP URL is a ``SecretStr``: it is unwrapped only to build the parameters, and
  :func:`redact` scrubs the password from anything that may reach a log or an error message;
* pika objects are not thread-safe: :class:`ThreadGuard` (debug mode) makes any touch from a
  thread other than the owning I/O thread raise :class:`ThreadOwnershipError`;
* a silent network is detected within 2-2.5x the heartbeat (REL-05): pika 1.4's own checker
  only looks every ``heartbeat + 5`` s and needs a whole such interval without a byte (7-14 s
  for a 2 s heartbeat), so every connection also runs our check, every ``heartbeat / 2``: no byte
  from the broker (which sends a heartbeat frame every ``heartbeat / 2`` when idle) for
  ``2 x heartbeat`` ends the connection with ``AMQPHeartbeatTimeout`` and the normal recovery
  reconnects.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import pika
from pika.adapters.select_connection import IOLoop, SelectConnection
from pika.channel import Channel
from pika.exceptions import AMQPHeartbeatTimeout, ChannelClosedByBroker

from gateway.bus.topology import Topology
from gateway.config import BusSettings
from gateway.errors import ConfigurationError

__all__ = [
    "connection_parameters",
    "redact",
    "Backoff",
    "ThreadGuard",
    "ThreadOwnershipError",
    "guard_enabled",
    "guard",
    "declare_topology_async",
    "precondition_error",
    "THREAD_GUARD_ENV",
    "IOThreadClient",
]

_log = logging.getLogger(__name__)

#: Environment variable enabling the thread-ownership guard ("1", "true", "yes").
THREAD_GUARD_ENV = "GATEWAY_PIKA_THREAD_GUARD"


def _url(settings: BusSettings) -> str:
    if settings.url is None:
        raise ConfigurationError("bus.url is not set: RabbitMQ needs an AMQP URL")
    return settings.url.get_secret_value()


def connection_parameters(settings: BusSettings, connection_name: str = "gateway") -> pika.URLParameters:
    """Build the pika connection parameters for one connection (the only place that does).

    Args:
        settings: the bus settings (the URL is a secret and is never logged).
        connection_name: shown in the RabbitMQ management UI and ``rabbitmqctl list_connections``.

    Returns:
        ``pika.URLParameters`` with heartbeat, blocked-connection timeout, socket and stack
        timeouts, a single connection attempt and ``client_properties.connection_name`` set.

    Raises:
        ConfigurationError: when the URL is missing or not a valid AMQP URL.
    """
    url = _url(settings)
    scheme = url.split(":", 1)[0].lower()
    if scheme not in ("amqp", "amqps"):  # pika silently maps http(s) to amqp(s); we do not
        raise ConfigurationError(f"bus.url must start with amqp:// or amqps://, got {scheme!r}")
    try:
        params = pika.URLParameters(url)
    except ConfigurationError:
        raise
    except Exception as exc:  # pika raises ValueError/TypeError with the URL part in the text
        raise ConfigurationError(f"bus.url is not a valid AMQP URL: {redact(str(exc), settings)}") from None
    params.heartbeat = settings.heartbeat
    params.blocked_connection_timeout = settings.blocked_connection_timeout
    params.socket_timeout = settings.socket_timeout
    # The stack timeout bounds TCP + TLS + AMQP handshake together; give it headroom over the
    # plain socket connect timeout so a slow TLS handshake is not mistaken for a dead host.
    params.stack_timeout = settings.socket_timeout + 5.0
    # One attempt: pika's own retry loop blocks its I/O thread and has no jitter; we back off
    # ourselves (Backoff) and re-declare topology after every reconnect.
    params.connection_attempts = 1
    params.retry_delay = 0.0
    params.client_properties = {"connection_name": connection_name, "product": "legacy-gateway"}
    return params


def redact(text: str, settings: BusSettings | None = None) -> str:
    """Remove the AMQP password (and any ``user:password@`` URL part) from ``text``."""
    if settings is not None and settings.url is not None:
        url = settings.url.get_secret_value()
        password = urllib.parse.urlsplit(url).password
        if password:
            text = text.replace(url, "<amqp-url>")
            text = text.replace(password, "***")
            unquoted = urllib.parse.unquote(password)
            if unquoted:
                text = text.replace(unquoted, "***")
    return text


class Backoff:
    """Jittered exponential reconnect backoff: ``uniform(0.5, 1) * min(cap, base * 2**n)``.

    Half the range is jitter (so a fleet does not reconnect in lock-step) and the other half is
    a floor (so a broker that is down is not hammered in a tight loop).
    """

    def __init__(self, cap: float, base: float = 0.1, rng: random.Random | None = None) -> None:
        self.cap = cap
        self.base = base
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        """The delay before the next attempt; grows until ``cap``."""
        ceiling = min(self.cap, self.base * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return ceiling * self._rng.uniform(0.5, 1.0)

    def reset(self) -> None:
        """Call after a successful (re)connect."""
        self.attempt = 0


class ThreadOwnershipError(AssertionError):
    """A pika object was used from a thread that does not own it (a bug, REL-10)."""


def guard_enabled(flag: bool | None = None) -> bool:
    """Whether the thread guard is on: ``flag`` if given, else ``$GATEWAY_PIKA_THREAD_GUARD``."""
    if flag is not None:
        return flag
    return os.environ.get(THREAD_GUARD_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


class ThreadGuard:
    """Debug proxy: every attribute access checks that the caller is the owning thread.

    pika connections and channels are not thread-safe; a call from another thread corrupts
    frames silently or deadlocks. In debug mode every pika object we hold is wrapped in this
    proxy, turning such a bug into an immediate :class:`ThreadOwnershipError`.
    """

    __slots__ = ("_target", "_owner", "_label")

    def __init__(self, target: Any, owner: int, label: str) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_label", label)

    def __getattr__(self, name: str) -> Any:
        if threading.get_ident() != self._owner:
            raise ThreadOwnershipError(
                f"{self._label}.{name} used from thread {threading.current_thread().name!r}; "
                "pika objects may only be used from their I/O thread (use add_callback_threadsafe)"
            )
        return getattr(self._target, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if threading.get_ident() != self._owner:
            raise ThreadOwnershipError(f"{self._label}.{name} set from a foreign thread")
        setattr(self._target, name, value)


def guard(obj: Any, enabled: bool, label: str) -> Any:
    """``obj`` wrapped in a :class:`ThreadGuard` owned by the current thread when ``enabled``."""
    return ThreadGuard(obj, threading.get_ident(), label) if enabled else obj


def precondition_error(exc: BaseException, what: str) -> ConfigurationError:
    """The ConfigurationError for a 406 PRECONDITION_FAILED while declaring ``what``."""
    text = getattr(exc, "reply_text", "") or str(exc)
    return ConfigurationError(
        f"PRECONDITION_FAILED: {what} exists with different arguments than the gateway declares "
        f"(broker said: {text}). Delete it or align the bus settings."
    )


def topology_steps(topology: Topology) -> list[tuple[str, Callable[..., Any]]]:
    """The declaration of ``topology`` as (what, call) steps, in order (REL-03).

    The dead-letter exchange first, then the other exchanges (with their arguments), then every
    queue with exactly its :meth:`Topology.queues` arguments, then the queue bindings, the
    exchange-to-exchange bindings, and last the removal of obsolete bindings (unbinding what does
    not exist is no error on RabbitMQ). ``call(channel, **kw)`` works on a blocking channel as it
    is, and on an asynchronous one with ``callback=`` in ``kw``.
    """
    steps: list[tuple[str, Callable[..., Any]]] = []
    for name, kind in topology.exchanges():
        args = topology.exchange_arguments(name)
        steps.append((f"exchange {name!r}", lambda ch, n=name, k=kind, a=args, **kw: ch.exchange_declare(
            exchange=n, exchange_type=k, durable=True, arguments=dict(a) or None, **kw)))
    queues = topology.queues()
    for spec in queues:
        steps.append((f"queue {spec.name!r}", lambda ch, s=spec, **kw: ch.queue_declare(
            queue=s.name, durable=True, arguments=dict(s.arguments), **kw)))
    for spec in queues:
        for exchange, pattern in spec.bindings:
            steps.append((f"binding of queue {spec.name!r} to {exchange!r}",
                          lambda ch, s=spec, e=exchange, p=pattern, **kw: ch.queue_bind(
                              queue=s.name, exchange=e, routing_key=p, **kw)))
    for destination, source, pattern in topology.exchange_bindings():
        steps.append((f"binding of exchange {destination!r} to {source!r}",
                      lambda ch, d=destination, s=source, p=pattern, **kw: ch.exchange_bind(
                          destination=d, source=s, routing_key=p, **kw)))
    for queue, exchange, pattern in topology.obsolete_bindings():
        steps.append((f"removal of the obsolete binding of {queue!r} to {exchange!r}",
                      lambda ch, q=queue, e=exchange, p=pattern, **kw: ch.queue_unbind(
                          queue=q, exchange=e, routing_key=p, **kw)))
    return steps


def declare_topology_async(
    channel: Channel,
    topology: Topology,
    on_done: Callable[[], None],
    on_step: Callable[[str], None] | None = None,
) -> None:
    """Declare ``topology`` on an asynchronous channel, one RPC after the other, then ``on_done``.

    The steps and their order are :func:`topology_steps`'. A mismatch makes the broker close the
    channel (406); the channel's close callback handles it. ``on_step`` is told what is being
    declared, so that close callback can name it.

    Must be called on the channel's I/O thread.
    """
    it = iter(topology_steps(topology))

    def next_step(_frame: Any = None) -> None:
        step = next(it, None)
        if step is None:
            on_done()
            return
        if on_step is not None:
            on_step(step[0])
        step[1](channel, callback=next_step)

    next_step()


class IOThreadClient:
    """One pika ``SelectConnection`` owned by one daemon I/O thread, reconnecting by itself.

    pika is not thread-safe and recovers nothing on its own, so this base class owns the whole
    life cycle on its I/O thread: connect, open a channel, declare the topology (REL-03), let the
    subclass finish the set-up (confirms, QoS, consume), and after any connection or channel loss
    report the loss to the subclass and reconnect with jittered backoff. Other threads talk to it
    only through :meth:`call_threadsafe` (``IOLoop.add_callback_threadsafe``).

    Subclasses override the ``_on_*`` hooks; every hook runs on the I/O thread.
    """

    def __init__(
        self, settings: BusSettings, topology: Topology, name: str, *, thread_guard: bool | None = None
    ) -> None:
        self._settings = settings
        self._topology = topology
        self._name = name
        self._params = connection_parameters(settings, name)
        self._guard = guard_enabled(thread_guard)
        self._backoff = Backoff(settings.reconnect_max_delay)
        # One IOLoop for the client's whole life: every reconnect makes a new SelectConnection on
        # it, so the I/O thread and add_callback_threadsafe keep working across reconnects.
        self._ioloop = IOLoop()
        self._lock = threading.Lock()  # guards _closed and the IOLoop's lifetime
        self._closed = False  # no new work accepted (any thread, under _lock)
        self._closing = False  # shutdown in progress (I/O thread)
        self._connection: Any = None  # I/O thread only
        self._raw_connection: Any = None  # the same, never guard-wrapped (identity checks)
        self._channel: Any = None  # I/O thread only (maybe ThreadGuard-wrapped)
        self._raw_channel: Channel | None = None
        self._declaring = ""
        self._ready = threading.Event()  # set while the channel is fully set up
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.connects = 0  #: successful set-ups so far (1 after start, +1 per recovery)
        self.silent_drops = 0  #: connections ended because the broker went silent (REL-05)
        self.last_error = ""  #: last connection/channel error, password redacted

    # -- any thread
    @property
    def name(self) -> str:
        """The connection name (``client_properties.connection_name``) the broker shows."""
        return self._name

    @property
    def ready(self) -> bool:
        """Whether the connection and channel are currently open and set up."""
        return self._ready.is_set()

    def start(self, wait: float) -> None:
        """Start the I/O thread and wait up to ``wait`` s for the first set-up (not an error if not)."""
        self._thread.start()
        self._ready.wait(wait)

    def wait_ready(self, timeout: float) -> bool:
        """Block until the client is (again) set up; True when it is."""
        return self._ready.wait(timeout)

    def call_threadsafe(self, callback: Callable[[], None]) -> bool:
        """Run ``callback`` on the I/O thread soon; False when the client is already closed."""
        with self._lock:
            if self._closed:
                return False
            self._ioloop.add_callback_threadsafe(callback)
            return True

    def _stop(self, timeout: float) -> None:
        """Shut down from any thread: close the connection on the I/O thread, then join it."""
        with self._lock:
            if self._closed:
                first = False
            else:
                first = True
                self._closed = True
                if self._thread.is_alive():
                    self._ioloop.add_callback_threadsafe(self._shutdown)
        if first and self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- I/O thread
    def _run(self) -> None:
        try:
            self._connect()
            self._ioloop.start()
        except Exception:  # pragma: no cover - a bug; never let the thread die silently
            _log.exception("%s: I/O loop crashed", self._name)
        finally:
            self._ready.clear()
            with self._lock:
                self._closed = True
                self._ioloop.close()
            self._on_stopped()

    def _connect(self) -> None:
        if self._closing:
            return
        conn = SelectConnection(
            self._params,
            on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_connection_open_error,
            on_close_callback=self._on_connection_closed,
            custom_ioloop=self._ioloop,
        )
        self._raw_connection = conn
        self._connection = guard(conn, self._guard, f"{self._name}.connection")

    def _schedule(self, action: Callable[[], None]) -> None:
        delay = self._backoff.next_delay()
        _log.info("%s: retrying in %.2fs", self._name, delay)
        self._ioloop.call_later(delay, action)

    def _on_connection_open(self, conn: Any) -> None:
        self._watch_liveness(conn)
        self._on_connection_hooks(self._connection)
        self._connection.channel(on_open_callback=self._on_channel_open)

    def _watch_liveness(self, conn: Any) -> None:
        """End ``conn`` when the broker has sent nothing for twice the negotiated heartbeat."""
        heartbeat = getattr(getattr(conn, "params", None), "heartbeat", None) or 0
        if not heartbeat:
            return  # heartbeats off: nothing says how long silence may last
        limit = 2.0 * heartbeat
        seen = [conn.bytes_received, time.monotonic()]

        def check() -> None:
            if conn is not self._raw_connection or conn.is_closing or conn.is_closed:
                return  # a newer connection has its own check
            now = time.monotonic()
            if conn.bytes_received != seen[0]:
                seen[0], seen[1] = conn.bytes_received, now
            elif now - seen[1] >= limit:
                _log.warning(
                    "%s: nothing from the broker for %.1f s (2x the %d s heartbeat); dropping the connection",
                    self._name, now - seen[1], heartbeat,
                )
                self.silent_drops += 1
                conn._terminate_stream(  # what pika's own heartbeat checker calls
                    AMQPHeartbeatTimeout(f"no bytes received for {now - seen[1]:.1f} s (heartbeat {heartbeat} s)")
                )
                return
            self._ioloop.call_later(heartbeat / 2.0, check)

        self._ioloop.call_later(heartbeat / 2.0, check)

    def _on_connection_open_error(self, _conn: Any, exc: BaseException) -> None:
        self._connection = None
        self.last_error = redact(f"{type(exc).__name__}: {exc}", self._settings)
        _log.warning("%s: connection failed: %s", self._name, self.last_error)
        self._on_lost()
        if self._closing:
            self._ioloop.stop()
        else:
            self._schedule(self._connect)

    def _on_connection_closed(self, _conn: Any, exc: BaseException) -> None:
        self._ready.clear()
        self._connection = None
        self._channel = self._raw_channel = None
        self._on_lost()
        if self._closing:
            self._ioloop.stop()
            return
        self.last_error = redact(f"{type(exc).__name__}: {exc}", self._settings)
        _log.warning("%s: connection lost (%s); reconnecting", self._name, self.last_error)
        self._schedule(self._connect)

    def _on_channel_open(self, channel: Channel) -> None:
        self._raw_channel = channel
        self._channel = guard(channel, self._guard, f"{self._name}.channel")
        channel.add_on_close_callback(self._on_channel_closed)
        self._on_channel_hooks(self._channel)
        declare_topology_async(self._channel, self._topology, self._on_topology_declared, self._set_declaring)

    def _set_declaring(self, what: str) -> None:
        self._declaring = what

    def _on_topology_declared(self) -> None:
        self._declaring = ""
        self._on_setup(self._channel)

    def _setup_done(self) -> None:
        """Subclasses call this when their set-up finished: the client is ready."""
        self._backoff.reset()
        self.connects += 1
        self._ready.set()

    def _on_channel_closed(self, channel: Channel, exc: BaseException) -> None:
        if channel is not self._raw_channel:
            return
        self._ready.clear()
        self._channel = self._raw_channel = None
        self._on_lost()
        if isinstance(exc, ChannelClosedByBroker) and exc.reply_code == 406 and self._declaring:
            # The broker has the topology with other arguments: a configuration problem that
            # retrying will not fix, but the bus keeps trying (capped backoff) and says why.
            self.last_error = str(precondition_error(exc, self._declaring))
            _log.error("%s: %s", self._name, self.last_error)
        elif not self._closing:
            self.last_error = redact(f"{type(exc).__name__}: {exc}", self._settings)
            _log.warning("%s: channel closed (%s)", self._name, self.last_error)
        conn = self._connection
        if conn is None or not conn.is_open:
            return  # the connection's close callback takes over
        if self._closing:
            conn.close()
        else:
            self._schedule(self._reopen_channel)

    def _reopen_channel(self) -> None:
        conn = self._connection
        if self._closing or conn is None or not conn.is_open:
            return
        conn.channel(on_open_callback=self._on_channel_open)

    def _shutdown(self) -> None:
        self._closing = True
        self._ready.clear()
        deferred = self._on_shutdown()
        conn = self._connection
        if conn is None or conn.is_closed:
            self._ioloop.stop()
        elif not deferred:
            self._close_connection()
        # Belt and braces: never hang in close() if the broker does not answer Connection.Close.
        self._ioloop.call_later(max(2.0, self._settings.socket_timeout), self._ioloop.stop)

    def _close_connection(self) -> None:
        conn = self._connection
        if conn is not None and not (conn.is_closing or conn.is_closed):
            conn.close()

    # -- hooks (I/O thread)
    def _on_connection_hooks(self, connection: Any) -> None:
        """Register connection callbacks (blocked/unblocked)."""

    def _on_channel_hooks(self, channel: Any) -> None:
        """Register channel callbacks before the topology is declared."""

    def _on_setup(self, channel: Any) -> None:
        """Finish the set-up after the topology; call :meth:`_setup_done` at the end."""
        self._setup_done()

    def _on_lost(self) -> None:
        """The channel or connection is gone: fail whatever waited on it."""

    def _on_shutdown(self) -> bool:
        """Shutdown started (I/O thread). Return True to close the connection yourself, later."""
        return False

    def _on_stopped(self) -> None:
        """The I/O thread is ending (called on it, after the IOLoop closed)."""

