"""The scoring worker: consume events in micro-batches, score, commit, publish, then ack.

One micro-batch goes through these steps, in this order (REL-06, REL-07, REL-08):

0. Ask the model's circuit breaker (``scorer:<model>``) first. ``OPEN``: take nothing -- the
   consumer is paused and the events wait in the queue, no attempt counted -- until the breaker's
   ``retry_after``. ``HALF_OPEN``: resume with a prefetch of the breaker's half-open permits and
   take a trial batch of that size, scored one event per model call. ``CLOSED`` again: the full
   prefetch is restored at once, and the batch size doubles per good batch from twice the trial
   size up to ``batch_max``. (Every prefetch change restarts the subscription on RabbitMQ, and
   messages in flight then come back with their delivery count raised: the prefetch changes
   twice per breaker episode, no more.)
1. ``get_batch`` -- bounded in size (``batch_max``) and time (``batch_linger_ms``).
2. Parse every delivery with :meth:`Event.from_json`. A body that does not parse is poison: a dead
   letter row is stored (stage ``scoring``) and the delivery is rejected without requeue, so the
   broker's DLX has it too.
3. Events whose score is already committed -- redeliveries, delayed retries, operator replays and
   the copies a crashed relay sends again -- reuse that score (one look-up per batch): they are not
   scored (nor learned) twice, and the republished scored event is identical to the first. A
   duplicate scored by another worker at the same moment loses the insert race in step 5 and
   publishes the committed score too.
4. Score the rest, each model call as ``Breaker(Timeout(call))`` (the retry is step 8).
   Redelivered events -- a dead scorer may have died on one of them -- are scored after committing
   a *started* attempt to the store, removed once the model answered. An event whose record
   survived a process is scored alone, one at a time per process; one started ``max_attempts``
   times without finishing killed the scorer each time and is dead-lettered (``ScorerCrashLoop``)
   without being scored again (REL-07). A failing
   batch is re-scored event by event, so one bad event does not hold back the others. Events the
   breaker refused were not tried: they are handed back (requeued) with no attempt counted.
5. ``store.save_scores`` -- idempotent on (event, model, version). If the store fails, the whole
   batch is requeued after a backoff and nothing is acked.
6. Publish the scored events to the scored exchange (routing key = the original type, message id
   = the deterministic scored-event id) and wait for the confirms. ``ACK`` and ``RETURNED`` (no
   consumer bound for that type) are done; ``NACK``/``TIMEOUT``/``LOST`` requeue that delivery
   after a backoff; it will be re-published with the same id and score.
7. Ack the deliveries that are done, in one call.
8. Failed events: a permanent error (``PermanentError``, e.g. a malformed model answer) is
   dead-lettered at once. A transient one is retried later without blocking the worker: the body
   is published to a TTL retry level (:mod:`gateway.bus.retry`) with the headers ``x-gw-attempts``,
   ``x-gw-last-error``, ``x-gw-first-failed-at`` and ``x-gw-retry-delay-ms``, and the delivery is
   acked once that publish is confirmed (unconfirmed: requeued, nothing lost; a crash in between
   leaves a duplicate, which step 3 makes harmless). The attempt number is the gateway's own
   count, ``max(x-gw-attempts, the process's own count) + 1`` (the broker's delivery count is only
   its crash-loop backstop, see :meth:`ScoringWorker._attempt`); at ``max_attempts``, or
   when the retry window is used up, the event is dead-lettered (a stored row with the attempts
   and the reason, and a reject without requeue).

Nothing is acked before its score is committed and its scored event confirmed, or before its
retry copy is confirmed.

Optional routes (:mod:`gateway.scoring.routing`, docs/scoring.md): with a **fallback** model, an
open breaker does not pause intake -- the batch is scored by the fallback, stored under its name
and published with the extension ``degraded=true`` (events the breaker refuses in a half-open
trial too); if the fallback raises, those events are handed back and intake pauses as without one.
With a **shadow** model, after the batch was acked, a deterministic sample of the events the
primary scored is scored by the shadow too and stored (never published); its failures are
logged and counted only.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from gateway.bus.protocols import PUBLISHED_AT_HEADER, Consumer, Delivery, Message, Outcome, Publisher
from gateway.bus.retry import RetrySchedule
from gateway.bus.topology import Topology
from gateway.errors import (
    CircuitOpenError,
    ContractError,
    PermanentError,
    StoreUnavailableError,
)
from gateway.events import Event, jsonable, utcnow
from gateway.events.jsonsafe import dumps
from gateway.events.scored import scored_event
from gateway.resilience.breaker import BreakerState, CircuitBreaker
from gateway.resilience.crashpoints import armed, crash_point
from gateway.metrics import ScoringMetrics
from gateway.scoring.protocols import Scorer, ScoreResult
from gateway.scoring.resilience import AttemptLedger, ScorerCrashLoop, TimedCaller, scorer_breaker_policy
from gateway.scoring.routing import SCORER_DEGRADED_EXTENSION, Shadow, in_sample
from gateway.store.repository import EventStore, ScoreRecord

__all__ = ["STAGE", "AttemptLedger", "ScoringWorker", "scorer_breaker_policy"]  # the last two re-exported

log = logging.getLogger(__name__)

STAGE = "scoring"  #: dead-letter stage of this worker
ATTEMPTS_HEADER = "x-gw-attempts"  #: gateway-counted scoring attempts so far (on retry copies)
LAST_ERROR_HEADER = "x-gw-last-error"  #: class and short message of the last failure
FIRST_FAILED_HEADER = "x-gw-first-failed-at"  #: ISO time of the first failure
DELAY_HEADER = "x-gw-retry-delay-ms"  #: retry delay scheduled so far (bounded by the window)
LATE_BY_HEADER = "x-gw-late-by-ms"  #: on a late event: how far past the deadline it was routed
PARKED_HEADER = "x-gw-parked"  #: times the event was parked while its model's breaker was open
_MIN_PARK_MS = 250.0  #: shortest park (a trial due at once must not spin events through the levels)
_DONE = frozenset({Outcome.ACK, Outcome.RETURNED})
# Managed by the broker: never copied onto a retry copy (a copied x-delivery-count would look
# like earlier deliveries of the fresh message).
_BROKER_HEADERS = frozenset({
    "x-delivery-count", "x-death", "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
    "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason",
})


class _StoreDown(Exception):
    """Internal: the store failed mid-batch; the batch must be requeued."""


class ScoringWorker:
    """Consumes the scoring queue, scores events and publishes scored events.

    Args:
        consumer: consumer of ``topology.scoring_queue`` (``pause``/``resume`` drive backpressure).
        publisher: publisher with confirms (scored exchange and retry exchange).
        store: the gateway store (scores and dead letters).
        scorer: the model.
        topology: exchange and queue names, including the retry levels.
        batch_max: largest micro-batch.
        batch_linger_ms: longest wait to fill a batch once it has a first delivery.
        max_attempts: scoring attempts before a transiently failing event is dead-lettered.
        publish_timeout: seconds to wait for the confirms of one batch.
        clock: returns aware UTC "now" (``scored_at``, scored-event time, first failure time).
        sleep: backoff sleep; defaults to waiting on the stop event while :meth:`run` runs.
        backoff_base: first backoff cap in seconds after a store or publish outage (full jitter,
            doubling per failed batch). Failed *events* never sleep: they go to a retry level.
        backoff_cap: largest backoff in seconds.
        rng: returns a float in [0, 1) for the jitter.
        retry: the delays between attempts (default :class:`RetrySchedule()`); the levels must be
            declared in ``topology`` (a longer delay is clipped to the longest declared level).
        breaker: the model's circuit breaker, shared by the workers of one model (default: a new
            ``scorer:<name>`` breaker with :func:`scorer_breaker_policy`).
        score_timeout: seconds one model call may take (``None``: no limit, called inline).
        prefetch: the consumer's configured prefetch, restored step by step after the breaker
            closed again.
        ledger: attempt bookkeeping shared by the workers of a process (default: this worker's).
        fallback: the model that scores while the breaker is open, instead of pausing intake
            (``None``: pause). Thread-safe, local and cheap: called without breaker or timeout.
        shadow: the shadow route (model, sample fraction, its breaker), or ``None``.

    Attributes:
        breaker: the model's circuit breaker (metrics and readiness read its snapshot).
        scored: events whose score was committed, published and acked.
        dead_lettered: deliveries dead-lettered (poison, permanent error or attempts used up).
        retried: failed events sent to a retry level (confirmed) and acked.
        handed_back: deliveries requeued untried because the breaker refused the call.
        pauses: times the consumer was paused because the breaker opened.
        redelivered: deliveries the broker reported as redelivered.
        requeued: deliveries rejected with requeue.
        batches: non-empty batches processed.
        scorer_failures, store_failures, publish_failures: failures seen, per kind.
        fallback_scored: events whose fallback score was committed (and handed on to be published).
        fallback_failures: fallback calls that raised (their events were handed back, intake paused).
        shadow_scored, shadow_failures, shadow_skipped: shadow scores stored; shadow calls or
            commits that failed; sampled events skipped because the shadow's breaker was open.
    """

    def __init__(
        self,
        consumer: Consumer,
        publisher: Publisher,
        store: EventStore,
        scorer: Scorer,
        topology: Topology,
        *,
        batch_max: int = 100,
        batch_linger_ms: float = 15.0,
        max_attempts: int = 3,
        publish_timeout: float = 30.0,
        clock: Callable[[], datetime] = utcnow,
        sleep: Callable[[float], Any] | None = None,
        backoff_base: float = 0.05,
        backoff_cap: float = 2.0,
        rng: Callable[[], float] = random.random,
        retry: RetrySchedule | None = None,
        breaker: CircuitBreaker | None = None,
        score_timeout: float | None = 30.0,
        prefetch: int = 1000,
        ledger: AttemptLedger | None = None,
        fallback: Scorer | None = None,
        shadow: Shadow | None = None,
        metrics: ScoringMetrics | None = None,
        late_after: float | None = None,
    ) -> None:
        if late_after is not None and (late_after <= 0 or not topology.late):
            raise ValueError("late_after must be > 0 and the topology must declare the late exchange (late=True)")
        if batch_max < 1 or max_attempts < 1 or publish_timeout <= 0 or prefetch < 1:
            raise ValueError("batch_max, max_attempts and prefetch must be >= 1 and publish_timeout > 0")
        self.consumer = consumer
        self.publisher = publisher
        self.store = store
        self.scorer = scorer
        self.topology = topology
        self.batch_max = batch_max
        self.batch_linger = batch_linger_ms / 1000.0
        self.max_attempts = max_attempts
        self.publish_timeout = publish_timeout
        self.retry = retry if retry is not None else RetrySchedule()
        self.breaker = breaker if breaker is not None else CircuitBreaker(
            f"scorer:{scorer.name}", scorer_breaker_policy()
        )
        self.prefetch = prefetch
        self._clock = clock
        self._sleep = sleep if sleep is not None else self._wait
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._rng = rng
        self._call = TimedCaller(score_timeout, f"scorer-call-{scorer.name}")
        self._ledger = ledger if ledger is not None else AttemptLedger()
        self.fallback = fallback
        self.shadow = shadow
        self.metrics = metrics
        self._shadow_call = (
            TimedCaller(score_timeout, f"shadow-call-{shadow.scorer.name}") if shadow is not None else None
        )
        self.late_after = late_after
        self._degraded = False  # the breaker is open: this batch goes to the fallback, or is parked
        self._parking = False  # ... parked in the retry levels (late routing on, no working fallback)
        self._fallback_down = False  # the fallback raised during this open period: pause as without one
        self._route: dict[str, Scorer] = {}  # event id -> model other than the primary, this batch
        self._stop: threading.Event | None = None
        self._streak = 0  # consecutive batches with an outage (drives the backoff)
        self._settled: set[int] = set()
        # Backpressure state (worker thread only).
        self._paused = False
        self._trial = False  # the breaker was half-open when the current batch was taken
        self._prefetch_now = prefetch  # the consumer's prefetch now (create it with ``prefetch``)
        self._batch_now = batch_max  # batch size now: smaller for a while after a half-open trial
        self._retry_after = 0.0
        missing = set(self.retry.level_ttls_ms(max_attempts)) - set(topology.retry_ttls_ms)
        if missing:
            log.warning(
                "retry levels %s ms are not declared in the topology %s (declared: %s); longer delays are "
                "clipped to the longest declared level", sorted(missing), topology.prefix, list(topology.retry_ttls_ms),
            )
        self.scored = 0
        self.dead_lettered = 0
        self.retried = 0
        self.handed_back = 0
        self.pauses = 0
        self.redelivered = 0
        self.requeued = 0
        self.batches = 0
        self.scorer_failures = 0
        self.store_failures = 0
        self.publish_failures = 0
        self.fallback_scored = 0
        self.fallback_failures = 0
        self.shadow_scored = 0
        self.shadow_failures = 0
        self.shadow_skipped = 0
        self.late = 0
        self.parked = 0

    # ------------------------------------------------------------------ loop
    def run(self, stop: threading.Event) -> None:
        """Process batches until ``stop`` is set; the batch in progress is finished first."""
        self._stop = stop
        try:
            while not stop.is_set():
                try:
                    started = time.monotonic()
                    if self.process_once(max_wait=0.25) == 0:
                        if self._paused:
                            # The breaker is open: wait for it to half-open (a stop cuts it short).
                            stop.wait(min(max(self._retry_after, 0.01), 1.0))
                        elif time.monotonic() - started < 0.01:
                            # An empty batch that came back at once means a closed or broken
                            # consumer: do not spin on it.
                            stop.wait(0.05)
                except Exception:  # a bug, not a message problem: keep serving, but slowly
                    log.exception("scoring batch failed unexpectedly; deliveries requeued")
                    self._backoff()
        finally:
            self._stop = None
            self.close()

    def close(self) -> None:
        """Release the model-call thread (:meth:`run` does it on the way out). Idempotent."""
        self._call.close()
        if self._shadow_call is not None:
            self._shadow_call.close()

    def process_once(self, max_wait: float) -> int:
        """Fetch and fully handle one micro-batch, unless the model's breaker is open.

        Args:
            max_wait: seconds to wait for a first delivery.

        Returns:
            The number of deliveries in the batch (0 when none arrived or the breaker is open).
        """
        limit = self._admit()
        if limit == 0:
            return 0
        batch = self.consumer.get_batch(limit, max_wait, self.batch_linger)
        if not batch:
            return 0
        self.batches += 1
        self.redelivered += sum(1 for d in batch if d.redelivered or d.delivery_count > 0)
        self._settled = set()
        self._route = {}
        failures = self.scorer_failures
        try:
            self._handle(batch)
        except _StoreDown:
            self.store_failures += 1
            self._backoff()
            self._requeue_unsettled(batch)
        except BaseException:
            self._requeue_unsettled(batch)  # never leave a delivery unsettled on the way out
            raise
        if not self._trial and not self._paused and self.scorer_failures == failures and self._batch_now < self.batch_max:
            self._batch_now = min(self.batch_max, self._batch_now * 2)  # gradual resume after a trial
        return len(batch)

    # ------------------------------------------------------------------ backpressure
    def _admit(self) -> int:
        """Pause, trial or resume intake as the breaker's state says; returns the batch size."""
        snap = self.breaker.snapshot()
        state = BreakerState(snap["state"])
        was_trial, self._trial = self._trial, state is BreakerState.HALF_OPEN
        was_degraded, self._degraded = self._degraded, False
        if state is not BreakerState.OPEN:
            self._fallback_down = False  # a new open period gives the fallback a new chance
        if state is BreakerState.OPEN:
            self._retry_after = float(snap["retry_after"])
            fallback_ok = self.fallback is not None and not self._fallback_down
            can_park = self.late_after is not None and bool(self.topology.retry_ttls_ms)
            if (fallback_ok or can_park) and not self._paused:
                # Degradation: keep taking deliveries, the fallback scores them (no event waits);
                # without a working fallback but with a deadline, park them until the trial or
                # their deadline, whichever comes first (late ones go to the late queue).
                self._degraded = True
                self._parking = not fallback_ok
                if not was_degraded:
                    if fallback_ok:
                        log.warning(
                            "model breaker %r open: scoring with the fallback model %r (trial in %.1f s)",
                            self.breaker.name, self.fallback.name, self._retry_after,  # type: ignore[union-attr]
                        )
                    else:
                        log.warning(
                            "model breaker %r open: events parked in the retry levels until the trial (in %.1f s) "
                            "or their deadline (late_after %g s)", self.breaker.name, self._retry_after, self.late_after,
                        )
                return min(self.batch_max, self._batch_now)
            if not self._paused:
                self.consumer.pause()
                self._paused = True
                self.pauses += 1
                log.warning(
                    "model breaker %r open: scoring intake paused, events wait in %s (trial in %.1f s)",
                    self.breaker.name, self.topology.scoring_queue, self._retry_after,
                )
            return 0
        if state is BreakerState.HALF_OPEN:
            permits = self.breaker.policy.half_open_permits
            if self._paused or self._prefetch_now != permits:
                log.info("model breaker %r half-open: trial batches of %d", self.breaker.name, permits)
                self._set_prefetch(permits)
            return min(self.batch_max, permits)
        if self._paused or was_trial:  # closed again (or reset by an operator while open)
            # One prefetch change back to the full one (on RabbitMQ each change restarts the
            # subscription, and the deliveries in flight then return with their count raised);
            # the gradual part is the batch size, doubled per good batch from twice the trial.
            self._set_prefetch(self.prefetch)
            self._batch_now = min(self.batch_max, self.breaker.policy.half_open_permits * 2)
        return min(self.batch_max, self._batch_now)

    def _set_prefetch(self, prefetch: int) -> None:
        if self._paused or prefetch != self._prefetch_now:
            was_paused = self._paused
            self.consumer.resume(prefetch)
            self._paused = False
            self._prefetch_now = prefetch
            if was_paused or prefetch == self.prefetch:
                log.info("scoring intake resumed with prefetch %d (full: %d)", prefetch, self.prefetch)

    # ------------------------------------------------------------------ one batch
    def _handle(self, batch: list[Delivery]) -> None:
        good: list[tuple[Delivery, Event]] = []
        for d in batch:
            try:
                good.append((d, Event.from_json(d.body)))
            except Exception as exc:  # ContractError, but also UnicodeDecodeError and friends
                self._dead_letter(d, None, exc, f"unparseable event: {exc}", attempts=d.delivery_count + 1)
        if not good:
            self._streak = 0
            return

        # Events whose score is committed: republish that score, do not score (learn) again. Every
        # event is looked up, not only redeliveries: a relay that crashed between the broker's
        # confirm and marking its rows published sends them again as *first* deliveries.
        committed = self._committed_scores([ev.id for _, ev in good])
        done: list[tuple[Delivery, Event, ScoreResult]] = []
        todo: list[tuple[Delivery, Event]] = []
        first_scored_at: dict[str, datetime] = {}
        for d, ev in good:
            hit = committed.get(ev.id)
            if hit is not None:
                done.append((d, ev, ScoreResult(hit.score, hit.explanation)))
                first_scored_at[ev.id] = hit.scored_at  # the republished event is identical
            else:
                todo.append((d, ev))

        if self.late_after is not None and todo:
            todo = self._divert_late(todo)
        fresh, failed, untried = self._score_isolating_suspects(todo)
        now = self._clock()
        if fresh:
            records = [
                ScoreRecord(
                    event_id=ev.id,
                    model_name=self._model_of(ev.id).name,
                    model_version=self._model_of(ev.id).version,
                    score=res.score,
                    explanation=res.explanation,
                    event_type=ev.type,
                    source_name=ev.source_name or ev.source,
                    event_time=ev.time,
                    scored_at=now,
                )
                for _, ev, res in fresh
            ]
            try:
                new = self.store.save_scores(records)
            except StoreUnavailableError as exc:
                log.warning("score commit failed, requeueing %d deliveries: %s", len(batch), exc)
                for d, ev, _ in failed:  # these were tried: the requeue must not hide the attempt
                    key = self._key(d, ev)
                    self._ledger.set_attempts(key, self._attempt(d, key))
                raise _StoreDown from exc
            if new < len(records):
                # Another worker committed some of these first (a duplicate in flight at the same
                # time): publish the committed score, so every copy of a scored event is identical.
                stored = self._committed_scores([ev.id for _, ev, _ in fresh])
                fresh = [
                    (d, ev, ScoreResult(hit.score, hit.explanation)) if (hit := stored.get(ev.id)) else (d, ev, res)
                    for d, ev, res in fresh
                ]
                first_scored_at.update({k: v.scored_at for k, v in stored.items()})
            self.fallback_scored += sum(1 for _, ev, _ in fresh if ev.id in self._route)
            if self.metrics is not None:
                self.metrics.outcome("fallback", sum(1 for _, ev, _ in fresh if ev.id in self._route))
        ready = done + fresh
        clean = self._publish_and_ack(ready, now, first_scored_at)
        if untried:
            if self._parking:
                clean = self._park(untried) and clean
            else:
                self._hand_back(untried)
        if failed:
            clean = self._retry_or_dead_letter(failed, now) and clean
        if clean:
            self._streak = 0
        if self.shadow is not None and fresh:  # last: every delivery of the batch is settled already
            self._score_shadow([ev for _, ev, _ in fresh if ev.id not in self._route], now)

    def _score_isolating_suspects(
        self, todo: list[tuple[Delivery, Event]]
    ) -> tuple[list[tuple[Delivery, Event, ScoreResult]], list[tuple[Delivery, Event, Exception]], list[tuple[Delivery, Event]]]:
        """:meth:`_score`, with the crash-loop guard for redelivered events (REL-07).

        A redelivered event may be the one a dead scorer process died on. Before redelivered
        events are scored, one more *started* attempt is committed for each
        (:mod:`gateway.store.attempts`), and removed once the model answered -- so a record that
        survives means a process died while scoring that event. Events with such a record are
        scored one at a time per process (the isolation lock), each alone in its model call, so a
        poison event can no longer take the events batched with it down; one whose scoring was
        started ``max_attempts`` times without finishing is dead-lettered without another try.
        First deliveries (the common case) cost nothing extra.
        """
        suspects = {ev.id for d, ev in todo if d.redelivered or d.delivery_count > 0}
        if not suspects:
            return self._score(todo)
        try:
            crashed_before = self.store.scoring_attempts(sorted(suspects))
        except StoreUnavailableError as exc:
            log.warning("reading scoring attempts failed: %s", exc)
            raise _StoreDown from exc
        fresh: list[tuple[Delivery, Event, ScoreResult]] = []
        failed: list[tuple[Delivery, Event, Exception]] = []
        untried: list[tuple[Delivery, Event]] = []

        def add(result: tuple[list[Any], list[Any], list[Any]]) -> None:
            fresh.extend(result[0])
            failed.extend(result[1])
            untried.extend(result[2])

        batch = [(d, ev) for d, ev in todo if ev.id not in crashed_before]
        if batch:
            marked = [ev.id for _, ev in batch if ev.id in suspects]
            self._begin_attempts(marked)
            add(self._score(batch))
            self._end_attempts(marked)
        for d, ev in todo:
            if ev.id not in crashed_before:
                continue
            with self._ledger.isolation:
                n = self._begin_attempts([ev.id]).get(ev.id, 0)
                if n >= self.max_attempts:
                    self._dead_letter(
                        d, ev, ScorerCrashLoop(f"scoring event {ev.id} was started {n} times and never finished"),
                        f"scoring was started {n} times without finishing: the scorer process died each time "
                        f"(a model that crashes on this event); not scored again",
                        attempts=n,
                    )
                else:
                    add(self._score([(d, ev)]))
                self._end_attempts([ev.id])
        return fresh, failed, untried

    def _begin_attempts(self, event_ids: list[str]) -> dict[str, int]:
        if not event_ids:
            return {}
        try:
            return self.store.begin_scoring_attempts(event_ids)
        except StoreUnavailableError as exc:
            log.warning("recording scoring attempts failed: %s", exc)
            raise _StoreDown from exc

    def _end_attempts(self, event_ids: list[str]) -> None:
        if not event_ids:
            return
        try:
            self.store.end_scoring_attempts(event_ids)
        except StoreUnavailableError as exc:  # at worst one attempt too many is counted later
            log.warning("clearing scoring attempts failed: %s", exc)

    def _score(
        self, items: list[tuple[Delivery, Event]]
    ) -> tuple[
        list[tuple[Delivery, Event, ScoreResult]], list[tuple[Delivery, Event, Exception]], list[tuple[Delivery, Event]]
    ]:
        """Score ``items``: (scored, failed, untried because the breaker refused).

        A failing batch is re-scored one by one so a single bad event is isolated; a half-open
        trial batch is scored one by one from the start (each event is one trial call).
        """
        if not items:
            return [], [], []
        if armed("scoring.before_score"):  # chaos tests only: a model that kills its process (REL-07)
            crash_point("scoring.before_score", [ev.id for _, ev in items])
        if self._degraded:
            if BreakerState(self.breaker.snapshot()["state"]) is BreakerState.OPEN:
                return self._refused([], [], items)
            # The breaker half-opened or was reset while this batch was being taken: the model
            # gets it (through the breaker, as usual), not the fallback.
            self._degraded = False
        if not self._trial or len(items) == 1:
            try:
                results = self._call_model([ev for _, ev in items])
                return [(d, ev, r) for (d, ev), r in zip(items, results)], [], []
            except CircuitOpenError:
                return self._refused([], [], items)
            except Exception as exc:
                if len(items) == 1:
                    return [], [(items[0][0], items[0][1], exc)], []
                log.warning("scorer failed on a batch of %d (%s); scoring one by one", len(items), exc)
        ok: list[tuple[Delivery, Event, ScoreResult]] = []
        bad: list[tuple[Delivery, Event, Exception]] = []
        for i, (d, ev) in enumerate(items):
            try:
                ok.append((d, ev, self._call_model([ev])[0]))
            except CircuitOpenError:
                return self._refused(ok, bad, items[i:])
            except Exception as exc:
                bad.append((d, ev, exc))
        return ok, bad, []

    def _refused(
        self,
        ok: list[tuple[Delivery, Event, ScoreResult]],
        bad: list[tuple[Delivery, Event, Exception]],
        rest: Sequence[tuple[Delivery, Event]],
    ) -> tuple[
        list[tuple[Delivery, Event, ScoreResult]], list[tuple[Delivery, Event, Exception]], list[tuple[Delivery, Event]]
    ]:
        """Events the breaker kept from the primary: scored by the fallback, else untried (handed back)."""
        if self.fallback is None or self._fallback_down or not rest:
            return ok, bad, list(rest)
        try:
            started = time.monotonic()
            results = self._checked(self.fallback.score_batch([ev for _, ev in rest]), len(rest))
            self._observe(self.fallback.name, len(rest), started, results)
        except Exception as exc:  # the fallback fails too: hand back and pause, as without one
            self.fallback_failures += 1
            self._fallback_down = True
            log.warning("fallback model %r failed on %d events (%s: %s); handing them back, intake pauses",
                        self.fallback.name, len(rest), type(exc).__name__, exc)
            return ok, bad, list(rest)
        for _, ev in rest:
            self._route[ev.id] = self.fallback
        return ok + [(d, ev, r) for (d, ev), r in zip(rest, results)], bad, []

    def _call_model(self, events: list[Event]) -> list[ScoreResult]:
        """One model call as ``Breaker(Timeout(call))``; the answer is validated inside."""
        started = time.monotonic()
        with self.breaker.calling():
            results = self._checked(self._call(self.scorer.score_batch, events), len(events))
        self._observe(self.scorer.name, len(events), started, results)
        return results

    def _observe(self, model: str, size: int, started: float, results: Sequence[ScoreResult]) -> None:
        if self.metrics is not None:
            self.metrics.model_call(model, size, time.monotonic() - started, [r.score for r in results])

    @staticmethod
    def _checked(results: Sequence[ScoreResult], expected: int) -> list[ScoreResult]:
        """Validate a scorer's answer; a malformed answer is a permanent error (ContractError)."""
        if len(results) != expected:
            raise ContractError(f"scorer returned {len(results)} results for {expected} events")
        out = []
        for r in results:
            score = float(r.score)
            if not (math.isfinite(score) and 0.0 <= score <= 1.0):
                raise ContractError(f"scorer returned score {r.score!r}, expected a number in [0, 1]")
            if r.explanation is not None:
                if not isinstance(r.explanation, dict):
                    raise ContractError("scorer explanation must be a dict or None")
                dumps(r.explanation)  # must be JSON-safe: it is stored and published
            out.append(ScoreResult(score, r.explanation))
        return out

    def _publish_and_ack(
        self, ready: list[tuple[Delivery, Event, ScoreResult]], now: datetime, scored_at: dict[str, datetime]
    ) -> bool:
        """Publish scored events, ack the confirmed ones, requeue the rest; True if all were done."""
        if not ready:
            return True
        messages = []
        for d, ev, res in ready:
            model = self._model_of(ev.id)
            se = scored_event(
                ev,
                score=res.score,
                model_name=model.name,
                model_version=model.version,
                explanation=res.explanation,
                scored_at=scored_at.get(ev.id, now),
                original_json=d.body,
            )
            if model is not self.scorer:  # the fallback's score: say so (docs/scoring.md, Degradation)
                se = dataclasses.replace(se, extensions={**se.extensions, SCORER_DEGRADED_EXTENSION: True})
            messages.append(Message(body=se.to_json(), routing_key=ev.type, message_id=se.id))
        outcomes = self._confirmed(self.topology.scored_exchange, messages, "scored events")
        acked = [(d, ev) for (d, ev, _), o in zip(ready, outcomes) if o in _DONE]
        failed = [(d, ev, o) for (d, ev, _), o in zip(ready, outcomes) if o not in _DONE]
        if acked:
            if armed("scoring.after_commit_before_ack"):  # chaos tests only (REL-06)
                crash_point("scoring.after_commit_before_ack", [ev.id for _, ev in acked])
            self.consumer.ack([d for d, _ in acked])
            self._settled.update(id(d) for d, _ in acked)
            self.scored += len(acked)
            if self.metrics is not None:
                self.metrics.outcome("scored", len(acked))
            for d, ev in acked:
                self._ledger.forget(self._key(d, ev))
        if failed:
            self.publish_failures += 1
            log.warning(
                "%d scored events not confirmed (%s); requeueing them",
                len(failed), sorted({o.value for _, _, o in failed}),
            )
            self._backoff()
            for d, ev, _ in failed:
                self._requeue_untried(d, ev)
            return False
        return True

    def _confirmed(self, exchange: str, messages: list[Message], what: str) -> list[Outcome]:
        """Publish and wait for one outcome per message (anything but a confirm is not ``ACK``)."""
        try:
            outcomes = list(self.publisher.publish(exchange, messages).result(self.publish_timeout))
        except concurrent.futures.TimeoutError:
            outcomes = [Outcome.TIMEOUT] * len(messages)
        except Exception as exc:  # a publisher that breaks is a lost connection to us
            log.warning("publishing %s failed: %s", what, exc)
            outcomes = [Outcome.LOST] * len(messages)
        return outcomes + [Outcome.LOST] * (len(messages) - len(outcomes))

    # ------------------------------------------------------------------ failures
    def _retry_or_dead_letter(self, failed: list[tuple[Delivery, Event, Exception]], now: datetime) -> bool:
        """Dead-letter permanent failures and used-up events; send the rest to a retry level."""
        self.scorer_failures += 1
        retries: list[tuple[Delivery, Event, int, Message]] = []
        for d, ev, exc in failed:
            key = self._key(d, ev)
            attempt = self._attempt(d, key)
            error = f"{type(exc).__name__}: {str(exc)[:200]}"
            if isinstance(exc, PermanentError):
                reason = f"permanent scoring error on attempt {attempt}: {error}"
            elif attempt >= self.max_attempts:
                reason = f"scoring failed {attempt} times: {error}"
            else:
                spent_ms = _int_header(d.headers, DELAY_HEADER)
                delay = self.retry.delay(attempt, spent_ms / 1000.0, self._rng)
                level = self.topology.retry_level(math.ceil(delay * 1000)) if delay is not None else None
                if delay is not None and level is not None:
                    retries.append((d, ev, attempt, self._retry_message(d, ev, attempt, error, now, spent_ms,
                                                                       delay, level)))
                    continue
                if delay is None:
                    reason = (f"retry window of {self.retry.window:g} s used up after {attempt} attempts "
                              f"({spent_ms / 1000:g} s of delays): {error}")
                else:  # no retry level declared: retry at once, counted, as before delayed retries
                    self._ledger.set_attempts(key, attempt)
                    self._reject(d, requeue=True)
                    continue
            try:
                self._dead_letter(d, ev, exc, reason, attempts=attempt)
                self._ledger.forget(key)
            except _StoreDown:
                self._ledger.set_attempts(key, attempt)  # the attempt happened: keep it counted
                self._reject(d, requeue=True)  # try again later rather than lose the record
        return self._publish_retries(retries) if retries else True

    def _retry_message(
        self, d: Delivery, ev: Event, attempt: int, error: str, now: datetime, spent_ms: int, delay: float,
        level: tuple[str, int],
    ) -> Message:
        """The copy of ``d`` for a retry level: the original body, the gateway's retry headers."""
        queue_name, ttl_ms = level
        expiration = min(ttl_ms, max(1, math.ceil(delay * 1000)))
        headers = {k: v for k, v in d.headers.items() if k not in _BROKER_HEADERS}
        headers[ATTEMPTS_HEADER] = attempt
        headers[LAST_ERROR_HEADER] = error
        headers[FIRST_FAILED_HEADER] = str(d.headers.get(FIRST_FAILED_HEADER) or now.isoformat())
        headers[DELAY_HEADER] = spent_ms + expiration
        return Message(
            body=d.body, routing_key=queue_name, message_id=d.message_id or ev.id, headers=headers,
            content_type=d.content_type or "application/cloudevents+json", expiration_ms=expiration,
        )

    def _publish_retries(self, retries: list[tuple[Delivery, Event, int, Message]]) -> bool:
        """Publish-then-ack the retry copies; unconfirmed ones requeue their delivery (nothing lost)."""
        attempts = {id(d): attempt for d, _, attempt, _ in retries}
        done, rest = self._copy_then_ack(
            self.topology.retry_exchange, [(d, ev, m) for d, ev, _, m in retries], "retried"
        )
        for d, ev in done:
            self._ledger.forget(self._key(d, ev))  # the copy carries the count (x-gw-attempts)
        self.retried += len(done)
        acked = {id(d) for d, _ in done}
        for d, ev, attempt, m in retries:
            if id(d) in acked:
                log.info("event %s failed attempt %d; retry in %d ms", ev.id, attempt, m.expiration_ms or 0)
        for d, ev in rest:
            self._ledger.set_attempts(self._key(d, ev), attempts[id(d)])
            self._reject(d, requeue=True)
        return not rest

    def _copy_then_ack(
        self, exchange: str, items: list[tuple[Delivery, Event, Message]], outcome: str
    ) -> tuple[list[tuple[Delivery, Event]], list[tuple[Delivery, Event]]]:
        """Publish a copy of each delivery to ``exchange``; ack the deliveries whose copy the broker
        confirmed (counted as ``outcome``). Returns (acked, unconfirmed); the caller requeues the
        unconfirmed ones (nothing lost: a copy that did arrive is a harmless duplicate)."""
        outcomes = self._confirmed(exchange, [m for *_, m in items], f"{outcome} events")
        done = [(d, ev) for (d, ev, _), o in zip(items, outcomes) if o is Outcome.ACK]
        rest = [(d, ev) for (d, ev, _), o in zip(items, outcomes) if o is not Outcome.ACK]
        if done:
            self.consumer.ack([d for d, _ in done])
            self._settled.update(id(d) for d, _ in done)
            if self.metrics is not None:
                self.metrics.outcome(outcome, len(done))
        if rest:
            self.publish_failures += 1
            log.warning("%d %s copies not confirmed by %s (%s); requeued instead", len(rest), outcome, exchange,
                        sorted({o.value for o in outcomes if o is not Outcome.ACK}))
            self._backoff()
        return done, rest

    # ------------------------------------------------------------------ deadline (scoring.late_after)
    def _age_ms(self, d: Delivery, now_ms: float) -> float:
        """Milliseconds since the relay published ``d`` (``-inf`` without the relay's stamp)."""
        stamp = _int_header(d.headers, PUBLISHED_AT_HEADER)
        return now_ms - stamp if stamp > 0 else -math.inf

    def _divert_late(self, todo: list[tuple[Delivery, Event]]) -> list[tuple[Delivery, Event]]:
        """Route events past the deadline to the late exchange (confirmed, then acked); the rest back.

        An unconfirmed late copy requeues its delivery (nothing lost; a duplicate in the late queue
        carries the same message id).
        """
        assert self.late_after is not None
        now_ms = self._clock().timestamp() * 1000.0
        limit = self.late_after * 1000.0
        late = [(d, ev, age) for d, ev in todo if (age := self._age_ms(d, now_ms)) > limit]
        if not late:
            return todo
        messages = []
        for d, ev, age in late:
            headers = {k: v for k, v in d.headers.items() if k not in _BROKER_HEADERS}
            headers[LATE_BY_HEADER] = int(age - limit)
            messages.append(Message(body=d.body, routing_key=ev.type, message_id=d.message_id or ev.id,
                                    headers=headers, content_type=d.content_type or "application/cloudevents+json"))
        done, rest = self._copy_then_ack(
            self.topology.late_exchange, [(d, ev, m) for (d, ev, _), m in zip(late, messages)], "late"
        )
        self.late += len(done)
        for d, ev in done:
            self._ledger.forget(self._key(d, ev))
        if done:
            log.info("%d events past the %g s deadline routed to %s", len(done), self.late_after,
                     self.topology.late_exchange)
        for d, ev in rest:
            self._requeue_untried(d, ev)
        gone = {id(d) for d, _, _ in late}
        return [(d, ev) for d, ev in todo if id(d) not in gone]

    def _park(self, untried: list[tuple[Delivery, Event]]) -> bool:
        """While the breaker is open and no fallback scores: park each event in a retry level until
        the breaker's trial or its deadline, whichever is first. Not an attempt (``x-gw-attempts``
        and the retry window stay as they are); confirmed copies are acked, the rest requeued."""
        assert self.late_after is not None
        now_ms = self._clock().timestamp() * 1000.0
        trial_ms = max(self._retry_after, 0.0) * 1000.0
        parked: list[tuple[Delivery, Event, Message]] = []
        for d, ev in untried:
            until_late = self.late_after * 1000.0 - self._age_ms(d, now_ms)  # +inf without a stamp
            delay_ms = math.ceil(max(_MIN_PARK_MS, min(trial_ms, until_late + 1.0)))
            level = self.topology.retry_level(delay_ms)
            if level is None:  # no retry level declared (max_attempts 1): hand it back instead
                self._requeue_untried(d, ev)
                continue
            queue_name, ttl_ms = level
            headers = {k: v for k, v in d.headers.items() if k not in _BROKER_HEADERS}
            headers[PARKED_HEADER] = _int_header(d.headers, PARKED_HEADER) + 1
            parked.append((d, ev, Message(
                body=d.body, routing_key=queue_name, message_id=d.message_id or ev.id, headers=headers,
                content_type=d.content_type or "application/cloudevents+json", expiration_ms=min(ttl_ms, delay_ms),
            )))
        if not parked:
            return True
        done, rest = self._copy_then_ack(self.topology.retry_exchange, parked, "parked")
        self.parked += len(done)
        for d, ev in rest:
            self._requeue_untried(d, ev)
        return not rest

    def _hand_back(self, untried: list[tuple[Delivery, Event]]) -> None:
        """Requeue deliveries the breaker kept from the model: not an attempt."""
        log.info("model breaker %r refused %d events; handed back untried", self.breaker.name, len(untried))
        for d, ev in untried:
            self._requeue_untried(d, ev)
        self.handed_back += len(untried)

    def _attempt(self, d: Delivery, key: str) -> int:
        """This attempt's number: the gateway's own count (the retry copy's header or this
        process's ledger), plus one.

        The broker's ``x-delivery-count`` is deliberately not used: RabbitMQ 3.x raises it on every
        return -- a consumer pause, a hand-back while the breaker is open, a requeue after a store
        outage, every unacked message of a crashed process -- none of which is a failed attempt
        of that event, and 4.3 stops counting nacks. It stays the broker's own backstop against
        crash loops (``x-delivery-limit``, REL-07).
        """
        return max(_int_header(d.headers, ATTEMPTS_HEADER), self._ledger.attempts(key)) + 1

    # ------------------------------------------------------------------ helpers
    def _dead_letter(
        self, d: Delivery, ev: Event | None, exc: BaseException, reason: str, *, attempts: int
    ) -> None:
        """Store a dead-letter row, then reject without requeue (the broker's DLX gets it too)."""
        try:
            self.store.add_dead_letter(
                stage=STAGE,
                error_class=type(exc).__name__,
                reason=reason,
                payload=d.body.decode("utf-8", errors="replace"),
                event_id=ev.id if ev is not None else (d.message_id or None),
                source_name=ev.source_name if ev is not None else None,
                headers=_json_safe_headers(d.headers),
                attempts=attempts,
            )
        except StoreUnavailableError as store_exc:
            log.warning("dead-letter row not stored: %s", store_exc)
            raise _StoreDown from store_exc
        log.warning("dead-lettered delivery %s: %s", d.message_id or "<no id>", reason)
        self._reject(d, requeue=False)
        self.dead_lettered += 1
        if self.metrics is not None:
            self.metrics.outcome("dead_lettered")

    def _committed_scores(self, event_ids: list[str]) -> dict[str, ScoreRecord]:
        """Scores of this model version already committed for ``event_ids``.

        With a fallback, the ids the primary has no score for are looked up under the fallback
        too (a second query), so a redelivery of a degraded event republishes that score.
        """
        try:
            found = self.store.get_scores(event_ids, self.scorer.name, self.scorer.version)
            for event_id in found:
                self._route.pop(event_id, None)
            missing = [i for i in event_ids if i not in found]
            if self.fallback is not None and missing:
                extra = self.store.get_scores(missing, self.fallback.name, self.fallback.version)
                for event_id in extra:
                    self._route[event_id] = self.fallback
                found = {**found, **extra}
            return found
        except StoreUnavailableError as exc:
            log.warning("reading committed scores failed: %s", exc)
            raise _StoreDown from exc

    def _model_of(self, event_id: str) -> Scorer:
        """The model whose score ``event_id`` has in this batch (the primary unless routed)."""
        return self._route.get(event_id, self.scorer)

    def _score_shadow(self, events: list[Event], now: datetime) -> None:
        """Score the sampled ``events`` with the shadow model and store them; never raises."""
        sh = self.shadow
        if sh is None or self._shadow_call is None:
            return
        sample = [ev for ev in events if in_sample(ev.id, sh.fraction)]
        if not sample:
            return
        try:
            with sh.breaker.calling():
                results = self._checked(self._shadow_call(sh.scorer.score_batch, sample), len(sample))
            records = [
                ScoreRecord(
                    event_id=ev.id, model_name=sh.scorer.name, model_version=sh.scorer.version, score=r.score,
                    explanation=r.explanation, event_type=ev.type, source_name=ev.source_name or ev.source,
                    event_time=ev.time, scored_at=now,
                )
                for ev, r in zip(sample, results)
            ]
            self.store.save_scores(records)
        except CircuitOpenError:
            self.shadow_skipped += len(sample)
        except Exception as exc:  # the shadow never affects the primary path
            self.shadow_failures += 1
            log.warning("shadow model %r failed on %d events (%s: %s); not stored",
                        sh.scorer.name, len(sample), type(exc).__name__, exc)
        else:
            self.shadow_scored += len(records)
            if self.metrics is not None:
                self.metrics.outcome("shadow", len(records))

    def _reject(self, d: Delivery, *, requeue: bool) -> None:
        self.consumer.reject(d, requeue=requeue)
        self._settled.add(id(d))
        if requeue:
            self.requeued += 1

    def _requeue_untried(self, d: Delivery, ev: Event | None) -> None:
        """Requeue without a failed attempt (the gateway's count ignores the broker's)."""
        self._reject(d, requeue=True)

    def _requeue_unsettled(self, batch: list[Delivery]) -> None:
        for d in batch:
            if id(d) not in self._settled:
                try:
                    self._requeue_untried(d, None)
                except Exception:  # the consumer is gone: the broker requeues unacked anyway
                    log.exception("could not requeue a delivery")

    @staticmethod
    def _key(d: Delivery, ev: Event) -> str:
        return d.message_id or ev.id

    def _backoff(self) -> None:
        """Full-jitter exponential backoff after a store or publish outage."""
        self._streak += 1
        cap = min(self._backoff_cap, self._backoff_base * 2 ** min(self._streak - 1, 30))
        self._sleep(self._rng() * cap)

    def _wait(self, seconds: float) -> None:
        stop = self._stop
        if stop is not None:
            stop.wait(seconds)  # a stop request cuts the backoff short
        else:
            time.sleep(seconds)


def _int_header(headers: Any, name: str) -> int:
    """A non-negative integer header (0 when absent or malformed)."""
    value = headers.get(name) if headers else None
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(0, value)
    if isinstance(value, (str, bytes)) and value.strip().isdigit():
        return int(value)
    return 0


def _json_safe_headers(headers: Any) -> dict[str, Any] | None:
    """AMQP headers as JSON-safe data (pika may hand over bytes, Decimals or datetimes)."""
    if not headers:
        return None
    out: dict[str, Any] = {}
    for k, v in dict(headers).items():
        try:
            out[str(k)] = jsonable(v)
        except TypeError:
            out[str(k)] = repr(v)
    return out
