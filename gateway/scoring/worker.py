"""The scoring worker: consume events in micro-batches, score, commit, publish, then ack.

One micro-batch goes through these steps, in this order (REL-06, REL-07):

1. ``get_batch`` -- bounded in size (``batch_max``) and time (``batch_linger_ms``).
2. Parse every delivery with :meth:`Event.from_json`. A body that does not parse is poison: a dead
   letter row is stored (stage ``scoring``) and the delivery is rejected without requeue, so the
   broker's DLX has it too.
3. Redelivered events whose score is already committed reuse that score: they are not scored (nor
   learned) twice, and the republished scored event is identical to the first.
4. Score the rest. A scorer failure is transient: the delivery is requeued after a backoff, and
   once it has been attempted ``max_attempts`` times (broker's ``x-delivery-count`` and the
   worker's own count, whichever is higher) it is dead-lettered instead. A failing batch is
   re-scored event by event, so one bad event does not hold back the others.
5. ``store.save_scores`` -- idempotent on (event, model, version). If the store fails, the whole
   batch is requeued and nothing is acked.
6. Publish the scored events to the scored exchange (routing key = the original type, message id
   = the deterministic scored-event id) and wait for the confirms. ``ACK`` and ``RETURNED`` (no
   consumer bound for that type) are done; ``NACK``/``TIMEOUT``/``LOST`` requeue that delivery,
   which will be re-published with the same id and score.
7. Ack the deliveries that are done, in one call.

Nothing is acked before its score is committed and its scored event confirmed.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from gateway.bus.protocols import Consumer, Delivery, Message, Outcome, Publisher
from gateway.bus.topology import Topology
from gateway.errors import ContractError, StoreUnavailableError
from gateway.events import Event, jsonable, utcnow
from gateway.events.jsonsafe import dumps
from gateway.events.scored import scored_event
from gateway.resilience.crashpoints import armed, crash_point
from gateway.scoring.protocols import Scorer, ScoreResult
from gateway.store.repository import EventStore, ScoreRecord

__all__ = ["STAGE", "ScoringWorker"]

log = logging.getLogger(__name__)

STAGE = "scoring"  #: dead-letter stage of this worker
_DONE = frozenset({Outcome.ACK, Outcome.RETURNED})
_MAX_TRACKED_FAILURES = 10_000


class _StoreDown(Exception):
    """Internal: the store failed mid-batch; the batch must be requeued."""


class ScoringWorker:
    """Consumes the scoring queue, scores events and publishes scored events.

    Args:
        consumer: consumer of ``topology.scoring_queue``.
        publisher: publisher with confirms (for the scored exchange).
        store: the gateway store (scores and dead letters).
        scorer: the model.
        topology: exchange and queue names.
        batch_max: largest micro-batch.
        batch_linger_ms: longest wait to fill a batch once it has a first delivery.
        max_attempts: scoring attempts before a failing event is dead-lettered.
        publish_timeout: seconds to wait for the confirms of one batch.
        clock: returns aware UTC "now" (``scored_at``, scored-event time).
        sleep: backoff sleep; defaults to waiting on the stop event while :meth:`run` runs.
        backoff_base: first backoff cap in seconds (full jitter, doubling per failed batch).
        backoff_cap: largest backoff in seconds.
        rng: returns a float in [0, 1) for the jitter.

    Attributes:
        scored: events whose score was committed, published and acked.
        dead_lettered: deliveries dead-lettered (poison or too many failed attempts).
        redelivered: deliveries the broker reported as redelivered.
        requeued: deliveries rejected with requeue.
        batches: non-empty batches processed.
        scorer_failures, store_failures, publish_failures: failures seen, per kind.
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
    ) -> None:
        if batch_max < 1 or max_attempts < 1 or publish_timeout <= 0:
            raise ValueError("batch_max and max_attempts must be >= 1 and publish_timeout > 0")
        self.consumer = consumer
        self.publisher = publisher
        self.store = store
        self.scorer = scorer
        self.topology = topology
        self.batch_max = batch_max
        self.batch_linger = batch_linger_ms / 1000.0
        self.max_attempts = max_attempts
        self.publish_timeout = publish_timeout
        self._clock = clock
        self._sleep = sleep if sleep is not None else self._wait
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._rng = rng
        self._stop: threading.Event | None = None
        self._streak = 0  # consecutive batches with a transient failure (drives the backoff)
        # Gateway-side attempt counts: brokers from RabbitMQ 4.3 no longer count nacks, so the
        # delivery count alone cannot bound retries (REL-07). Bounded so it cannot grow forever.
        self._attempts: OrderedDict[str, int] = OrderedDict()
        self._settled: set[int] = set()
        self.scored = 0
        self.dead_lettered = 0
        self.redelivered = 0
        self.requeued = 0
        self.batches = 0
        self.scorer_failures = 0
        self.store_failures = 0
        self.publish_failures = 0

    # ------------------------------------------------------------------ loop
    def run(self, stop: threading.Event) -> None:
        """Process batches until ``stop`` is set; the batch in progress is finished first."""
        self._stop = stop
        try:
            while not stop.is_set():
                try:
                    started = time.monotonic()
                    if self.process_once(max_wait=0.25) == 0 and time.monotonic() - started < 0.01:
                        # An empty batch that came back at once means a closed or broken
                        # consumer: do not spin on it.
                        stop.wait(0.05)
                except Exception:  # a bug, not a message problem: keep serving, but slowly
                    log.exception("scoring batch failed unexpectedly; deliveries requeued")
                    self._backoff()
        finally:
            self._stop = None

    def process_once(self, max_wait: float) -> int:
        """Fetch and fully handle one micro-batch.

        Args:
            max_wait: seconds to wait for a first delivery.

        Returns:
            The number of deliveries in the batch (0 when none arrived).
        """
        batch = self.consumer.get_batch(self.batch_max, max_wait, self.batch_linger)
        if not batch:
            return 0
        self.batches += 1
        self.redelivered += sum(1 for d in batch if d.redelivered or d.delivery_count > 0)
        self._settled = set()
        try:
            self._handle(batch)
        except _StoreDown:
            self.store_failures += 1
            self._backoff()
            self._requeue_unsettled(batch)
        except BaseException:
            self._requeue_unsettled(batch)  # never leave a delivery unsettled on the way out
            raise
        return len(batch)

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

        # Redeliveries whose score is committed: republish that score, do not score (learn) again.
        again = [ev.id for d, ev in good if d.redelivered or d.delivery_count > 0]
        committed = self._committed_scores(again) if again else {}
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

        fresh, failed = self._score(todo)
        now = self._clock()
        if fresh:
            records = [
                ScoreRecord(
                    event_id=ev.id,
                    model_name=self.scorer.name,
                    model_version=self.scorer.version,
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
                self.store.save_scores(records)
            except StoreUnavailableError as exc:
                log.warning("score commit failed, requeueing %d deliveries: %s", len(batch), exc)
                raise _StoreDown from exc
        ready = done + fresh
        clean = self._publish_and_ack(ready, now, first_scored_at)
        if failed:
            self._retry_or_dead_letter(failed)
        if clean and not failed:
            self._streak = 0

    def _score(
        self, items: list[tuple[Delivery, Event]]
    ) -> tuple[list[tuple[Delivery, Event, ScoreResult]], list[tuple[Delivery, Event, BaseException]]]:
        """Score ``items``; on failure retry one by one so a single bad event is isolated."""
        if not items:
            return [], []
        if armed("scoring.before_score"):  # chaos tests only: a model that kills its process (REL-07)
            crash_point("scoring.before_score", [ev.id for _, ev in items])
        try:
            results = self._checked(self.scorer.score_batch([ev for _, ev in items]), len(items))
            return [(d, ev, r) for (d, ev), r in zip(items, results)], []
        except Exception as exc:
            if len(items) == 1:
                return [], [(items[0][0], items[0][1], exc)]
            log.warning("scorer failed on a batch of %d (%s); scoring one by one", len(items), exc)
        ok: list[tuple[Delivery, Event, ScoreResult]] = []
        bad: list[tuple[Delivery, Event, BaseException]] = []
        for d, ev in items:
            try:
                ok.append((d, ev, self._checked(self.scorer.score_batch([ev]), 1)[0]))
            except Exception as exc:
                bad.append((d, ev, exc))
        return ok, bad

    @staticmethod
    def _checked(results: Sequence[ScoreResult], expected: int) -> list[ScoreResult]:
        """Validate a scorer's answer; a malformed answer counts as a scorer failure."""
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
            se = scored_event(
                ev,
                score=res.score,
                model_name=self.scorer.name,
                model_version=self.scorer.version,
                explanation=res.explanation,
                scored_at=scored_at.get(ev.id, now),
                original_json=d.body,
            )
            messages.append(Message(body=se.to_json(), routing_key=ev.type, message_id=se.id))
        try:
            outcomes = list(self.publisher.publish(self.topology.scored_exchange, messages).result(self.publish_timeout))
        except concurrent.futures.TimeoutError:
            outcomes = [Outcome.TIMEOUT] * len(messages)
        except Exception as exc:  # a publisher that breaks is a lost connection to us
            log.warning("publishing scored events failed: %s", exc)
            outcomes = [Outcome.LOST] * len(messages)
        outcomes += [Outcome.LOST] * (len(messages) - len(outcomes))
        acked = [(d, ev) for (d, ev, _), o in zip(ready, outcomes) if o in _DONE]
        failed = [(d, o) for (d, _, _), o in zip(ready, outcomes) if o not in _DONE]
        if acked:
            if armed("scoring.after_commit_before_ack"):  # chaos tests only (REL-06)
                crash_point("scoring.after_commit_before_ack", [ev.id for _, ev in acked])
            self.consumer.ack([d for d, _ in acked])
            self._settled.update(id(d) for d, _ in acked)
            self.scored += len(acked)
            if self._attempts:
                for d, ev in acked:
                    self._attempts.pop(self._key(d, ev), None)
        if failed:
            self.publish_failures += 1
            log.warning(
                "%d scored events not confirmed (%s); requeueing them",
                len(failed), sorted({o.value for _, o in failed}),
            )
            self._backoff()
            for d, _ in failed:
                self._reject(d, requeue=True)
            return False
        return True

    def _retry_or_dead_letter(self, failed: list[tuple[Delivery, Event, BaseException]]) -> None:
        self.scorer_failures += 1
        self._backoff()  # before the requeue, so a broken scorer is not hammered
        for d, ev, exc in failed:
            key = self._key(d, ev)
            attempt = max(d.delivery_count, self._attempts.get(key, 0)) + 1
            if attempt >= self.max_attempts:
                self._attempts.pop(key, None)
                try:
                    self._dead_letter(
                        d, ev, exc, f"scoring failed {attempt} times: {type(exc).__name__}: {exc}", attempts=attempt
                    )
                except _StoreDown:
                    self._reject(d, requeue=True)  # try again later rather than lose the record
                continue
            self._attempts[key] = attempt
            self._attempts.move_to_end(key)
            while len(self._attempts) > _MAX_TRACKED_FAILURES:
                self._attempts.popitem(last=False)
            self._reject(d, requeue=True)

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

    def _committed_scores(self, event_ids: list[str]) -> dict[str, ScoreRecord]:
        """Scores of this model version already committed for ``event_ids``."""
        try:
            return self.store.get_scores(event_ids, self.scorer.name, self.scorer.version)
        except StoreUnavailableError as exc:
            log.warning("reading committed scores failed: %s", exc)
            raise _StoreDown from exc


    def _reject(self, d: Delivery, *, requeue: bool) -> None:
        self.consumer.reject(d, requeue=requeue)
        self._settled.add(id(d))
        if requeue:
            self.requeued += 1

    def _requeue_unsettled(self, batch: list[Delivery]) -> None:
        for d in batch:
            if id(d) not in self._settled:
                try:
                    self._reject(d, requeue=True)
                except Exception:  # the consumer is gone: the broker requeues unacked anyway
                    log.exception("could not requeue a delivery")

    @staticmethod
    def _key(d: Delivery, ev: Event) -> str:
        return d.message_id or ev.id

    def _backoff(self) -> None:
        """Full-jitter exponential backoff after a transient failure."""
        self._streak += 1
        cap = min(self._backoff_cap, self._backoff_base * 2 ** min(self._streak - 1, 30))
        self._sleep(self._rng() * cap)

    def _wait(self, seconds: float) -> None:
        stop = self._stop
        if stop is not None:
            stop.wait(seconds)  # a stop request cuts the backoff short
        else:
            time.sleep(seconds)


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
