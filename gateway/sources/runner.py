"""The source runner: poll an adapter, map records, accept events and cursor in one transaction.

The acceptance point: a batch's cursor advances only in the transaction that stores its events
(and the dead letters of its unmappable records). A crash anywhere replays at most the batch that
was not committed, and deterministic ids make the replay harmless. Nothing below moves the
cursor otherwise: a failed, paused or drift-stopped source keeps the cursor of its last commit.

Every ``fetch`` goes through the source's circuit breaker, wrapped as ``Retry(CircuitBreaker(fetch))``:
each attempt is one breaker call, a transient failure counts as a breaker failure, a permanent one
(the source answered) as a success. The breaker is named by the adapter's
:meth:`~adapters.base.PollingSource.breaker_key` (default ``source:<name>``) and taken from a
:class:`~gateway.resilience.BreakerRegistry`, so sources behind one endpoint share one breaker.
While the breaker is open the adapter is not called: :meth:`SourceRunner.run_once` raises
``CircuitOpenError`` at once (the retry policy never retries it) and :meth:`SourceRunner.run`
pauses the source until the breaker lets trial polls through. The store write is not behind the
source breaker: the store is the gateway's own and has its own retry.

Retries are budgeted: the fetch by the retry budget of the breaker's name, the store commit by
the ``store`` budget (:class:`~gateway.resilience.RetryBudget`, policies from
``settings.resilience``); an empty budget ends the retries at once.

:meth:`SourceRunner.run` also:

* pauses polling while the **outbox backlog** is above its threshold (state ``backpressure``,
  REL-09; see :class:`~gateway.resilience.OutboxBackpressure`): the relay cannot keep up (the broker
  refuses or is down), so the source's records stay where they are and its cursor does not move;
* stops polling after a **permanent** fetch error (``PermanentError``, ``ConfigurationError``):
  one dead letter, state ``failed``, until an operator resumes the source;
* honours **operator commands** from the store (``gateway sources pause|resume|accept-drift|run``),
  checked every ``status_interval`` seconds; a "run now" (``source_run_requests``) it has not seen
  before ends the wait between polls (or a transient-error backoff) at once;
* watches **schema drift** through the adapter's :meth:`~adapters.base.PollingSource.fingerprint`;
* **persists its status** (``source_status``) on every state change and breaker transition, and
  otherwise at most every ``status_interval`` seconds, for other processes to read. A store failure
  while writing status is logged; it never stops the runner.

**One active runner per source across replicas.** A runner polls only while it holds the source's
lease in the store (:meth:`~gateway.store.EventStore.try_acquire_lease`, ``sources[].lease_ttl``).
Otherwise it is ``standby``: it does not open the adapter, and tries to take the lease every
``lease_ttl/3`` and right after the holder's lease expires. The holder renews it at least every ``lease_ttl/3`` -- between polls and within
every wait (waits are cut into slices for that). Every cursor write carries the epoch the lease was
taken with; when the holder loses the lease (a renewal fails) or its cursor write is fenced
(``FencingError``: it was stuck past the TTL and another replica took over, or an operator moved
the cursor), it stops polling at once, closes the adapter and goes back to ``standby``. If the lease
is still its own (an operator's cursor move), it re-acquires it at once and reloads the committed
cursor; otherwise it waits for the new holder to stop. On a graceful stop it releases the lease,
so a standby takes over at its next try.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from adapters.base import Batch, PollingSource, Reject
from gateway.config import ResilienceSettings, SourceSettings
from gateway.errors import (
    CircuitOpenError,
    ConfigurationError,
    ContractError,
    FencingError,
    GatewayError,
    PermanentError,
)
from gateway.events import Event, jsonable, utcnow
from gateway.events.jsonsafe import dumps, loads
from gateway.governance import Governance
from gateway.plugins import load_adapter
from gateway.resilience import (
    BreakerListener,
    BreakerRegistry,
    BreakerState,
    CircuitBreaker,
    OutboxBackpressure,
    RetryPolicy,
    retrying,
)
from gateway.resilience.crashpoints import armed, crash_point
from gateway.sources.drift import DriftTracker
from gateway.sources.mapping import Mapper
from gateway.store import AcceptResult, EventStore, StoredSourceStatus
from gateway.store.schema import DESIRED_PAUSED, DESIRED_RUNNING

__all__ = ["STATES", "SourceRunner", "SourceStatus", "build_adapter"]

log = logging.getLogger("gateway.sources")

#: Longest single pause of a source whose breaker is open; the runner re-checks the breaker after
#: it (without calling the adapter), so a breaker forced open indefinitely is re-checked regularly.
MAX_PAUSE = 60.0

#: Every state a runner reports, in ``status.state`` and the ``source_status`` table.
STATES = (
    "idle",  # between polls
    "polling",  # a poll is in progress
    "backoff",  # the last poll failed with a transient error; retrying with backoff
    "paused",  # the source's circuit breaker is open; waiting for trial polls
    "backpressure",  # the outbox backlog is above its threshold; waiting for the relay to drain it
    "paused-by-operator",  # `gateway sources pause`; waiting for `resume`
    "failed",  # a permanent error; waiting for `resume` (or a restart)
    "drift-stopped",  # schema drift with stop_on_drift; waiting for `accept-drift` or `resume`
    "standby",  # another runner holds the source's lease; waiting to take it over
    "stopped",  # run() returned
)

#: The routine poll cycle: switching between these is written with the periodic status write only.
_ROUTINE = frozenset({"idle", "polling"})

#: A renewal is due a little before ``lease_ttl/3`` has passed, so a wait of exactly
#: ``lease_ttl/3`` that returns a hair early still renews.
_RENEW_SLACK = 0.95


def _wait_on(stop: threading.Event, seconds: float) -> bool:
    """Default wait of :meth:`SourceRunner.run`: sleep ``seconds`` unless ``stop`` is set first."""
    return stop.wait(seconds)


def build_adapter(settings: SourceSettings) -> PollingSource:  # type: ignore[type-arg]
    """Instantiate the configured adapter with its validated config."""
    cls = load_adapter(settings.adapter)
    return cls(cls.parse_config(settings.config), source_name=settings.name)


def _same_cursor(old_payload: str | None, new_payload: str | None) -> bool:
    """Whether two source dead-letter payloads were read from the same cursor."""
    try:
        return bool(loads(old_payload or "null")["cursor"] == loads(new_payload or "null")["cursor"])
    except (TypeError, KeyError, ValueError):
        return False


class _ProvisionalBreaker(CircuitBreaker):
    """Stands in for a source's breaker until :meth:`SourceRunner.start` knows its key.

    No call goes through it (nothing is fetched before ``start``); listeners added to it move to
    the real breaker.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.added: list[BreakerListener] = []

    def add_listener(self, listener: BreakerListener) -> None:
        """Register ``listener`` here and, at ``start()``, on the real breaker."""
        super().add_listener(listener)
        self.added.append(listener)


def _json_safe(value: Any) -> Any:
    """``jsonable(value)``, or its ``repr`` when it holds something JSON cannot represent."""
    try:
        return jsonable(value)
    except TypeError:
        return repr(value)


@dataclass
class SourceStatus:
    """What a running source reports (in memory; persisted to ``source_status``)."""

    name: str
    state: str = "idle"  #: one of :data:`STATES`
    last_poll_at: datetime | None = None
    last_error: str | None = None
    polls: int = 0
    events_accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    #: The source breaker's :meth:`~gateway.resilience.CircuitBreaker.snapshot`, replaced (never
    #: mutated) after every poll and on every breaker transition.
    breaker: dict[str, Any] = field(default_factory=dict)
    #: The schema drift against the stored baseline, or ``None`` (see :class:`DriftTracker`).
    drift: dict[str, Any] | None = None
    #: The lease holder as last seen (this runner's owner while it holds the lease), and until when.
    lease_holder: str | None = None
    lease_until: datetime | None = None


class SourceRunner:
    """Drives one source.

    Args:
        settings: the source's settings.
        store: the gateway store.
        adapter: the adapter instance (built from ``settings`` when ``None``).
        on_accept: called after each committed batch with new events (wakes the relay).
        retry: policy for transient failures of the adapter and the store; overrides
            ``resilience`` (tests).
        sleep: injectable sleep between retry attempts (tests).
        clock: monotonic clock of the source's circuit breaker (when the runner creates its own
            registry), of the status-write and operator-check periods and of drift checks (tests
            inject a fake one).
        wait: how :meth:`run` waits between polls, in backoff, while paused, while stopped
            (failed, paused by an operator, drift) and in standby: ``wait(stop, seconds)`` must
            return early when ``stop`` is set (tests inject one that moves a fake clock). Waits
            are at most ``lease_ttl/3`` long, so the lease is renewed in time.
        breakers: the registry the source's breaker comes from; runners given the same registry
            share a breaker when their adapters return the same ``breaker_key()``. Default: a
            private registry.
        status_interval: seconds between status writes and operator-command checks (default:
            ``settings.status_interval``).
        owner: identity holding the lease and written with the status (default
            ``hostname:pid:runner-id``); unique per runner.
        lease_ttl: seconds the source's lease lasts unless renewed (default:
            ``settings.lease_ttl``). Lease times come from the store's (UTC) clock; renewal is
            scheduled on ``clock``.
        resilience: retry policies and budgets by downstream (default: the defaults of
            :class:`~gateway.config.ResilienceSettings`). The fetch is retried with the policy
            and budget of the breaker's name, the store commit with those of ``store``; budgets
            come from ``breakers``, so runners given one registry share them.
        backpressure: the process's outbox backlog gate; while it is engaged the runner does not
            poll (state ``backpressure``). ``None``: no backlog check.
    """

    def __init__(
        self,
        settings: SourceSettings,
        store: EventStore,
        *,
        adapter: PollingSource | None = None,  # type: ignore[type-arg]
        on_accept: Callable[[], None] | None = None,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[threading.Event, float], object] = _wait_on,
        breakers: BreakerRegistry | None = None,
        status_interval: float | None = None,
        owner: str | None = None,
        lease_ttl: float | None = None,
        resilience: ResilienceSettings | None = None,
        backpressure: OutboxBackpressure | None = None,
        governance: Governance | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        #: PII policies and contracts applied right before the outbox commit (docs/governance.md).
        self.governance = governance if governance is not None and governance.active else None
        self.adapter = adapter or build_adapter(settings)
        self.mapper = Mapper(settings.mapping, settings.name, self.adapter.kind)
        self.status = SourceStatus(settings.name)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._on_accept = on_accept
        self._sleep = sleep
        self._retry = retry
        self._resilience = resilience if resilience is not None else ResilienceSettings()
        self._backpressure = backpressure
        self._backpressured_since: float | None = None  # clock() when the current episode began
        self._wait = wait
        self._clock = clock
        self._status_interval = settings.status_interval if status_interval is None else status_interval
        self._lease_ttl = settings.lease_ttl if lease_ttl is None else lease_ttl
        self._epoch: int | None = None  # the epoch of the lease held; None while not holding it
        self._renewed_at = float("-inf")  # clock() when the lease was last taken or renewed
        self._started = False
        self._cursor: Any = None
        # Operator wishes as last read from the store.
        self._desired = DESIRED_RUNNING
        self._generation = 0
        self._run_requested: datetime | None = None  # the last "run now" wish read (source_run_requests)
        self._drift = DriftTracker()
        # Periodic work: last time (clock) of each; -inf makes the first one due at once.
        self._saved_at = self._controlled_at = self._drift_checked_at = float("-inf")
        self._status_lock = threading.RLock()  # breaker listeners may save from other runners' threads
        self._pending_dead_letter: dict[str, Any] | None = None
        self._registry = breakers if breakers is not None else BreakerRegistry(clock)
        # Reusable (the runner is one thread). Their sleeps renew the lease when due: a fetch or
        # store write retried with backoff must not let the lease lapse.
        self._store_retrying = self._retrying_for("store")
        self._fetch_retrying = self._retrying_for(f"source:{settings.name}", budgeted=False)  # until attached
        self._breaker: CircuitBreaker
        if type(self.adapter).breaker_key is PollingSource.breaker_key:
            # The default key does not depend on open(): take the real breaker now.
            self._attach_breaker(self.adapter.breaker_key())
        else:
            # breaker_key() is called after open(): a private stand-in until start().
            self._breaker = _ProvisionalBreaker(
                f"source:{settings.name}", settings.breaker.to_policy(), clock=clock,
                listeners=[self._on_breaker_transition],
            )
            self.status.breaker = self._breaker.snapshot()

    # ------------------------------------------------------------------ breaker
    @property
    def breaker(self) -> CircuitBreaker:
        """The circuit breaker guarding this source's fetch (shared with sources of the same key).

        When the adapter overrides ``breaker_key()``, the real breaker is known only after
        :meth:`start` (the key is asked for after ``open()``); until then this is a private
        stand-in named ``source:<name>``, and listeners added to it move to the real breaker.
        """
        return self._breaker

    def _retrying_for(self, downstream: str, *, budgeted: bool = True) -> Any:
        """A reusable tenacity ``Retrying`` with ``downstream``'s policy and budget."""
        policy = self._retry or self._resilience.retry_policy(downstream)
        budget = self._registry.budget(downstream, self._resilience.budget_policy(downstream)) if budgeted else None
        return retrying(policy, budget=budget, sleep=self._sleep_renewing, clock=self._clock, logger=log)

    def _attach_breaker(self, key: str) -> None:
        """Get (or create) the breaker ``key`` and its retry budget, and listen to its transitions."""
        self._fetch_retrying = self._retrying_for(key)
        breaker = self._registry.get(key, self.settings.breaker.to_policy())
        breaker.add_listener(self._on_breaker_transition)
        provisional = getattr(self, "_breaker", None)
        if isinstance(provisional, _ProvisionalBreaker):
            for listener in provisional.added:
                breaker.add_listener(listener)
        self._breaker = breaker
        self.status.breaker = breaker.snapshot()

    def _on_breaker_transition(self, name: str, old: BreakerState, new: BreakerState) -> None:
        """Keep ``status.breaker`` current, say what the transition means and persist it.

        Runs in the thread that caused the transition, which may be another source's runner.
        """
        self.status.breaker = self.breaker.snapshot()
        if new is BreakerState.OPEN:
            log.warning("source %r: circuit %r %s -> open: source paused", self.settings.name, name, old.value)
        elif new is BreakerState.CLOSED:
            log.warning("source %r: circuit %r closed: source resumed", self.settings.name, name)
        self._save_status(force=True)

    @property
    def batch_size(self) -> int:
        return int(getattr(self.adapter.config, "batch_size", 1000))

    # ------------------------------------------------------------------ start and poll
    def start(self) -> None:
        """Take the source's lease, open the adapter, load the cursor, operator state and baseline.

        The lease is taken first (unless held already), so the holder owns the source (and its
        status row) even while its adapter cannot open. The committed cursor is (re)loaded on
        every start: after a lost lease or an operator's cursor move it is the store's, never the
        one this runner had in memory. Then the breaker is attached (``breaker_key()`` is called
        after ``open()``), and the fingerprint is checked once.

        Raises:
            FencingError: another runner holds the source's lease (this one is standby).
            GatewayError: the adapter could not open, or the store could not be read.
        """
        if self._epoch is None and not self._acquire():
            raise FencingError(
                f"source {self.settings.name!r}: the lease is held by {self.status.lease_holder} until "
                f"{self.status.lease_until}; this runner is standby"
            )
        state = self.store.get_cursor(self.settings.name)
        control = self.store.get_source_status(self.settings.name)
        self._cursor = None
        if state is not None and state.cursor is not None:
            self._cursor = state.cursor  # known before open(): a failing open() dead-letters it
        self.adapter.open()
        if isinstance(self._breaker, _ProvisionalBreaker):
            self._attach_breaker(self.adapter.breaker_key())
        if state is None or state.cursor is None:
            self._cursor = self.adapter.initial_cursor()
        self._apply_control(control)
        self._controlled_at = self._clock()
        self._started = True
        self.check_drift()

    def map_batch(self, batch: Batch) -> tuple[list[Event], list[dict[str, Any]]]:
        """Map records; unmappable ones become dead-letter rows (never silently dropped)."""
        events: list[Event] = []
        rejects: list[dict[str, Any]] = []
        for rec in batch.records:
            try:
                events.append(self.mapper.to_event(rec))
            except ContractError as exc:
                rejects.append(
                    {
                        "stage": "source",
                        "source_name": self.settings.name,
                        "error_class": type(exc).__name__,
                        "reason": str(exc),
                        "payload": dumps(jsonable({"data": dict(rec.data), "position": rec.position})).decode(),
                    }
                )
        rejects.extend(self._reject_row(r) for r in batch.rejects)
        return events, rejects

    def _reject_row(self, reject: Reject) -> dict[str, Any]:
        """A dead-letter row for what the adapter could not turn into a record (raw payload kept)."""
        headers: dict[str, Any] = {**_json_safe(dict(reject.headers)), "position": _json_safe(reject.position)}
        payload = reject.payload
        if isinstance(payload, (bytes, bytearray)):
            try:
                payload = bytes(payload).decode("utf-8")
            except UnicodeDecodeError:
                payload = base64.b64encode(bytes(payload)).decode("ascii")
                headers["payload_encoding"] = "base64"
        row = {
            "stage": "source",
            "source_name": self.settings.name,
            "error_class": reject.error_class,
            "reason": reject.reason,
            "payload": payload,
            "headers": headers,
            "attempts": reject.attempts,
        }
        if reject.position is not None:  # the legacy record's identity: stored once per error class
            identity = dumps([self.settings.name, _json_safe(reject.position), reject.error_class])
            row["dedupe_key"] = hashlib.sha256(identity).hexdigest()
        return row

    def run_once(self) -> Batch:
        """Poll once and commit the batch; returns the batch read.

        Raises:
            FencingError: this runner does not hold the source's lease (standby), lost it, or its
                cursor write was refused (another runner took over, or an operator moved the
                cursor): nothing of the batch was written. The runner forgets the lease and closes
                the adapter; the next call tries to take the lease again and reloads the cursor.
            GatewayError: a permanent error, or a transient one that outlived the retry policy.
        """
        if not self._started:
            self.start()
        self._set_state("polling")
        try:
            try:
                batch = self._fetch_guarded()
            finally:
                self.status.breaker = self.breaker.snapshot()
            try:
                events, rejects = self.map_batch(batch)
                result = AcceptResult(inserted=[], duplicates=[])
                contract_rejects = 0
                if batch.records or batch.rejects:  # an empty poll writes nothing: no transaction at all
                    for attempt in self._store_retrying:
                        with attempt:
                            if self.governance is None:
                                result = self.store.accept(
                                    events,
                                    source_name=self.settings.name,
                                    cursor=batch.cursor,
                                    epoch=self._epoch,
                                    write_cursor=True,
                                    rejects=rejects,
                                )
                            else:  # inside the retry: a contract conflict (transient) re-checks the batch
                                result, governed = self.governance.accept(
                                    self.store, events, source_name=self.settings.name, cursor=batch.cursor,
                                    epoch=self._epoch, write_cursor=True, rejects=rejects,
                                )
                                contract_rejects = len(governed.rejects)
            except BaseException:
                self._release(batch)  # not committed: the adapter gives back what it holds
                raise
        except FencingError:
            self._drop_lease()
            raise
        if armed("source.after_outbox_commit_before_source_ack"):  # chaos tests only (REL-02)
            crash_point("source.after_outbox_commit_before_source_ack", [e.id for e in events])
        self.adapter.committed(batch)  # after the commit, never before (a queue acks here)
        self._cursor = batch.cursor
        st = self.status
        st.polls += 1
        st.last_poll_at = utcnow()
        st.events_accepted += len(result.inserted)
        st.duplicates += len(result.duplicates)
        st.rejected += len(rejects) + contract_rejects
        recovered = st.last_error is not None
        st.last_error = None
        self._set_state("idle")
        self._save_status(force=recovered)
        if result.inserted and self._on_accept:
            self._on_accept()
        return batch

    def _release(self, batch: Batch) -> None:
        try:
            self.adapter.released(batch)
        except Exception:  # noqa: BLE001 -- the commit's own error is the one to report
            log.exception("source %r: adapter.released() failed", self.settings.name)

    def _fetch_guarded(self) -> Batch:
        """``Retry(CircuitBreaker(fetch))``: every attempt is one call through the source breaker.

        The adapter's error is classified *inside* the breaker, so the breaker counts the gateway
        taxonomy: ``TransientError`` is a failure, ``PermanentError`` a success (the source
        answered), ``CircuitOpenError`` from an adapter's own inner breaker is ignored.

        Raises:
            CircuitOpenError: the source breaker is open (the adapter was not called); never retried.
            GatewayError: a permanent error, or a transient one that outlived the retry policy.
        """

        def fetch() -> Batch:
            try:
                return self.adapter.fetch(self._cursor, self.batch_size)
            except Exception as exc:  # noqa: BLE001 -- classified here, in one place
                raise self.adapter.classify_error(exc) from exc

        batch: Batch | None = None
        for attempt in self._fetch_retrying:
            with attempt:
                batch = self.breaker.call(fetch)
        assert batch is not None  # tenacity re-raises when every attempt failed
        return batch

    def _pause_for(self, exc: BaseException) -> float | None:
        """Seconds to pause after ``exc`` because a breaker is open, or ``None`` (plain backoff)."""
        if isinstance(exc, CircuitOpenError):
            retry_after = exc.retry_after
        else:
            # The retry ran out on the very failure that opened the breaker: pause right away
            # instead of backing off into a rejection.
            snap = self._breaker.snapshot()
            if snap["state"] != BreakerState.OPEN.value:
                return None
            retry_after = snap["retry_after"]
        return min(max(retry_after, 0.0), MAX_PAUSE)

    # ------------------------------------------------------------------ the loop
    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set: at once while the source has more, else every ``interval``.

        Only while this runner holds the source's lease; otherwise it is ``standby`` (see the
        module docstring) until it can take the lease over. A lost lease or a fenced cursor write
        sends it back to standby; it never stops the runner. On return, :meth:`close` releases
        the lease.

        While the source breaker is open, the source is *paused* (``status.state == "paused"``):
        the runner waits the breaker's ``retry_after`` instead of the generic backoff and does not
        call the adapter; then the breaker's half-open trial polls go through, and once it closes
        the source polls at full speed again.

        A permanent error (``PermanentError``, ``ConfigurationError``) is never retried: the
        runner writes one dead letter (``stage="source"``, payload ``{"cursor", "error"}``), reports
        ``failed`` and stops calling the adapter until an operator resumes the source
        (``gateway sources resume``) or the process restarts. ``gateway sources pause`` stops
        polling (``paused-by-operator``) within ``status_interval`` until resumed. Schema drift
        with the adapter's ``stop_on_drift`` stops polling (``drift-stopped``) until the drift is
        accepted or the source resumed. In these states the runner keeps (and renews) the lease.
        """
        backoff = 1.0
        try:
            while not stop.is_set():
                try:
                    if self._epoch is None and not self._standby(stop):
                        break
                    backoff = self._step(stop, backoff)
                except FencingError as exc:
                    self._lose_lease(exc)
                    backoff = 1.0
        finally:
            self.close()

    def _step(self, stop: threading.Event, backoff: float) -> float:
        """One turn of :meth:`run` while holding the lease; returns the next backoff.

        Raises:
            FencingError: the lease is lost or the cursor write was fenced (from anywhere
                inside, waits included).
        """
        try:
            self._keep_lease()
            if not self._started:
                self.start()
            self._refresh_control()
            if self._desired == DESIRED_PAUSED:
                self._hold(stop, "paused-by-operator", needs_command=False)
                return backoff
            self._maybe_check_drift()
            if self._drift.blocks(self.adapter.stop_on_drift):
                if self._hold(stop, "drift-stopped", needs_command=True):
                    self._drift.override()  # resumed without accepting: poll despite this digest
                    self.status.drift = self._drift.drift
                return backoff
            if self._backpressure is not None and self._hold_for_backpressure(stop):
                return backoff
            batch = self.run_once()
            if not batch.has_more:
                self._pace(stop, self.settings.interval)
            return 1.0
        except FencingError:
            raise  # a PermanentError, but not the source's: run() goes back to standby
        except (PermanentError, ConfigurationError) as exc:
            self._fail(exc)
            self._hold(stop, "failed", needs_command=True)
            return 1.0
        except Exception as exc:  # noqa: BLE001 -- a runner must never die silently
            pause = self._pause_for(exc)
            self.status.last_error = f"{type(exc).__name__}: {exc}"
            if pause is not None:
                self.status.breaker = self._breaker.snapshot()
                self._set_state("paused")
                log.warning(
                    "source %r: paused, circuit open (%s: %s); next trial poll in %.1fs",
                    self.settings.name, type(exc).__name__, exc, pause,
                )
                # Not cut into status_interval slices: the adapter is not called while paused,
                # and operator commands are checked before the next trial poll. Cut into
                # lease_ttl/3 slices, though, to renew the lease.
                self._wait_holding(stop, pause)
                return 1.0
            self._set_state("backoff")
            if isinstance(exc, GatewayError):
                log.error("source %r: %s: %s (next try in %.0fs)", self.settings.name, type(exc).__name__, exc, backoff)
            else:
                log.exception("source %r: unexpected error (next try in %.0fs)", self.settings.name, backoff)
            self._pace(stop, backoff)
            return min(backoff * 2, 60.0)

    def _hold_for_backpressure(self, stop: threading.Event) -> bool:
        """While the outbox backlog is above its threshold: report ``backpressure`` and wait one
        check interval without polling (the lease is renewed). Returns whether it waited.

        Logged once per episode (on entering and on leaving): the source's records stay in the
        legacy system and its cursor does not move, so nothing is lost while it waits.
        """
        gate = self._backpressure
        assert gate is not None
        if not gate.engaged():
            if self._backpressured_since is not None:
                log.warning(
                    "source %r: backpressure released after %.0fs (outbox backlog %s, below %g): polling resumes",
                    self.settings.name, self._clock() - self._backpressured_since, gate.pending, gate.resume_below,
                )
                self._backpressured_since = None
                self._set_state("idle")
            return False
        if self._backpressured_since is None:
            self._backpressured_since = self._clock()
            log.warning(
                "source %r: backpressure: the outbox holds %s undelivered events (threshold %d); polling pauses "
                "until it drops below %g",
                self.settings.name, gate.pending, gate.threshold, gate.resume_below,
            )
        self._set_state("backpressure")
        self._wait_holding(stop, min(gate.interval, self._status_interval))
        self._save_status()  # heartbeat
        return True

    def close(self) -> None:
        """Stop holding the source: close the adapter, report ``stopped``, release the lease.

        What :meth:`run` does when it returns; call it after driving the runner with
        :meth:`run_once`. Releasing lets a standby replica take over at its next try instead of
        after the TTL. Store failures are logged (the lease then expires by itself).
        """
        self.adapter.close()
        self._started = False
        self._set_state("stopped")
        epoch, self._epoch = self._epoch, None
        try:
            if epoch is not None:
                self.store.release_lease(self.settings.name, self.owner, epoch)
            self.store.remove_runner(self.settings.name, self.owner)
        except Exception as exc:  # noqa: BLE001 -- best effort: the lease expires by itself
            log.warning("source %r: could not release its lease (%s: %s)", self.settings.name, type(exc).__name__, exc)

    # ------------------------------------------------------------------ the lease
    def _acquire(self) -> bool:
        """Try to take (or extend) the lease; ``status.lease_holder`` says who holds it.

        Raises:
            StoreUnavailableError: the store could not be asked.
        """
        name = self.settings.name
        asked_at = self._clock()
        epoch = self.store.try_acquire_lease(name, self.owner, self._lease_ttl)
        if epoch is None:
            state = self.store.get_cursor(name)
            self.status.lease_holder = state.lease_owner if state else None
            self.status.lease_until = state.lease_until if state else None
            return False
        if epoch != self._epoch:
            log.info("source %r: this runner (%s) holds the lease, epoch %d", name, self.owner, epoch)
        self._epoch, self._renewed_at = epoch, asked_at
        self.status.lease_holder = self.owner
        self.status.lease_until = None
        return True

    def _standby(self, stop: threading.Event) -> bool:
        """Wait as ``standby`` until the lease is ours: try now, then every ``lease_ttl/3`` and
        right after the holder's lease expires.

        The adapter stays closed meanwhile. Returns ``True`` once the lease is held, ``False``
        when ``stop`` is set.
        """
        announced: str | None = None
        while not stop.is_set():
            try:
                if self._acquire():
                    if announced is not None:
                        log.warning("source %r: took the lease over from %s", self.settings.name, announced)
                    return True
            except Exception as exc:  # noqa: BLE001 -- the store may come back; keep trying
                log.warning("source %r: could not try the lease (%s: %s)", self.settings.name, type(exc).__name__, exc)
            holder = self.status.lease_holder or "-"
            if holder != announced:
                log.info(
                    "source %r: standby; the lease is held by %s until %s", self.settings.name, holder,
                    self.status.lease_until,
                )
                announced = holder
            self._set_state("standby")
            self._save_status()  # heartbeat of this standby runner
            self._wait(stop, self._standby_pause())
        return False

    def _standby_pause(self) -> float:
        """``lease_ttl/3``, or less when the holder's lease expires sooner: then the next try is
        right after the expiry, so a standby takes over at most ``lease_ttl`` after the holder's
        last renewal (plus the clock skew between the two)."""
        pause = self._lease_ttl / 3
        until = self.status.lease_until
        if until is not None:
            try:
                left = (until - self.store.now()).total_seconds()
            except Exception:  # noqa: BLE001 -- a store without a clock: the plain period
                return pause
            pause = min(pause, max(left, 0.0) + self._lease_ttl / 100)
        return pause

    def _keep_lease(self) -> None:
        """Renew the lease when ``lease_ttl/3`` passed since it was last taken or renewed.

        Raises:
            FencingError: the lease is lost (another runner took it, or an operator moved the
                cursor), or it could not be renewed for a whole TTL (the store is unreachable:
                another replica may hold it by now).
        """
        if self._epoch is None:
            raise FencingError(f"source {self.settings.name!r}: this runner does not hold the lease")
        now = self._clock()
        if now - self._renewed_at < self._lease_ttl / 3 * _RENEW_SLACK:
            return
        try:
            renewed = self.store.renew_lease(self.settings.name, self.owner, self._epoch, self._lease_ttl)
        except Exception as exc:  # noqa: BLE001 -- retried at the next slice while the lease lasts
            if now - self._renewed_at >= self._lease_ttl:
                raise FencingError(
                    f"source {self.settings.name!r}: the lease could not be renewed for {self._lease_ttl:g} s "
                    f"({type(exc).__name__}); another runner may hold it"
                ) from exc
            log.warning("source %r: could not renew the lease (%s: %s)", self.settings.name, type(exc).__name__, exc)
            return
        if not renewed:
            raise FencingError(
                f"source {self.settings.name!r}: lease with epoch {self._epoch} lost (another runner took the "
                "source over, or an operator moved the cursor)"
            )
        self._renewed_at = now

    def _renewal_in(self) -> float:
        """Seconds until the next renewal is due: how long a wait may last while holding."""
        return max(self._renewed_at + self._lease_ttl / 3 - self._clock(), self._lease_ttl / 30)

    def _sleep_renewing(self, seconds: float) -> None:
        """The retry policy's sleep: sleep, then renew the lease if due (raises FencingError if lost)."""
        self._sleep(seconds)
        if self._epoch is not None:
            self._keep_lease()

    def _drop_lease(self) -> None:
        """Forget the lease (lost or fenced) and close the adapter; the next start re-acquires."""
        self._epoch = None
        self._started = False
        self.status.lease_holder = None
        try:
            self.adapter.close()
        except Exception as exc:  # noqa: BLE001 -- closing is best effort
            log.warning("source %r: closing the adapter failed (%s: %s)", self.settings.name, type(exc).__name__, exc)

    def _lose_lease(self, exc: FencingError) -> None:
        """Stop polling after a lost lease or a fenced cursor write, and go back to standby."""
        self._drop_lease()
        self.status.last_error = f"{type(exc).__name__}: {exc}"
        log.error(
            "%s; this runner stops polling, closes the adapter and waits as standby "
            "(it re-acquires at once if the lease is still its own)", exc,
        )

    # ------------------------------------------------------------------ waits
    def _wait_holding(self, stop: threading.Event, seconds: float) -> None:
        """Wait ``seconds`` in slices that end when a renewal is due (at most ``lease_ttl/3``),
        renewing the lease after each."""
        remaining = seconds
        while remaining > 0 and not stop.is_set():
            step = min(remaining, self._renewal_in())
            self._wait(stop, step)
            remaining -= step
            self._keep_lease()

    def _pace(self, stop: threading.Event, seconds: float) -> None:
        """Wait ``seconds`` in ``status_interval`` slices (cut where a lease renewal is due),
        renewing the lease and ending early on a pause command or a new "run now" request."""
        remaining = seconds
        asked = self._run_requested
        while remaining > 0 and not stop.is_set():
            step = min(remaining, self._status_interval, self._renewal_in())
            self._wait(stop, step)
            remaining -= step
            self._keep_lease()
            if remaining > 0:
                self._save_status()  # heartbeat during long intervals
                self._refresh_control()
                if self._desired == DESIRED_PAUSED:
                    return
                if self._run_requested != asked:
                    log.info("source %r: run now requested by an operator: polling at once", self.settings.name)
                    return

    def _hold(self, stop: threading.Event, state: str, *, needs_command: bool) -> bool:
        """Stop polling in ``state`` until an operator lets the source run again.

        Args:
            stop: the runner's stop event.
            state: the state to report meanwhile.
            needs_command: ``True``: wait for a *new* ``running`` command (failed, drift-stopped:
                the default ``running`` does not count); ``False``: for ``desired_state`` to be
                ``running`` (paused by an operator).

        Returns:
            ``True`` when resumed, ``False`` when stopped.
        """
        self._refresh_control(force=True)
        if not needs_command and self._desired == DESIRED_RUNNING:
            return True  # resumed before this runner saw the pause
        since = self._generation
        self._set_state(state)
        while not stop.is_set():
            self._wait(stop, min(self._status_interval, self._renewal_in()))
            if stop.is_set():
                break
            self._keep_lease()
            self._flush_dead_letter()
            self._refresh_control(force=True)
            if self._desired == DESIRED_RUNNING and (not needs_command or self._generation > since):
                log.warning("source %r: resumed by an operator (was %s)", self.settings.name, state)
                self._set_state("idle")
                return True
            self._save_status()  # heartbeat: updated_at shows the runner is alive
        return False

    def _fail(self, exc: GatewayError) -> None:
        """A permanent error: one dead letter (deduplicated on cursor + message), state failed."""
        message = str(exc) or type(exc).__name__
        self.status.last_error = f"{type(exc).__name__}: {message}"
        error = {"class": type(exc).__name__, "message": message, "details": _json_safe(getattr(exc, "details", None))}
        payload = dumps({"cursor": _json_safe(self._cursor), "error": error}).decode()
        self._pending_dead_letter = {
            "stage": "source",
            "source_name": self.settings.name,
            "error_class": type(exc).__name__,
            "reason": message,
            "payload": payload,
        }
        self._flush_dead_letter()
        log.error(
            "source %r: %s: %s -- a permanent error at cursor %r: the source stops polling; fix the cause "
            "(see dead_letters), then run `gateway sources resume %s`",
            self.settings.name, type(exc).__name__, message, self._cursor, self.settings.name,
        )

    def _flush_dead_letter(self) -> None:
        """Write the pending failure dead letter; kept for the next try when the store fails."""
        if self._pending_dead_letter is None:
            return
        try:
            dl_id, created = self.store.add_dead_letter_once(**self._pending_dead_letter, same=_same_cursor)
        except Exception as exc:  # noqa: BLE001 -- retried while the source waits
            log.warning("source %r: could not write the dead letter yet (%s: %s)", self.settings.name, type(exc).__name__, exc)
            return
        self._pending_dead_letter = None
        self.status.extra["dead_letter_id"] = dl_id
        if not created:
            log.info("source %r: the same failure is already dead letter %d", self.settings.name, dl_id)

    # ------------------------------------------------------------------ drift
    def check_drift(self) -> None:
        """Compare the adapter's fingerprint with the stored baseline (storing the first as baseline).

        A fingerprint error is logged as a warning; polling continues.
        """
        self._drift_checked_at = self._clock()
        try:
            fp = self.adapter.fingerprint()
        except Exception as exc:  # noqa: BLE001 -- drift detection must never stop a source
            log.warning("source %r: fingerprint check failed (%s: %s); polling continues", self.settings.name, type(exc).__name__, exc)
            return
        if fp is None:
            return
        if self._drift.baseline is None:
            try:
                self.store.set_fingerprint_baseline(self.settings.name, fp.digest, fp.parts)
            except Exception as exc:  # noqa: BLE001
                log.warning("source %r: could not store the fingerprint baseline (%s: %s)", self.settings.name, type(exc).__name__, exc)
                return
            log.info("source %r: fingerprint %s stored as the drift baseline", self.settings.name, fp.digest)
            self._drift.set_baseline(fp.digest, fp.parts)
        if self._drift.observe(fp):
            drift = self._drift.drift or {}
            log.warning(
                "source %r: schema drift: fingerprint %s differs from the baseline %s; changed: %s%s",
                self.settings.name, drift.get("current"), drift.get("baseline"), ", ".join(drift.get("changed", [])) or "-",
                "; polling stops until `gateway sources accept-drift` or `resume`" if self.adapter.stop_on_drift else "",
            )
        self._sync_drift()

    def _maybe_check_drift(self) -> None:
        interval = self.adapter.drift_check_interval
        if interval is not None and self._clock() - self._drift_checked_at >= interval:
            self.check_drift()

    def _sync_drift(self) -> None:
        """Mirror the tracker's drift into the status; persist at once when it changed."""
        if self.status.drift != self._drift.drift:
            self.status.drift = self._drift.drift
            self._save_status(force=True)

    # ------------------------------------------------------------------ persisted status
    def _set_state(self, state: str) -> None:
        """Set ``status.state``; a change outside the routine poll cycle is written at once."""
        old, self.status.state = self.status.state, state
        if old != state and not {old, state} <= _ROUTINE:
            self._save_status(force=True)

    def _save_status(self, *, force: bool = False) -> None:
        """Write the status to the store (at most every ``status_interval`` unless ``force``).

        Every runner refreshes its heartbeat row (``source_runners``: state and epoch). Only the
        lease holder writes the source's status row, with its epoch, so a standby or a runner that
        was taken over never clobbers the holder's report (the store refuses writes with an older
        epoch). Never raises: a store failure is logged and the next write tries again.
        """
        now = self._clock()
        if not force and now - self._saved_at < self._status_interval:
            return
        with self._status_lock:
            self._saved_at = now
            st = self.status
            epoch = self._epoch
            try:
                self.store.save_runner(self.settings.name, self.owner, state=st.state, epoch=epoch)
                if epoch is None:
                    return
                self.store.save_source_status(
                    self.settings.name,
                    state=st.state,
                    owner=self.owner,
                    epoch=epoch,
                    last_poll_at=st.last_poll_at,
                    last_error=st.last_error,
                    polls=st.polls,
                    events_accepted=st.events_accepted,
                    duplicates=st.duplicates,
                    rejected=st.rejected,
                    breaker=st.breaker,
                    drift=st.drift,
                )
            except Exception as exc:  # noqa: BLE001 -- status is best effort; polling goes on
                log.warning("source %r: could not save its status (%s: %s)", self.settings.name, type(exc).__name__, exc)

    def _refresh_control(self, *, force: bool = False) -> None:
        """Read operator commands and the drift baseline (at most every ``status_interval``)."""
        now = self._clock()
        if not force and now - self._controlled_at < self._status_interval:
            return
        self._controlled_at = now
        try:
            row = self.store.get_source_status(self.settings.name)
            run_requested = self.store.get_run_request(self.settings.name)
        except Exception as exc:  # noqa: BLE001 -- keep the last known wishes
            log.warning("source %r: could not read operator commands (%s: %s)", self.settings.name, type(exc).__name__, exc)
            return
        self._apply_control(row)
        self._run_requested = run_requested
        self._sync_drift()

    def _apply_control(self, row: StoredSourceStatus | None) -> None:
        """Take the operator wishes and the baseline from a status row (``None``: defaults)."""
        if row is None:
            self._desired, self._generation = DESIRED_RUNNING, 0
            return
        self._desired, self._generation = row.desired_state, row.desired_generation
        self._drift.set_baseline(row.fingerprint, row.fingerprint_parts)
