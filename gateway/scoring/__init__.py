"""Scoring: the scorer interface, the scorer registry, the built-in models and the scoring worker.

Scorer kinds are ``gateway.scorers`` entry points (built-in: ``online-anomaly``, ``rules``); see
:mod:`gateway.scoring.registry` and docs/scoring.md, Models.
"""

from __future__ import annotations

from gateway.config import ScoringSettings
from gateway.scoring.online import OnlineAnomalyScorer
from gateway.scoring.protocols import LockedScorer, Scorer, ScoreResult
from gateway.scoring.registry import (
    SCORER_GROUP,
    ScorerFactory,
    build_scorer,
    known_scorers,
    parse_options,
)
from gateway.scoring.worker import ScoringWorker

__all__ = [
    "SCORER_GROUP",
    "LockedScorer",
    "OnlineAnomalyScorer",
    "ScoreResult",
    "Scorer",
    "ScorerFactory",
    "ScoringWorker",
    "build_scorer",
    "known_scorers",
    "parse_options",
    "scorer_from_settings",
]


def scorer_from_settings(settings: ScoringSettings) -> Scorer:
    """The scorer named by ``settings.model``, built through the registry.

    ``settings.model`` is a name in ``settings.models`` or, if it is not there, a scorer kind used
    with empty options (``online-anomaly`` by default).

    Raises:
        ConfigurationError: unknown name or kind (the message lists the configured models and the
            installed kinds), a plugin that fails to import, or invalid options.
    """
    return build_scorer(settings.model, settings, where="scoring.model")
