"""The scorer's resilience helpers: the breaker policy, the call timeout and attempt bookkeeping.

Model calls are wrapped ``Retry(Breaker(Timeout(call)))`` (docs/design reliability rules): the
timeout is :class:`TimedCaller`, the breaker a :class:`~gateway.resilience.CircuitBreaker` with
:func:`scorer_breaker_policy`, and the retry is the worker's delayed retry through TTL queues,
counted in an :class:`AttemptLedger` and in the ``x-gw-attempts`` header.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from gateway.errors import PermanentError
from gateway.resilience.breaker import BreakerPolicy

__all__ = ["AttemptLedger", "ScorerCrashLoop", "TimedCaller", "scorer_breaker_policy"]

_MAX_TRACKED = 10_000


class ScorerCrashLoop(PermanentError):
    """Scoring an event was started ``max_attempts`` times and never finished: the scorer process
    died each time (a model that crashes on this input). Dead-lettered without another try."""


def _model_failure(exc: BaseException) -> bool:
    """Breaker classifier: every model exception but a permanent one (a bad input or answer)."""
    return not isinstance(exc, PermanentError)


def scorer_breaker_policy(policy: BreakerPolicy | None = None) -> BreakerPolicy:
    """``policy`` (default :class:`BreakerPolicy()`) counting every non-permanent model error as a failure.

    A model is not a remote service whose exceptions are either transport errors or business
    answers: a ``RuntimeError`` inside it means it is broken, so unlike the default policy it
    counts. ``PermanentError`` (bad input, malformed answer) still counts as an answer.
    """
    return dataclasses.replace(policy if policy is not None else BreakerPolicy(), record=_model_failure)


class AttemptLedger:
    """The gateway's own attempt bookkeeping, shared by the workers of one process. Thread-safe.

    ``attempts`` -- failed scoring attempts per message of this process, for failures that are
    requeued rather than sent to a retry level (the retry copy carries its count in the
    ``x-gw-attempts`` header). The broker's delivery count is not used (see
    ``ScoringWorker._attempt``). Bounded: least recently used entries are dropped.
    """

    def __init__(self, limit: int = _MAX_TRACKED) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._attempts: OrderedDict[str, int] = OrderedDict()
        #: Held while a redelivered event is scored: one such event at a time per process, so a
        #: model that kills the process on one input takes no other event's attempt with it.
        self.isolation = threading.Lock()

    def attempts(self, key: str) -> int:
        """Failed attempts recorded for ``key``."""
        with self._lock:
            return self._attempts.get(key, 0)

    def set_attempts(self, key: str, attempts: int) -> None:
        """Record ``attempts`` failed attempts for ``key``."""
        with self._lock:
            self._put(self._attempts, key, attempts)

    def forget(self, key: str) -> None:
        """Drop ``key`` (its delivery was acked: scored, retried or dead-lettered)."""
        with self._lock:
            self._attempts.pop(key, None)

    def _put(self, table: OrderedDict[str, int], key: str, value: int) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self._limit:
            table.popitem(last=False)


class TimedCaller:
    """Runs model calls on one daemon thread so the worker stops waiting after ``timeout`` s.

    A synchronous call cannot be abandoned safely, so a call that timed out keeps running on its
    thread (its result is dropped); calls queued behind it that time out too are cancelled before
    they start. One thread per worker bounds the threads a hung model can hold.
    """

    def __init__(self, timeout: float | None, name: str) -> None:
        self._timeout = timeout
        self._name = name
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._timeout is None or not math.isfinite(self._timeout):
            return fn(*args)
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
            self._thread.start()
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._calls.put((fn, args, fut))
        try:
            return fut.result(self._timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"model call took longer than {self._timeout:g} s") from None

    def close(self) -> None:
        """Let the thread end once the call it runs (if any) returns."""
        if self._thread is not None:
            self._calls.put(None)
            self._thread = None

    def _serve(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            fn, args, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # handed to the waiting worker
                fut.set_exception(exc)
