"""Scoring routes besides the primary model: the fallback (degradation) and the shadow model.

- **Fallback** (``scoring.fallback``): scores while the primary model's breaker is open, so intake
  is not paused; local and cheap (a ``rules`` model), called without breaker or timeout.
- **Shadow** (``scoring.shadow``): scores a deterministic sample of the events the primary scored,
  stored as score rows of its own model name, never published (see
  :mod:`gateway.store.shadow` for the comparison report).

See docs/scoring.md, "Degradation to a fallback model" and "Shadow scoring".
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from gateway.config import ScoringSettings
from gateway.resilience.breaker import CircuitBreaker
from gateway.scoring.protocols import LockedScorer, Scorer
from gateway.scoring.resilience import scorer_breaker_policy

__all__ = ["SCORER_DEGRADED_EXTENSION", "Shadow", "build_fallback", "build_shadow", "in_sample", "sample_point"]

SCORER_DEGRADED_EXTENSION = "degraded"  #: CloudEvent extension (``true``) of a scored event the fallback scored

_SCALE = float(2**64)


def sample_point(event_id: str) -> float:
    """The event's fixed point in [0, 1): the first 8 bytes of the BLAKE2b of its id.

    The same on every process and machine (Python's salted ``hash()`` is not used), so a
    redelivery or another worker makes the same sampling decision.
    """
    digest = hashlib.blake2b(event_id.encode("utf-8"), digest_size=8, person=b"gw-shadow").digest()
    return int.from_bytes(digest, "big") / _SCALE


def in_sample(event_id: str, fraction: float) -> bool:
    """True when ``event_id`` belongs to the sample of size ``fraction`` (0 none, 1 every event)."""
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    return sample_point(event_id) < fraction


@dataclass
class Shadow:
    """The shadow route of a worker.

    Attributes:
        scorer: the shadow model.
        fraction: share of events it scores (by :func:`in_sample`).
        breaker: ``shadow:<name>``; while open the sample is skipped (a failing shadow must not
            cost the primary path a timeout per batch).
    """

    scorer: Scorer
    fraction: float
    breaker: CircuitBreaker = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError("shadow fraction must be in [0, 1]")
        if self.breaker is None:
            self.breaker = CircuitBreaker(f"shadow:{self.scorer.name}", scorer_breaker_policy())


def build_fallback(settings: ScoringSettings) -> Scorer | None:
    """The fallback model of ``scoring.fallback`` (thread-safe), or None when none is configured.

    Raises:
        ConfigurationError: the name is neither a configured model nor a kind, or its options are invalid.
    """
    if settings.fallback is None:
        return None
    from gateway.scoring.registry import build_scorer

    return LockedScorer(build_scorer(settings.fallback, settings, where="scoring.fallback"))


def build_shadow(settings: ScoringSettings, breaker: CircuitBreaker | None = None) -> Shadow | None:
    """The shadow route of ``scoring.shadow``, or None when none is configured (or its fraction is 0).

    Raises:
        ConfigurationError: as :func:`build_fallback`, for ``scoring.shadow.model``.
    """
    sh = settings.shadow
    if sh is None or sh.fraction <= 0.0:
        return None
    from gateway.scoring.registry import build_scorer

    scorer = LockedScorer(build_scorer(sh.model, settings, where="scoring.shadow.model"))
    return Shadow(scorer, sh.fraction, breaker)  # type: ignore[arg-type]
