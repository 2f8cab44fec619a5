"""Scoring: the scorer interface, the built-in online anomaly model and the scoring worker."""

from __future__ import annotations

from collections.abc import Callable

from gateway.config import ScoringSettings
from gateway.errors import ConfigurationError
from gateway.scoring.online import OnlineAnomalyScorer
from gateway.scoring.protocols import LockedScorer, Scorer, ScoreResult
from gateway.scoring.worker import ScoringWorker

__all__ = [
    "LockedScorer",
    "OnlineAnomalyScorer",
    "ScoreResult",
    "Scorer",
    "ScoringWorker",
    "known_scorers",
    "scorer_from_settings",
]


def _online(settings: ScoringSettings) -> Scorer:
    return OnlineAnomalyScorer(warmup=settings.warmup, exclude_fields=settings.exclude_fields)


_BUILT_IN: dict[str, Callable[[ScoringSettings], Scorer]] = {"online-anomaly": _online}


def known_scorers() -> list[str]:
    """Names accepted by :func:`scorer_from_settings`."""
    return sorted(_BUILT_IN)


def scorer_from_settings(settings: ScoringSettings) -> Scorer:
    """The scorer named by ``settings.model``.

    Raises:
        ConfigurationError: the name is unknown; the message lists the known ones.
    """
    factory = _BUILT_IN.get(settings.model)
    if factory is None:
        raise ConfigurationError(
            f"scoring.model: unknown scorer {settings.model!r} (known: {', '.join(known_scorers())})"
        )
    return factory(settings)
