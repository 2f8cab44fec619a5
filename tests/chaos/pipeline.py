"""A legacy table feeding the gateway roles as subprocesses: the set-up most chaos tests share."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from gateway.store.schema import events
from tests.chaos.harness import (
    GatewayProc,
    Processes,
    gateway_config,
    migrate,
    orders_source,
    write_config,
)
from tests.chaos.ledger import Ledger
from tests.legacy import add_orders, make_orders

__all__ = ["Feeder", "Pipeline", "event_ids_in_order", "rng"]


def rng(seed: int | None = None) -> random.Random:
    """A seeded RNG for "random" fault times; the seed is printed so a failure can be replayed."""
    seed = seed if seed is not None else random.randrange(1_000_000)
    print(f"chaos seed: {seed}")
    return random.Random(seed)


@dataclass
class Pipeline:
    """Config files and role processes of one chaos run on a PostgreSQL store.

    ``legacy_rows`` rows are created in the legacy table (in the store's database) up front; a
    :class:`Feeder` can add more while the roles run.
    """

    tmp_path: Path
    store_url: str
    amqp_url: str
    prefix: str
    procs: Processes
    legacy_rows: int = 0
    bus: dict[str, Any] = field(default_factory=dict)
    relay: dict[str, Any] = field(default_factory=dict)
    scoring: dict[str, Any] = field(default_factory=dict)
    lease_ttl: float = 3.0
    source_batch: int = 500

    def __post_init__(self) -> None:
        engine = make_orders(self.store_url, self.legacy_rows)
        engine.dispose()
        migrate(self.store_url)
        self.config = self.write()

    def write(self, name: str = "gateway.yaml", *, amqp_url: str | None = None, **over: Any) -> Path:
        """Write a config file (``amqp_url``: e.g. a ChaosProxy's URL for this file's roles)."""
        doc = gateway_config(
            self.store_url, amqp_url or self.amqp_url, self.prefix,
            sources=[orders_source(self.store_url, batch_size=self.source_batch, lease_ttl=self.lease_ttl)],
            bus={**self.bus, **over.pop("bus", {})}, relay={**self.relay, **over.pop("relay", {})},
            scoring={**self.scoring, **over.pop("scoring", {})},
        )
        doc.update(over)
        return write_config(self.tmp_path / name, doc)

    def role(self, role: str, config: Path | None = None, name: str | None = None) -> GatewayProc:
        return self.procs.worker(role, config or self.config, name)

    def start_roles(self, *roles: str, config: Path | None = None) -> dict[str, GatewayProc]:
        """Start one subprocess per role and wait until each runs."""
        out = {r: self.role(r, config).start() for r in roles}
        for p in out.values():
            p.wait_ready(60)
        return out


class Feeder:
    """Adds legacy rows in small batches from a thread while the roles run (a live stream)."""

    def __init__(
        self, store_url: str, *, total: int, start: int = 1, batch: int = 50, pause: float = 0.05, hold_back: int = 0
    ) -> None:
        """``hold_back``: the last rows wait for :meth:`release`, so a fault can be placed before
        the stream ends whatever the machine's speed."""
        from sqlalchemy import create_engine

        self.engine = create_engine(store_url)
        self.total, self.next, self.batch, self.pause = total, start, batch, pause
        self.end = start + total
        self.hold_at = self.end - hold_back
        self._released = threading.Event()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="chaos-feeder")

    def _run(self) -> None:
        try:
            while self.next < self.end and not self._stop.is_set():
                if self.next >= self.hold_at:
                    while not self._released.wait(0.1):
                        if self._stop.is_set():
                            return
                limit = self.end if self._released.is_set() else self.hold_at
                n = min(self.batch, limit - self.next)
                # Each batch a little later than the last: the source's timestamp cursor moves on.
                add_orders(self.engine, n, start=self.next)
                self.next += n
                time.sleep(self.pause)
        except BaseException as exc:  # noqa: BLE001 -- reported by join()
            self.error = exc

    def start(self) -> Feeder:
        self.thread.start()
        return self

    def release(self) -> None:
        """Let the held-back rows go."""
        self._released.set()

    @property
    def fed(self) -> int:
        return self.next - (self.end - self.total)

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the feeder did not finish within {timeout:.0f}s ({self.fed}/{self.total} rows)"
        assert self.error is None, f"the feeder failed: {self.error!r}"
        self.engine.dispose()

    def stop(self) -> None:
        self._stop.set()
        self._released.set()
        self.thread.join(10)
        self.engine.dispose()


def event_ids_in_order(ledger: Ledger) -> list[str]:
    """Accepted event ids in acceptance order."""
    with ledger.engine.connect() as c:
        return list(c.execute(select(events.c.id).order_by(events.c.seq)).scalars())
