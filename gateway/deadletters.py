"""Dead letters as a managed store: replay through the outbox, and the broker dead-letter-queue drain.

Replay goes through the store, never straight to the bus: the in-process bus lives inside the
running ``gateway run`` process, and a replay must be durable whichever process asks for it (the
CLI, the API). So a replay is one store transaction, and the relay publishes the result:

* the dead letter's event is in the outbox (``event_id`` in ``events``): that row is set back to
  pending (attempts 0, due now, claims cleared) and the dead letter is marked replayed, together;
* the payload is a CloudEvent that is not in the outbox (drained from the broker's DLQ, a scoring
  dead letter from another store): the event is accepted into the outbox, idempotent on its id;
* a ``source`` record that could not be mapped is mapped again with the source's *current*
  mapping; a record that still fails stays the same dead letter with the new error
  (``attempts + 1``);
* anything else (a scored event from the bridge, a source read failure, an undecodable raw
  message, a payload that is not a CloudEvent) cannot be replayed: the outcome says why.

Event ids are deterministic and scores are stored once per (event, model, version), so replaying
the same dead letter twice never creates a second outbox row or a second score (REL-13). Rows
already replayed are skipped unless ``again``; replays are paced by a token bucket.

:class:`DeadLetterDrain` empties ``<prefix>.dead``: every message the broker dead-lettered
(``x-delivery-limit`` exceeded, rejected, expired) becomes a ``broker`` dead letter, acked only
after the row committed, once per message.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from adapters.base import Record
from gateway.bus.protocols import Consumer, Delivery
from gateway.bus.topology import Topology
from gateway.config import SourceSettings
from gateway.errors import ConfigurationError, ContractError, GatewayError
from gateway.events import EXT_POSITION, Event
from gateway.events.jsonsafe import dumps, jsonable, loads
from gateway.store import DeadLetter, EventStore
from gateway.store.repository import DEAD_OPEN, DEAD_STATES

__all__ = [
    "BROKER_STAGE",
    "REPLAY_MAX_ROWS",
    "DeadLetterDrain",
    "DeadLetterReplayer",
    "DeadLetterSelection",
    "DrainStats",
    "ReplayItem",
    "ReplayReport",
    "TokenBucket",
    "broker_dead_letter",
    "dead_letter_position",
]

log = logging.getLogger("gateway.deadletters")

#: Stage of dead letters drained from the broker's dead-letter queue.
BROKER_STAGE = "broker"
#: Most dead letters one replay request may select (the REST API's bound).
REPLAY_MAX_ROWS = 1000
#: Stages that store their own row *and* reject the message to the broker's DLX: the drain does
#: not store those messages a second time while that row is open.
_STAGES_ALSO_IN_DLQ = ("scoring",)
#: Extension of scored events (the original event's id): they are outputs, not inputs.
_EXT_ORIGINAL_ID = "originalid"

REQUEUED, ACCEPTED, SKIPPED, FAILED = "requeued", "accepted", "skipped", "failed"


# ---------------------------------------------------------------------------- rate limit
class TokenBucket:
    """At most ``rate`` acquisitions per second, with bursts of up to ``burst``.

    Args:
        rate: tokens per second (> 0).
        burst: bucket size; 1 spaces acquisitions evenly (``1/rate`` apart).
        clock: monotonic seconds; injectable for tests.
        sleep: waits that many seconds; injectable for tests.
    """

    def __init__(
        self,
        rate: float,
        burst: float = 1.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.rate = float(rate)
        self.burst = max(1.0, float(burst))
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._last = clock()

    def acquire(self) -> float:
        """Take one token, sleeping until one is available; returns the seconds slept."""
        slept = 0.0
        while True:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return slept
            wait = (1.0 - self._tokens) / self.rate
            self._sleep(wait)
            slept += wait


# ---------------------------------------------------------------------------- replay
@dataclass(frozen=True, slots=True)
class DeadLetterSelection:
    """Which dead letters to replay: ``ids``, or the filters of ``list`` (oldest first, ``limit``).

    Attributes:
        ids: dead letter ids; when given, the filters are ignored.
        stage: only this stage.
        source_name: only this source.
        error_class: only this error class.
        state: ``open`` | ``replayed`` | ``all``; ``None``: ``open``, or ``all`` with ``again``.
        limit: most rows selected by the filters.
    """

    ids: tuple[int, ...] = ()
    stage: str | None = None
    source_name: str | None = None
    error_class: str | None = None
    state: str | None = None
    limit: int = 100


@dataclass(frozen=True, slots=True)
class ReplayItem:
    """The outcome of one dead letter.

    Attributes:
        id: the dead letter.
        stage: its stage.
        outcome: ``requeued`` (its event, already in the outbox, is published again), ``accepted``
            (its event is new in the outbox), ``skipped`` (replayed already) or ``failed``.
        event_ids: the events it went through the outbox as.
        detail: what happened, or why it cannot be replayed.
    """

    id: int
    stage: str
    outcome: str
    event_ids: tuple[str, ...] = ()
    detail: str = ""


@dataclass
class ReplayReport:
    """What a replay did (or, with ``dry_run``, would do)."""

    dry_run: bool
    items: list[ReplayItem] = field(default_factory=list)
    not_found: list[int] = field(default_factory=list)

    def count(self, outcome: str) -> int:
        """Items with this outcome."""
        return sum(1 for i in self.items if i.outcome == outcome)

    @property
    def replayed(self) -> int:
        """Requeued plus accepted."""
        return self.count(REQUEUED) + self.count(ACCEPTED)

    @property
    def skipped(self) -> int:
        return self.count(SKIPPED)

    @property
    def failed(self) -> int:
        """Failed items plus ids that do not exist."""
        return self.count(FAILED) + len(self.not_found)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary with every item."""
        return {
            "dry_run": self.dry_run,
            "replayed": self.replayed,
            "requeued": self.count(REQUEUED),
            "accepted": self.count(ACCEPTED),
            "skipped": self.skipped,
            "failed": self.failed,
            "not_found": list(self.not_found),
            "items": [
                {"id": i.id, "stage": i.stage, "outcome": i.outcome, "event_ids": list(i.event_ids), "detail": i.detail}
                for i in self.items
            ],
        }


@dataclass(frozen=True, slots=True)
class _Plan:
    """How one dead letter is replayed: events through the outbox, or why it cannot be."""

    event_ids: tuple[str, ...] = ()
    events: tuple[Event, ...] = ()
    source_name: str | None = None
    error: str | None = None
    #: The item itself failed again (a record the current mapping rejects): record the new error.
    new_error: tuple[str, str] | None = None
    how: str = ""


class DeadLetterReplayer:
    """Replays dead letters through the outbox (see the module docstring).

    Args:
        store: the gateway store.
        sources: the configured sources; their current mappings re-map ``source`` records.
        rate: most dead letters replayed per second (``None``: no limit).
        clock: monotonic seconds for the rate limit; injectable.
        sleep: the rate limit's wait; injectable.
        on_replayed: called once after a replay that put something into the outbox (wakes an
            in-process relay); its failures are logged.
    """

    def __init__(
        self,
        store: EventStore,
        sources: Sequence[SourceSettings] = (),
        *,
        rate: float | None = 50.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        on_replayed: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.sources = {s.name: s for s in sources}
        self.rate = rate
        self._clock = clock
        self._sleep = sleep
        self._on_replayed = on_replayed

    # -- selection
    def select(self, selection: DeadLetterSelection, *, again: bool = False) -> tuple[list[DeadLetter], list[int]]:
        """The dead letters ``selection`` names, oldest first, and the ids that do not exist."""
        if selection.ids:
            rows = self.store.get_dead_letters(selection.ids)
            found = {d.id for d in rows}
            return rows, sorted({i for i in selection.ids if i not in found})
        state = selection.state or ("all" if again else DEAD_OPEN)
        if state not in DEAD_STATES:
            raise ValueError(f"state: expected one of {', '.join(DEAD_STATES)}; got {state!r}")
        out: list[DeadLetter] = []
        after: int | None = None
        while len(out) < selection.limit:
            page = self.store.list_dead_letters(
                stage=selection.stage, source_name=selection.source_name, error_class=selection.error_class,
                state=state, after_id=after, limit=min(500, selection.limit - len(out)),
            )
            if not page:
                break
            out.extend(page)
            after = page[-1].id
        return out, []

    # -- replay
    def replay(self, selection: DeadLetterSelection, *, again: bool = False, dry_run: bool = False) -> ReplayReport:
        """Replay the selected dead letters (``dry_run``: say what would happen, write nothing).

        Args:
            selection: ids or filters.
            again: replay rows that were replayed already, too.
            dry_run: plan only.

        Returns:
            One item per selected dead letter, in id order, plus the ids that do not exist.
        """
        rows, missing = self.select(selection, again=again)
        return self.replay_rows(rows, again=again, dry_run=dry_run, not_found=missing)

    def replay_rows(
        self, rows: Iterable[DeadLetter], *, again: bool = False, dry_run: bool = False, not_found: Sequence[int] = ()
    ) -> ReplayReport:
        """Replay these dead letters (see :meth:`replay`)."""
        report = ReplayReport(dry_run=dry_run, not_found=list(not_found))
        bucket = TokenBucket(self.rate, clock=self._clock, sleep=self._sleep) if self.rate and not dry_run else None
        for dl in rows:
            if dl.replayed_at is not None and not again:
                report.items.append(ReplayItem(dl.id, dl.stage, SKIPPED, (), f"replayed already at "
                                               f"{dl.replayed_at.isoformat()} (use again to replay it again)"))
                continue
            plan = self._plan(dl)
            if dry_run:
                report.items.append(self._preview(dl, plan))
                continue
            if bucket is not None:
                bucket.acquire()
            report.items.append(self._apply(dl, plan, again=again))
        if not dry_run and report.replayed and self._on_replayed is not None:
            try:
                self._on_replayed()
            except Exception:
                log.exception("on_replayed callback failed")
        return report

    def _preview(self, dl: DeadLetter, plan: _Plan) -> ReplayItem:
        if plan.error is not None:
            return ReplayItem(dl.id, dl.stage, FAILED, (), plan.error)
        ids = [*plan.event_ids, *(e.id for e in plan.events)]
        present = self.store.existing_event_ids(ids)
        outcome = ACCEPTED if any(i not in present for i in ids) else REQUEUED
        return ReplayItem(dl.id, dl.stage, outcome, tuple(ids), f"would be {outcome}: {plan.how}")

    def _apply(self, dl: DeadLetter, plan: _Plan, *, again: bool) -> ReplayItem:
        if plan.error is not None:
            error_class, reason = plan.new_error or (None, None)
            self.store.record_replay_failure(dl.id, plan.error, error_class=error_class, reason=reason)
            log.info("dead letter %d (%s) not replayed: %s", dl.id, dl.stage, plan.error)
            return ReplayItem(dl.id, dl.stage, FAILED, (), plan.error)
        try:
            written = self.store.replay_dead_letter(
                dl.id, event_ids=plan.event_ids, events_in=plan.events, source_name=plan.source_name, again=again
            )
        except ValueError as exc:  # the event left the outbox between plan and write
            self.store.record_replay_failure(dl.id, str(exc))
            return ReplayItem(dl.id, dl.stage, FAILED, (), str(exc))
        if written is None:
            return ReplayItem(dl.id, dl.stage, SKIPPED, (), "replayed meanwhile by someone else")
        ids = (*written.accepted, *written.requeued)
        log.info("dead letter %d (%s) replayed: %s %s", dl.id, dl.stage, written.outcome, ", ".join(ids))
        return ReplayItem(dl.id, dl.stage, written.outcome, ids, plan.how)

    # -- planning
    def _plan(self, dl: DeadLetter) -> _Plan:
        """How ``dl`` goes through the outbox again, or why it cannot."""
        if dl.event_id and self.store.existing_event_ids([dl.event_id]):
            return _Plan(event_ids=(dl.event_id,), how=f"event {dl.event_id} is in the outbox: published again")
        if dl.stage == "source":
            return self._plan_source(dl)
        if dl.stage == "bridge":
            return self._cannot(dl, "it holds a scored event the bridge could not encode for its legacy queue; "
                                    "scored events do not go through the outbox (fix the bridge's fields; the next "
                                    "scored events are forwarded)")
        if dl.payload is None:
            return self._cannot(dl, "it has no payload")
        try:
            ev = Event.from_json(self._payload_text(dl))
        except (ContractError, ValueError) as exc:
            return self._cannot(dl, f"its payload is not a CloudEvent ({exc})")
        if _EXT_ORIGINAL_ID in ev.extensions:
            return self._cannot(dl, f"its payload is a scored event (of event {ev.extensions[_EXT_ORIGINAL_ID]}), "
                                    "an output of the gateway; replay the original event instead")
        return _Plan(events=(ev,), how=f"CloudEvent {ev.id} accepted into the outbox (idempotent on its id)")

    def _plan_source(self, dl: DeadLetter) -> _Plan:
        name = dl.source_name
        if dl.headers and "position" in dl.headers:
            return self._cannot(dl, f"it is a raw item the adapter could not decode ({dl.error_class}), not a "
                                    "record: there is nothing to map; correct it at the source and send it again")
        try:
            obj = loads(dl.payload or "null")
        except ValueError:
            obj = None
        if isinstance(obj, Mapping) and "cursor" in obj and "error" in obj:
            return self._cannot(dl, f"it records a permanent read failure of source {name!r} at a cursor, not a "
                                    f"record: fix the cause, then run `gateway sources resume {name}`")
        if not (isinstance(obj, Mapping) and isinstance(obj.get("data"), Mapping)):
            return self._cannot(dl, "its payload is not a stored record ({\"data\": {...}, \"position\": ...})")
        src = self.sources.get(name or "")
        if src is None:
            return self._cannot(dl, f"source {name!r} is not configured here, so there is no mapping to apply "
                                    "(run the replay with the gateway's configuration)")
        try:
            from gateway.plugins import load_adapter
            from gateway.sources.mapping import Mapper

            mapper = Mapper(src.mapping, src.name, load_adapter(src.adapter).kind)
            ev = mapper.to_event(Record(data=dict(obj["data"]), position=obj.get("position")))
        except ContractError as exc:
            why = f"the current mapping of source {name!r} still rejects the record: {exc}"
            return _Plan(error=f"dead letter {dl.id} (stage source) cannot be replayed: {why}",
                         new_error=(type(exc).__name__, str(exc)))
        except (ConfigurationError, GatewayError) as exc:
            return self._cannot(dl, f"source {name!r}: {exc}")
        return _Plan(events=(ev,), source_name=src.name,
                     how=f"record re-mapped with the current mapping of source {name!r} as event {ev.id}")

    @staticmethod
    def _cannot(dl: DeadLetter, why: str) -> _Plan:
        return _Plan(error=f"dead letter {dl.id} (stage {dl.stage}) cannot be replayed: {why}")

    @staticmethod
    def _payload_text(dl: DeadLetter) -> str | bytes:
        if dl.headers and dl.headers.get("payload_encoding") == "base64":
            return base64.b64decode(dl.payload or "")
        return dl.payload or ""


def dead_letter_position(dl: DeadLetter) -> Any:
    """Where the item sat in its source (record position, reject position or failing cursor), if known."""
    if dl.headers and "position" in dl.headers:
        return dl.headers["position"]
    try:
        obj = loads(dl.payload) if dl.payload and dl.payload[:1] == "{" else None
    except ValueError:
        return None
    if not isinstance(obj, Mapping):
        return None
    if dl.stage == "source":
        return obj.get("position", obj.get("cursor"))
    pos = obj.get(EXT_POSITION)
    if isinstance(pos, str):
        try:
            return loads(pos)
        except ValueError:
            return pos
    return pos


# ---------------------------------------------------------------------------- broker DLQ drain
def _json_safe(value: Any) -> Any:
    try:
        return jsonable(value)
    except TypeError:
        return repr(value)


def broker_dead_letter(d: Delivery, topology: Topology) -> dict[str, Any]:
    """The ``broker`` dead-letter row of one message from ``<prefix>.dead`` (keys of
    :meth:`EventStore.add_dead_letter_once`).

    ``error_class`` is the latest ``x-death`` reason (``delivery_limit``, ``rejected``,
    ``expired``, ``maxlen``); ``attempts`` is the number of deliveries that ``x-death`` implies
    (``delivery_limit + 1`` for a delivery-limit death). The DLQ's own ``x-delivery-count`` counts
    deliveries from the DLQ and is ignored. ``dedupe_key`` is a digest of the message id, the body
    and ``x-death``: a redelivery of the same DLQ message has the same key, a later death of the
    same event (after a replay) a new one.
    """
    headers = {str(k): _json_safe(v) for k, v in dict(d.headers).items() if k != "x-delivery-count"}
    deaths = [x for x in headers.get("x-death") or [] if isinstance(x, Mapping)]
    last = deaths[0] if deaths else {}
    reason = str(last.get("reason") or headers.get("x-first-death-reason") or "unknown")
    queue = str(last.get("queue") or headers.get("x-first-death-queue") or "?")
    count = sum(int(x.get("count") or 0) for x in deaths if isinstance(x.get("count"), int)) or 1
    attempts = max(count, topology.delivery_limit + 1) if reason == "delivery_limit" else count
    headers["routing_key"] = d.routing_key
    if d.content_type:
        headers["content_type"] = d.content_type
    try:
        payload: str = d.body.decode("utf-8")
    except UnicodeDecodeError:
        payload = base64.b64encode(d.body).decode("ascii")
        headers["payload_encoding"] = "base64"
    source_name = None
    try:
        obj = loads(d.body)
        if isinstance(obj, Mapping) and isinstance(obj.get("sourcename"), str):
            source_name = obj["sourcename"][:128]
    except ValueError:
        pass
    digest = hashlib.sha256()
    for part in (d.message_id.encode(), hashlib.sha256(d.body).digest(), dumps(deaths)):
        digest.update(len(part).to_bytes(8, "big") + part)
    return {
        "stage": BROKER_STAGE,
        "error_class": reason,
        "reason": f"dead-lettered by the broker: {reason} on queue {queue!r} ({count} time(s))",
        "payload": payload,
        "source_name": source_name,
        "event_id": (d.message_id or None) and d.message_id[:64],
        "headers": headers,
        "attempts": attempts,
        "dedupe_key": digest.hexdigest(),
    }


@dataclass
class DrainStats:
    """Counters of one drain."""

    stored: int = 0
    duplicates: int = 0
    store_failures: int = 0


class DeadLetterDrain:
    """Moves messages from the broker's ``<prefix>.dead`` queue into ``dead_letters`` (stage ``broker``).

    Each message is acked only after its row committed. A message the scorer already parked
    (an open ``scoring`` dead letter for the same event) and a redelivered DLQ message are acked
    without a second row. When the store fails, the batch's unsettled messages are requeued after
    a backoff: nothing is acked that is not stored.

    Args:
        consumer: a consumer of ``topology.dead_letter_queue``.
        store: the gateway store.
        topology: bus names and the delivery limit.
        batch_max: messages per batch.
        max_wait: seconds to wait for the first message of a batch.
        backoff: seconds to wait after a store failure.
    """

    def __init__(
        self,
        consumer: Consumer,
        store: EventStore,
        topology: Topology,
        *,
        batch_max: int = 100,
        max_wait: float = 1.0,
        backoff: float = 2.0,
    ) -> None:
        self.consumer = consumer
        self.store = store
        self.topology = topology
        self.batch_max = batch_max
        self.max_wait = max_wait
        self.backoff = backoff
        self.stats = DrainStats()

    def run(self, stop: threading.Event) -> None:
        """Drain until ``stop`` is set."""
        while not stop.is_set():
            try:
                if self.run_once() < 0:
                    stop.wait(self.backoff)
            except Exception:
                log.exception("dead-letter drain: unexpected error; retrying in %.0f s", self.backoff)
                stop.wait(self.backoff)

    def run_once(self, max_wait: float | None = None) -> int:
        """Drain one batch; returns the messages settled (-1 when the store failed)."""
        batch = self.consumer.get_batch(self.batch_max, self.max_wait if max_wait is None else max_wait, 0.05)
        done: list[Delivery] = []
        try:
            for d in batch:
                row = broker_dead_letter(d, self.topology)
                dl_id, created = self.store.add_dead_letter_once(**row, open_stages=_STAGES_ALSO_IN_DLQ)
                if created:
                    self.stats.stored += 1
                    log.warning("broker dead letter %d: message %s (%s)", dl_id, d.message_id or "<no id>", row["reason"])
                else:
                    self.stats.duplicates += 1
                    log.info("DLQ message %s is dead letter %d already", d.message_id or "<no id>", dl_id)
                done.append(d)
        except GatewayError as exc:
            self.stats.store_failures += 1
            log.warning("dead-letter drain: store failed (%s); %d message(s) go back to the queue", exc,
                        len(batch) - len(done))
            if done:
                self.consumer.ack(done)
            for d in batch[len(done):]:
                self.consumer.reject(d, requeue=True)
            return -1
        if done:
            self.consumer.ack(done)
        return len(done)
