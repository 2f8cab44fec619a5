"""The outbox relay: pending events to the bus, marked published only after the broker's ack.

Batches are claimed from the store (``FOR UPDATE SKIP LOCKED`` with a claim lease, so relays can
run side by side), published with confirms, and settled when the broker answers. Up to
``in_flight_batches`` batches are on the wire at once so the confirm window stays full. A nack,
return, timeout or lost connection leaves the row pending with ``attempts + 1`` and a
full-jitter backoff before the next attempt (REL-01).
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from gateway.bus import Message, Outcome, Publisher, Topology
from gateway.bus.protocols import PUBLISHED_AT_HEADER
from gateway.config import RelaySettings
from gateway.events import CONTENT_TYPE
from gateway.resilience.crashpoints import armed, crash_point
from gateway.store import EventStore, OutboxRow

__all__ = ["Relay", "RelayStats"]

log = logging.getLogger("gateway.relay")


@dataclass
class RelayStats:
    """Counters of one relay (for status displays and metrics)."""

    errors: int = 0
    published: int = 0
    failed: int = 0
    returned: int = 0
    nacked: int = 0
    batches: int = 0


class Relay:
    """Moves pending outbox rows to the events exchange.

    Args:
        store: the gateway store.
        publisher: a confirming publisher.
        topology: bus names.
        settings: relay settings.
        publish_timeout: seconds to wait for one batch's confirms.
        owner: claim owner id (defaults to a random id per relay).
        rng: randomness for backoff jitter (injectable).
    """

    def __init__(
        self,
        store: EventStore,
        publisher: Publisher,
        topology: Topology,
        settings: RelaySettings,
        *,
        publish_timeout: float = 30.0,
        owner: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.topology = topology
        self.settings = settings
        self.publish_timeout = publish_timeout
        self.owner = owner or f"relay-{uuid.uuid4().hex[:12]}"
        self.stats = RelayStats()
        self._rng = rng or random.Random()
        self._wake = threading.Event()
        self._on_published: list[Callable[[int], None]] = []

    def wake(self) -> None:
        """Tell the relay new rows are waiting (in-process shortcut past ``idle_wait``)."""
        self._wake.set()

    def delay_for(self, attempts: int) -> float:
        """Full-jitter exponential backoff before attempt ``attempts + 1``."""
        cap = min(self.settings.retry_max_delay, self.settings.retry_base_delay * 2 ** max(0, attempts - 1))
        return self._rng.uniform(0, cap)

    def _claim_and_publish(self) -> tuple[list[OutboxRow], Future[list[Outcome]]] | None:
        rows = self.store.claim_pending(self.owner, self.settings.batch_size, self.settings.claim_seconds)
        if not rows:
            return None
        # When the event entered the bus: the scorer's deadline (scoring.late_after) counts from it.
        stamp = {PUBLISHED_AT_HEADER: int(time.time() * 1000)}
        messages = [
            Message(
                body=r.envelope.encode("utf-8"),
                routing_key=r.type,
                message_id=r.id,
                content_type=CONTENT_TYPE,
                headers=stamp,
            )
            for r in rows
        ]
        return rows, self.publisher.publish(self.topology.events_exchange, messages)

    def _settle(self, rows: list[OutboxRow], fut: Future[list[Outcome]]) -> None:
        try:
            outcomes = fut.result(timeout=self.publish_timeout + 5.0)
        except FutureTimeout:
            outcomes = [Outcome.TIMEOUT] * len(rows)
        except Exception as exc:  # noqa: BLE001 -- a broken publisher must not lose rows
            log.error("publish failed: %s: %s", type(exc).__name__, exc)
            outcomes = [Outcome.LOST] * len(rows)
        ok = [r.seq for r, o in zip(rows, outcomes, strict=True) if o is Outcome.ACK]
        failed = {r.seq: f"publish {o.value}" for r, o in zip(rows, outcomes, strict=True) if o is not Outcome.ACK}
        if armed("relay.after_ack_before_mark"):  # chaos tests only: the broker has them, the store not yet
            crash_point("relay.after_ack_before_mark", [r.id for r, o in zip(rows, outcomes) if o is Outcome.ACK])
        self.store.mark_published(ok)
        if failed:
            returned = sum(1 for o in outcomes if o is Outcome.RETURNED)
            nacked = sum(1 for o in outcomes if o is Outcome.NACK)
            self.stats.returned += returned
            self.stats.nacked += nacked
            self.stats.failed += len(failed)
            log.warning(
                "relay: %d of %d events not confirmed (%d returned as unroutable, %d nacked); they stay pending",
                len(failed), len(rows), returned, nacked,
            )
            self.store.mark_failed(failed, self.delay_for)
        self.stats.published += len(ok)
        self.stats.batches += 1

    def run_once(self) -> int:
        """Claim, publish and settle one batch; returns rows handled (0 when idle)."""
        job = self._claim_and_publish()
        if job is None:
            return 0
        self._settle(*job)
        return len(job[0])

    def run(self, stop: threading.Event) -> None:
        """Relay until ``stop`` is set, keeping up to ``in_flight_batches`` batches on the wire.

        A store or publisher failure never ends the loop: it is logged, the relay backs off
        (doubling up to 30 s), and claimed rows not yet settled are released by their claim
        lease expiring -- nothing is marked published without a broker ack.
        """
        inflight: deque[tuple[list[OutboxRow], Future[list[Outcome]]]] = deque()
        # Idle polls back off from 5 ms to ``idle_wait``: an empty outbox costs little CPU, and an
        # in-process ``wake()`` (after every commit) cuts the wait short anyway.
        floor = min(0.005, self.settings.idle_wait)
        idle = floor
        failure_wait = 0.5
        try:
            while not stop.is_set():
                try:
                    self._wake.clear()
                    while len(inflight) < self.settings.in_flight_batches:
                        job = self._claim_and_publish()
                        if job is None:
                            break
                        inflight.append(job)
                    if inflight:
                        self._settle(*inflight[0])
                        inflight.popleft()
                        idle, failure_wait = floor, 0.5
                        continue
                except Exception as exc:  # noqa: BLE001 -- the relay must outlive outages
                    log.error("relay: %s: %s (retrying in %.1fs)", type(exc).__name__, exc, failure_wait)
                    self.stats.errors += 1
                    stop.wait(failure_wait)
                    failure_wait = min(failure_wait * 2, 30.0)
                    continue
                if self._wake.wait(idle):
                    idle = floor
                else:
                    idle = min(idle * 2, self.settings.idle_wait)
        finally:
            # Settle what is on the wire; confirms that never come leave rows pending.
            while inflight:
                try:
                    self._settle(*inflight.popleft())
                except Exception as exc:  # noqa: BLE001 -- rows stay pending; their claim expires
                    log.error("relay: settling on stop failed: %s: %s", type(exc).__name__, exc)
