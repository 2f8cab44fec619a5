"""Chaos harness: gateway roles as subprocesses, YAML configs, broker helpers and a scored-event sink.

Every wait is bounded and fails with a message naming what did not happen. Processes started
through :class:`Processes` are killed in fixture teardown, whatever the test did.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pika
import yaml
from sqlalchemy import create_engine

from gateway.resilience.crashpoints import ENV as CRASH_ENV
from gateway.resilience.crashpoints import EXIT_CODE as CRASH_EXIT
from gateway.store.migrate import upgrade
from tests.rabbit import delete_broker_objects

__all__ = [
    "CRASH_ENV",
    "CRASH_EXIT",
    "GatewayProc",
    "Processes",
    "ScoredSink",
    "cleanup_broker",
    "gateway_config",
    "migrate",
    "restart_broker",
    "wait_for",
    "write_config",
]

#: ``python -m gateway`` (gateway/__main__.py) with the interpreter running the tests.
GATEWAY_CMD = [sys.executable, "-m", "gateway"]
SOURCE_NAME = "orders"


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------- config
def orders_source(legacy_url: str, *, batch_size: int = 500, lease_ttl: float = 3.0) -> dict[str, Any]:
    """The legacy_orders table of tests/legacy.py as a SQL source (fast polling, short lease)."""
    from tests.legacy import source_settings

    src = source_settings(legacy_url, name=SOURCE_NAME, batch_size=batch_size)
    src.update({"interval": 0.05, "status_interval": 0.5, "lease_ttl": lease_ttl})
    return src


def gateway_config(
    store_url: str,
    amqp_url: str,
    prefix: str,
    *,
    sources: Iterable[dict[str, Any]] = (),
    bus: dict[str, Any] | None = None,
    relay: dict[str, Any] | None = None,
    scoring: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A settings document (the YAML schema of gateway/config.py) for chaos runs."""
    return {
        "profile": "test",
        # The test migrates the store once: roles starting side by side must not race Alembic.
        "store": {"url": store_url, "auto_migrate": False, "pool_size": 3},
        "bus": {
            "url": amqp_url, "prefix": prefix, "publish_timeout": 10, "reconnect_max_delay": 2.0,
            "heartbeat": 10, "socket_timeout": 5.0, **(bus or {}),
        },
        "relay": {"batch_size": 500, "idle_wait": 0.05, "claim_seconds": 3.0, "retry_max_delay": 2.0, **(relay or {})},
        "scoring": {"warmup": 20, "workers": 2, **(scoring or {})},
        "api": {"port": 0},
        "sources": list(sources),
    }


def write_config(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def migrate(store_url: str) -> None:
    """Migrate the store to head once, before any role starts."""
    engine = create_engine(store_url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------------------- processes
class GatewayProc:
    """One gateway command (``gateway worker --role X`` or ``gateway run``) as a restartable subprocess.

    Each start logs to its own file, ``<log_dir>/<name>-<n>.log`` (stdout and stderr).
    """

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = args
        self.log_dir = log_dir
        self.env = dict(env or {})
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.exits: list[int] = []  # return codes of the finished runs, in order
        self.logs: list[Path] = []

    def start(self, **env: str) -> GatewayProc:
        """Start (again); ``env`` adds variables for this run only (e.g. a crash point)."""
        assert not self.alive, f"{self.name} is already running"
        self.starts += 1
        log = self.log_dir / f"{self.name}-{self.starts}.log"
        self.logs.append(log)
        full = dict(os.environ)
        full.pop(CRASH_ENV, None)  # armed only when this run asks for it
        full.update(self.env)
        full.update(env)
        with open(log, "wb") as fh:
            self.popen = subprocess.Popen(
                [*GATEWAY_CMD, *self.args], stdout=fh, stderr=subprocess.STDOUT, env=full,
                cwd=Path(__file__).resolve().parents[2], start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def poll(self) -> int | None:
        """The return code once the current run ended (recorded once in :attr:`exits`)."""
        if self.popen is None:
            return None
        rc = self.popen.poll()
        if rc is not None and len(self.exits) < self.starts:
            self.exits.append(rc)
        return rc

    def kill9(self) -> int:
        """``kill -9`` the process; returns its exit status (-9)."""
        assert self.popen is not None and self.alive, f"{self.name} is not running (exits so far: {self.exits})"
        os.kill(self.popen.pid, signal.SIGKILL)
        return self.wait(10)

    def terminate(self) -> None:
        """SIGTERM: the graceful stop."""
        assert self.popen is not None and self.alive, f"{self.name} is not running"
        os.kill(self.popen.pid, signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        assert self.popen is not None
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit within {timeout:.0f}s; log tail:\n{self.tail()}") from None
        rc = self.poll()
        assert rc is not None
        return rc

    def log_text(self, run: int | None = None) -> str:
        """The log of run ``run`` (1-based; default: the current one)."""
        if not self.logs:
            return ""
        path = self.logs[(run or len(self.logs)) - 1]
        return path.read_text(errors="replace") if path.exists() else ""

    def all_logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_log(self, pattern: str, timeout: float, run: int | None = None) -> re.Match[str]:
        """Wait until the log of the current run matches ``pattern``; fails if the process died first."""
        rx = re.compile(pattern)

        def check() -> re.Match[str] | None:
            m = rx.search(self.log_text(run))
            if m is None and not self.alive and self.popen is not None:
                raise AssertionError(f"{self.name} exited ({self.popen.returncode}) before logging {pattern!r}:\n{self.tail()}")
            return m

        return wait_for(check, timeout, f"{self.name} to log {pattern!r}")

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait for ``gateway running roles: ...`` (topology declared, roles started)."""
        self.wait_log(r"gateway running roles", timeout)

    def kill(self) -> None:
        """Teardown: SIGKILL the whole process group if anything still runs."""
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(10)
        self.poll()


class Processes:
    """Registry of the subprocesses a test starts; :meth:`kill_all` runs in fixture teardown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[GatewayProc] = []

    def worker(self, role: str, config: Path, name: str | None = None, **env: str) -> GatewayProc:
        proc = GatewayProc(name or role, ["worker", "--role", role, "-c", str(config), "--log-level", "info"], self.log_dir, env)
        self.procs.append(proc)
        return proc

    def run(self, config: Path, name: str = "gateway", **env: str) -> GatewayProc:
        proc = GatewayProc(name, ["run", "-c", str(config), "--log-level", "info"], self.log_dir, env)
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for p in self.procs:
            p.kill()


# ---------------------------------------------------------------------------------------- broker
def _blocking(amqp_url: str, tries: int = 120) -> pika.BlockingConnection:
    last: Exception | None = None
    for _ in range(tries):
        try:
            return pika.BlockingConnection(pika.URLParameters(amqp_url))
        except pika.exceptions.AMQPConnectionError as exc:
            last = exc
            time.sleep(0.5)
    raise AssertionError(f"RabbitMQ did not answer: {last}")


def cleanup_broker(amqp_url: str, prefix: str, extra_queues: Iterable[str] = ()) -> None:
    """Delete the queues and exchanges of ``prefix`` (waits for a restarting broker)."""
    from gateway.bus import Topology
    from gateway.config import BusSettings

    _blocking(amqp_url).close()  # wait for a restarting broker
    extra = [q if q.startswith(prefix) else f"{prefix}.{q}" for q in extra_queues]
    delete_broker_objects(amqp_url, Topology.from_settings(BusSettings(prefix=prefix)), queues=extra)


def rabbitmqctl(*args: str, timeout: float = 120) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=timeout)


def restart_broker(down_seconds: float = 1.0) -> float:
    """``rabbitmqctl stop_app; start_app; await_startup``; returns the seconds it took."""
    started = time.monotonic()
    rabbitmqctl("stop_app")
    time.sleep(down_seconds)
    rabbitmqctl("start_app")
    rabbitmqctl("await_startup")
    return time.monotonic() - started


class ScoredSink:
    """A client queue bound to ``<prefix>.scored``: sees every scored event, republications included.

    ``seen`` counts deliveries per scored-event ``message_id``; ``by_event`` keeps each original
    event's (scored-event id, score, scored_at) per delivery.
    """

    def __init__(self, amqp_url: str, prefix: str) -> None:
        self.amqp_url = amqp_url
        self.queue = f"{prefix}.chaos-sink"
        self.prefix = prefix
        conn = _blocking(amqp_url)
        ch = conn.channel()
        ch.exchange_declare(f"{prefix}.scored", "topic", durable=True)
        ch.queue_declare(self.queue, durable=True, arguments={"x-queue-type": "quorum"})
        ch.queue_bind(self.queue, f"{prefix}.scored", "#")
        conn.close()
        self.seen: Counter[str] = Counter()
        self.by_event: dict[str, list[tuple[str, float, str]]] = {}

    def drain_until(self, events: int, timeout: float = 60.0) -> None:
        """Consume until ``events`` distinct events were seen (then a short idle drain for copies).

        Scores are committed before their scored events are published, so a settled ledger does
        not mean the sink has them all yet. Fails naming how many arrived.
        """
        wait_for(lambda: self.drain(idle=0.3) >= 0 and len(self.by_event) >= events, timeout,
                 f"{events} distinct scored events on the scored exchange")
        self.drain(idle=0.5)

    def drain(self, idle: float = 1.0, timeout: float = 120.0) -> int:
        """Consume until the queue stayed empty for ``idle`` s; returns deliveries read."""
        conn = _blocking(self.amqp_url)
        n = 0
        try:
            ch = conn.channel()
            ch.basic_qos(prefetch_count=1000)
            deadline = time.monotonic() + timeout
            last = time.monotonic()
            for method, props, body in ch.consume(self.queue, inactivity_timeout=0.2):
                if method is None:
                    if time.monotonic() - last > idle:
                        break
                else:
                    obj = json.loads(body)
                    data = obj["data"]
                    self.seen[props.message_id] += 1
                    self.by_event.setdefault(data["event"]["id"], []).append(
                        (props.message_id, float(data["score"]), str(obj.get("time")))
                    )
                    ch.basic_ack(method.delivery_tag)
                    n += 1
                    last = time.monotonic()
                if time.monotonic() > deadline:
                    raise AssertionError(f"the scored sink kept receiving for {timeout:.0f}s")
            ch.cancel()
        finally:
            conn.close()
        return n

    @property
    def republished(self) -> dict[str, int]:
        """Scored-event ids delivered more than once (redeliveries made visible), with their counts."""
        return {k: v for k, v in self.seen.items() if v > 1}

    def inconsistent(self) -> dict[str, list[tuple[str, float, str]]]:
        """Events whose scored events differ between deliveries (id, score or scored time)."""
        return {e: v for e, v in self.by_event.items() if len(set(v)) > 1}
