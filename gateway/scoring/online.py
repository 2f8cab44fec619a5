"""The built-in online anomaly model (``online-anomaly``): no training data, learns from the stream.

State is kept per event type, so what is normal for one type says nothing about another.
Features come from ``event.data`` automatically (see :mod:`gateway.scoring.features`).

The maths, per event with active features j = 1..k:

* **Numeric** feature x (model space ``y = sign(x)·log(1+|x|)``, which makes amounts and other
  positive heavy-tailed values near-Gaussian): ``z = (y − μ) / sqrt(σ² + τ²)`` with running mean μ
  and variance σ² (Welford, merged per batch with Chan's formula), a small floor
  ``τ = 0.01·(1 + |μ|)`` so constant fields do not give infinite z, and a two-sided tail
  probability ``p = erfc(|z| / √2)``. Robustness: values are winsorised to ``μ ± 4σ`` before they
  are learned, so an anomaly barely moves the estimate; drift: the effective count is capped at
  ``horizon``, which turns the running estimate into an exponentially weighted one (weight of the
  past ≈ ``exp(−t/horizon)``).
* **Categorical** feature v with (decayed) counts c_u over N observations: the unseen-value mass is
  Good–Turing's ``m_new = n₁ + ½`` (n₁ = categories seen about once), ``p(u) = c_u / (N + m_new)``,
  and the tail probability is the mass of everything at most as frequent as v:
  ``p = Σ_{u: p(u) ≤ p(v)} p(u)`` (an unseen value has ``p(v) = m_new / (N + m_new)``).
  Fields with more than ``max_categories`` distinct values are dropped (free text, keys).
* **Combination**: Bonferroni over the k features, ``p_event = min(1, k · min_j p_j)``, and
  ``score = 1 − p_event``. Under the model, ``P(score ≥ 1 − α) ≤ α`` for a normal event whatever its
  type or number of fields, so a threshold of 0.99 means "about 1 % false alarms or fewer" for
  every type.

Warm-up: the first ``warmup`` events of a type (and features seen fewer than ``warmup`` times) are
learned but not scored; they get score 0.0 with ``{"warmup": true}``. Every batch is scored with
the state from *before* the batch and learned afterwards, so an anomaly cannot mask itself.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.events import Event
from gateway.scoring.features import Features, extract_features
from gateway.scoring.protocols import ScoreResult

__all__ = ["OnlineAnomalyScorer"]

_ERFC = np.frompyfunc(math.erfc, 1, 1)
_SQRT2 = math.sqrt(2.0)
_P_FLOOR = 1e-300  # keeps -log10(p) finite (and JSON-safe) when erfc underflows
_STATE_FORMAT = 1


@dataclass(slots=True)
class _Numeric:
    """Running mean/variance of one numeric feature in model space."""

    n: float = 0.0  # effective count (capped at the horizon)
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations, Welford style
    seen: int = 0  # true number of observations (for warm-up)

    def sd(self) -> float:
        var = self.m2 / self.n if self.n > 0 else 0.0
        tau = 0.01 * (1.0 + abs(self.mean))
        return math.sqrt(var + tau * tau)


@dataclass(slots=True)
class _Categorical:
    """Decayed value counts of one categorical feature."""

    counts: dict[str, float] = field(default_factory=dict)
    total: float = 0.0
    seen: int = 0
    dropped: bool = False  # too many distinct values: not a bounded category


@dataclass(slots=True)
class _TypeState:
    seen: int = 0
    numeric: dict[str, _Numeric] = field(default_factory=dict)
    categorical: dict[str, _Categorical] = field(default_factory=dict)


class OnlineAnomalyScorer:
    """Online, per-type anomaly scorer that needs no training data.

    Args:
        warmup: events of a type (and observations of a feature) learned before it is scored.
        exclude_fields: data keys or dotted paths never used as features.
        horizon: effective memory in events; older data is forgotten exponentially (drift).
        max_categories: distinct values above which a categorical field is dropped.
        max_features: features tracked per type (bounds memory on arbitrary payloads).
        top_k: features listed in each explanation.
        clip_z: winsorisation bound (in standard deviations) of learned numeric values.

    Thread-safe: one lock guards the state (the worker calls it from one thread anyway).
    """

    name = "online-anomaly"
    version = "1"

    def __init__(
        self,
        *,
        warmup: int = 30,
        exclude_fields: Collection[str] = ("id",),
        horizon: int = 10_000,
        max_categories: int = 50,
        max_features: int = 100,
        top_k: int = 3,
        clip_z: float = 4.0,
    ) -> None:
        if warmup < 1 or horizon < 1 or max_categories < 1 or max_features < 1 or top_k < 1:
            raise ValueError("warmup, horizon, max_categories, max_features and top_k must be >= 1")
        self.warmup = warmup
        self.exclude_fields = frozenset(exclude_fields)
        self.horizon = float(horizon)
        self.max_categories = max_categories
        self.max_features = max_features
        self.top_k = top_k
        self.clip_z = clip_z
        self._types: dict[str, _TypeState] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ public API
    def score_batch(self, events: Sequence[Event]) -> list[ScoreResult]:
        """Score ``events`` (state from before the batch), then learn from them.

        Returns:
            One result per event, in order.
        """
        results: list[ScoreResult | None] = [None] * len(events)
        by_type: dict[str, list[int]] = {}
        for i, ev in enumerate(events):
            by_type.setdefault(ev.type, []).append(i)
        with self._lock:
            for etype, idx in by_type.items():
                state = self._types.get(etype)
                if state is None:
                    state = self._types[etype] = _TypeState()
                feats = [extract_features(events[i].data, self.exclude_fields) for i in idx]
                # Warm-up events are learned one chunk at a time, so the events after the warm-up
                # boundary in the same batch are scored against what came before them.
                n_warm = max(0, min(len(idx), self.warmup - state.seen))
                if n_warm:
                    self._learn(state, feats[:n_warm])
                    for j in range(n_warm):
                        results[idx[j]] = ScoreResult(0.0, {"warmup": True, "seen": state.seen - n_warm + j})
                if n_warm < len(idx):
                    rest = feats[n_warm:]
                    for j, res in enumerate(self._score(state, rest)):
                        results[idx[n_warm + j]] = res
                    self._learn(state, rest)
        return [r for r in results if r is not None]

    def state_dict(self) -> dict[str, Any]:
        """The learned state and settings as JSON-safe data (for checkpoints)."""
        with self._lock:
            types = {
                etype: {
                    "seen": st.seen,
                    "numeric": {k: [v.n, v.mean, v.m2, v.seen] for k, v in st.numeric.items()},
                    "categorical": {
                        k: {"counts": dict(v.counts), "total": v.total, "seen": v.seen, "dropped": v.dropped}
                        for k, v in st.categorical.items()
                    },
                }
                for etype, st in self._types.items()
            }
        return {
            "format": _STATE_FORMAT,
            "model": {"name": self.name, "version": self.version},
            "config": {
                "warmup": self.warmup,
                "exclude_fields": sorted(self.exclude_fields),
                "horizon": self.horizon,
                "max_categories": self.max_categories,
                "max_features": self.max_features,
                "top_k": self.top_k,
                "clip_z": self.clip_z,
            },
            "types": types,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the learned state written by :meth:`state_dict` (settings stay as constructed).

        Raises:
            ValueError: the state is for another model, version or format.
        """
        model = state.get("model", {})
        if state.get("format") != _STATE_FORMAT or model.get("name") != self.name or model.get("version") != self.version:
            raise ValueError(
                f"state is for {model.get('name')!r} v{model.get('version')!r} format {state.get('format')!r}; "
                f"expected {self.name!r} v{self.version!r} format {_STATE_FORMAT}"
            )
        types: dict[str, _TypeState] = {}
        for etype, st in state["types"].items():
            ts = _TypeState(seen=int(st["seen"]))
            for k, (n, mean, m2, seen) in st["numeric"].items():
                ts.numeric[k] = _Numeric(float(n), float(mean), float(m2), int(seen))
            for k, c in st["categorical"].items():
                ts.categorical[k] = _Categorical(
                    {str(v): float(x) for v, x in c["counts"].items()}, float(c["total"]), int(c["seen"]), bool(c["dropped"])
                )
            types[etype] = ts
        with self._lock:
            self._types = types

    # ------------------------------------------------------------------ scoring
    def _score(self, state: _TypeState, feats: list[Features]) -> list[ScoreResult]:
        n = len(feats)
        # Columns: one per active feature present in the batch; P holds tail probabilities
        # (NaN = feature absent for that event), Z the numeric z-scores for explanations.
        columns: list[tuple[str, str]] = []
        p_cols: list[np.ndarray] = []
        z_cols: list[np.ndarray | None] = []
        for name in _union(f.numeric for f in feats):
            st = state.numeric.get(name)
            if st is None or st.seen < self.warmup:
                continue
            rows, ys = _column(feats, name, numeric=True)
            p = np.full(n, np.nan)
            z = np.full(n, np.nan)
            zz = (np.asarray(ys, dtype=float) - st.mean) / st.sd()
            z[rows] = zz
            p[rows] = _tail_p(zz)
            columns.append(("numeric", name))
            p_cols.append(p)
            z_cols.append(z)
        for name in _union(f.categorical for f in feats):
            cs = state.categorical.get(name)
            if cs is None or cs.dropped or cs.seen < self.warmup:
                continue
            rows, values = _column(feats, name, numeric=False)
            p = np.full(n, np.nan)
            p[rows] = _categorical_tail_p(cs, values)
            columns.append(("categorical", name))
            p_cols.append(p)
            z_cols.append(None)
        if not columns:
            return [ScoreResult(0.0, {"p_value": 1.0, "features": [], "note": "no usable features"})] * n

        P = np.column_stack(p_cols)  # (events, features)
        present = ~np.isnan(P)
        k = present.sum(axis=1)
        P_filled = np.where(present, np.clip(P, _P_FLOOR, 1.0), 2.0)  # absent sorts last
        p_min = P_filled.min(axis=1)
        p_event = np.where(k > 0, np.minimum(1.0, k * p_min), 1.0)
        scores = 1.0 - p_event
        order = np.argsort(P_filled, axis=1, kind="stable")[:, : self.top_k].tolist()
        Z = np.column_stack([zc if zc is not None else np.full(n, np.nan) for zc in z_cols])
        # Round whole matrices at once and hand Python lists to the per-event loop: indexing numpy
        # scalars one by one costs more than the maths.
        p_show = _sig4(P_filled).tolist()
        s_show = _sig4(np.maximum(0.0, -np.log10(P_filled))).tolist()
        z_show = _sig4(Z).tolist()
        pe_show = _sig4(p_event).tolist()
        present_l = present.tolist()
        k_l = k.tolist()
        scores_l = scores.tolist()

        out: list[ScoreResult] = []
        for i in range(n):
            contrib = []
            row_present, row_p, row_s, row_z = present_l[i], p_show[i], s_show[i], z_show[i]
            for c in order[i]:
                if not row_present[c]:
                    break
                kind, name = columns[c]
                item: dict[str, Any] = {
                    "feature": name,
                    "kind": kind,
                    "value": (feats[i].numeric if kind == "numeric" else feats[i].categorical)[name][1],
                    "p": row_p[c],
                    "surprise": row_s[c],
                }
                if kind == "numeric":
                    item["z"] = row_z[c]
                contrib.append(item)
            out.append(
                ScoreResult(scores_l[i], {"p_value": pe_show[i], "features_used": k_l[i], "features": contrib})
            )
        return out

    # ------------------------------------------------------------------ learning
    def _learn(self, state: _TypeState, feats: list[Features]) -> None:
        state.seen += len(feats)
        for name in _union(f.numeric for f in feats):
            st = state.numeric.get(name)
            if st is None:
                if len(state.numeric) + len(state.categorical) >= self.max_features:
                    continue
                st = state.numeric[name] = _Numeric()
            _, ys = _column(feats, name, numeric=True)
            y = np.asarray(ys, dtype=float)
            if st.seen >= self.warmup:
                # Winsorise so that an outlier moves the estimate only as much as a 4-sigma value.
                sd = st.sd()
                y = np.clip(y, st.mean - self.clip_z * sd, st.mean + self.clip_z * sd)
            self._merge_numeric(st, y)
        for name in _union(f.categorical for f in feats):
            cs = state.categorical.get(name)
            if cs is None:
                if len(state.numeric) + len(state.categorical) >= self.max_features:
                    continue
                cs = state.categorical[name] = _Categorical()
            if cs.dropped:
                continue
            _, values = _column(feats, name, numeric=False)
            self._merge_categorical(cs, values)

    def _merge_numeric(self, st: _Numeric, y: np.ndarray) -> None:
        """Chan et al.'s parallel merge of the batch's (count, mean, M2), then the horizon cap."""
        m = float(y.size)
        mean_b = float(y.mean())
        m2_b = float(((y - mean_b) ** 2).sum())
        total = st.n + m
        delta = mean_b - st.mean
        st.mean += delta * m / total
        st.m2 += m2_b + delta * delta * st.n * m / total
        st.n = total
        st.seen += int(m)
        if st.n > self.horizon:
            # Scaling n and M2 together keeps the variance and shrinks the past's weight.
            st.m2 *= self.horizon / st.n
            st.n = self.horizon

    def _merge_categorical(self, cs: _Categorical, values: list[str]) -> None:
        counts = cs.counts
        for v in values:
            counts[v] = counts.get(v, 0.0) + 1.0
        cs.total += len(values)
        cs.seen += len(values)
        if len(counts) > self.max_categories:
            # Unbounded cardinality (names, free text): no frequency model makes sense.
            cs.dropped = True
            cs.counts = {}
            cs.total = 0.0
            return
        if cs.total > self.horizon:
            f = self.horizon / cs.total
            cs.counts = {v: c * f for v, c in counts.items() if c * f >= 1e-3}
            cs.total = self.horizon


def _union(dicts: Any) -> list[str]:
    """Keys of several dicts, first-seen order (deterministic column order)."""
    seen: dict[str, None] = {}
    for d in dicts:
        for k in d:
            seen[k] = None
    return list(seen)


def _column(feats: list[Features], name: str, *, numeric: bool) -> tuple[list[int], list[Any]]:
    rows: list[int] = []
    vals: list[Any] = []
    for i, f in enumerate(feats):
        item = (f.numeric if numeric else f.categorical).get(name)
        if item is not None:
            rows.append(i)
            vals.append(item[0])
    return rows, vals


def _tail_p(z: np.ndarray) -> np.ndarray:
    """Two-sided Gaussian tail probability ``erfc(|z|/√2)``."""
    return _ERFC(np.abs(z) / _SQRT2).astype(float)


def _categorical_tail_p(cs: _Categorical, values: list[str]) -> np.ndarray:
    """Mass of all categories (including "unseen") at most as frequent as each value."""
    masses = np.fromiter(cs.counts.values(), dtype=float, count=len(cs.counts))
    m_new = float((masses <= 1.0).sum()) + 0.5  # Good-Turing unseen mass, smoothed
    total = cs.total + m_new
    ordered = np.sort(np.append(masses, m_new))
    cum = np.cumsum(ordered)
    mv = np.fromiter((cs.counts.get(v, m_new) for v in values), dtype=float, count=len(values))
    idx = np.searchsorted(ordered, mv, side="right")
    return cum[idx - 1] / total


def _sig4(a: np.ndarray) -> np.ndarray:
    """Round to four significant digits (explanations are for people, and smaller to store).

    Non-finite entries become 0.0 so the result is always JSON-safe.
    """
    a = np.asarray(a, dtype=float)
    finite = np.isfinite(a) & (a != 0.0)
    safe = np.where(finite, np.abs(a), 1.0)
    scale = 10.0 ** (3 - np.floor(np.log10(safe)))
    return np.where(finite, np.round(a * scale) / scale, 0.0)
