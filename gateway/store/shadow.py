"""The shadow comparison report: a primary and a shadow model on the events both scored.

Shadow scores are ordinary rows of ``scores`` under the shadow model's name (no table of their
own), so the report joins ``scores`` with itself on ``event_id``. It is computed in one SQL
aggregate query (portable: SQLite and PostgreSQL), whatever the number of scores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import Engine, and_, case, func, select

from gateway.store._sql import guard
from gateway.store.schema import scores

__all__ = ["BINS", "ShadowComparison", "ShadowRepository"]

BINS = 10  #: histogram bins over [0, 1]; bin i is [i/10, (i+1)/10), the last one includes 1.0


@dataclass(frozen=True)
class ShadowComparison:
    """Two models compared on the events both scored.

    Attributes:
        primary, shadow: the model names (and versions, when filtered).
        threshold: the decision threshold of ``agreement``.
        count: scored pairs (events with a score of both; one per version pair).
        agreement: share of pairs on the same side of the threshold (both >= t, or both < t);
            None when ``count`` is 0.
        mean_abs_diff: mean of ``|primary - shadow|``; None when ``count`` is 0.
        primary_histogram, shadow_histogram: pairs per score bin (:data:`BINS` bins over [0, 1]).
    """

    primary: str
    shadow: str
    threshold: float
    count: int
    agreement: float | None
    mean_abs_diff: float | None
    primary_histogram: list[int] = field(default_factory=list)
    shadow_histogram: list[int] = field(default_factory=list)
    primary_version: str | None = None
    shadow_version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the REST answer, ``gateway scoring compare --json``)."""
        return asdict(self)


def _bin(col: Any, i: int) -> Any:
    lo, hi = i / BINS, (i + 1) / BINS
    cond = col >= lo if i == BINS - 1 else and_(col >= lo, col < hi)
    if i == 0:
        cond = col < hi  # below 0 cannot be stored, but never lose a row
    return func.sum(case((cond, 1), else_=0))


class ShadowRepository:
    """Shadow comparison methods of :class:`~gateway.store.EventStore` (mixed in)."""

    engine: Engine

    def score_versions(self) -> list[dict[str, Any]]:
        """Per (model name, version): how many scores the store holds and the newest ``scored_at``."""
        query = (
            select(scores.c.model_name, scores.c.model_version, func.count().label("n"),
                   func.max(scores.c.scored_at).label("last"))
            .group_by(scores.c.model_name, scores.c.model_version)
            .order_by(scores.c.model_name, scores.c.model_version)
        )
        with guard("score_versions"), self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            {"model": r.model_name, "version": r.model_version, "scores": int(r.n),
             "last_scored_at": r.last.isoformat() if r.last is not None else None}
            for r in rows
        ]

    def compare_scores(
        self,
        primary: str,
        shadow: str,
        *,
        threshold: float = 0.5,
        primary_version: str | None = None,
        shadow_version: str | None = None,
    ) -> ShadowComparison:
        """Compare the scores of ``primary`` and ``shadow`` on the events both scored.

        Args:
            primary: the primary model's name.
            shadow: the shadow model's name.
            threshold: decision threshold for the agreement (default 0.5).
            primary_version, shadow_version: only these versions (default: every version).

        Returns:
            The comparison (count 0 when no event was scored by both).
        """
        if not 0.0 <= threshold <= 1.0:
            raise ValueError("threshold must be in [0, 1]")
        p, s = scores.alias("p"), scores.alias("s")
        cond = [p.c.model_name == primary, s.c.model_name == shadow]
        if primary_version is not None:
            cond.append(p.c.model_version == primary_version)
        if shadow_version is not None:
            cond.append(s.c.model_version == shadow_version)
        agree = case(
            (and_(p.c.score >= threshold, s.c.score >= threshold), 1),
            (and_(p.c.score < threshold, s.c.score < threshold), 1),
            else_=0,
        )
        cols = [
            func.count().label("n"),
            func.sum(agree).label("agree"),
            func.avg(func.abs(p.c.score - s.c.score)).label("mad"),
            *[_bin(p.c.score, i).label(f"p{i}") for i in range(BINS)],
            *[_bin(s.c.score, i).label(f"s{i}") for i in range(BINS)],
        ]
        query = select(*cols).select_from(p.join(s, p.c.event_id == s.c.event_id)).where(and_(*cond))
        with guard("compare_scores"), self.engine.connect() as conn:
            row = conn.execute(query).one()
        n = int(row.n or 0)
        return ShadowComparison(
            primary=primary,
            shadow=shadow,
            threshold=threshold,
            count=n,
            agreement=(int(row.agree or 0) / n) if n else None,
            mean_abs_diff=float(row.mad) if n and row.mad is not None else None,
            primary_histogram=[int(getattr(row, f"p{i}") or 0) for i in range(BINS)],
            shadow_histogram=[int(getattr(row, f"s{i}") or 0) for i in range(BINS)],
            primary_version=primary_version,
            shadow_version=shadow_version,
        )
