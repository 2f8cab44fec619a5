"""The scorer interface the scoring worker depends on.

A scorer turns a batch of events into one :class:`ScoreResult` per event, in order. Scores are
floats in [0, 1] where higher means "more unusual"; a threshold should mean roughly the same for
every event type (see the built-in model's docstring for how it achieves that).
"""

from __future__ import annotations

from collections.abc import Sequence
import threading
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from gateway.events import Event

__all__ = ["ScoreResult", "Scorer", "LockedScorer"]


@dataclass(frozen=True, slots=True)
class ScoreResult:
    """A model's verdict on one event.

    Attributes:
        score: anomaly score in [0, 1]; higher is more unusual.
        explanation: JSON-safe per-feature contributions, or ``None`` when the model has none.
    """

    score: float
    explanation: dict[str, Any] | None = None


@runtime_checkable
class Scorer(Protocol):
    """Scores events in micro-batches.

    Attributes:
        name: model name, stored with every score and carried in scored events.
        version: model version; (event id, name, version) identifies a score.
    """

    name: str
    version: str

    def score_batch(self, events: Sequence[Event]) -> list[ScoreResult]:
        """Score ``events``; returns exactly one result per event, in the same order.

        Raising means the whole batch failed (the worker treats it as transient and retries).
        """
        ...


class LockedScorer:
    """Serialises ``score_batch`` so several workers can share one stateful model.

    The built-in model learns from every batch; two workers scoring through one instance must not
    interleave inside it. The lock is held only while the model runs, never while a worker waits
    for the store or the broker, which is what lets workers overlap those waits.
    """

    def __init__(self, inner: Scorer) -> None:
        self.inner = inner
        self.name = inner.name
        self.version = inner.version
        self._lock = threading.Lock()

    def score_batch(self, events: Sequence[Event]) -> list[ScoreResult]:
        """Score under the lock."""
        with self._lock:
            return self.inner.score_batch(events)
