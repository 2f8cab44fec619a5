"""Quality and speed of the built-in online anomaly model on labelled synthetic payments.

Not a test: a measurement. It generates labelled data, streams it through the built-in
``OnlineAnomalyScorer`` in arrival order, and compares its ROC-AUC with scikit-learn's
``IsolationForest`` fitted OFFLINE on the same data (issue 7, "Quality": the built-in model
should be within 0.05 of it). It also times the built-in model alone (no I/O, no JSON) on one
core (issue 7, "Benchmark": at least 20k events/s).

The data (``generate``; everything drawn from ``numpy.random.default_rng(--seed)``, default 7)
------------------------------------------------------------------------------------------------
``--events`` N payment events (default 100,000) of three CloudEvents types, picked i.i.d. per
event with probabilities 0.60 / 0.25 / 0.15, in that (random) arrival order:

========================== =========== ============================ ==================
type                       merchants   channels (home country)      in-person channel
========================== =========== ============================ ==================
com.acme.payment.card      30          pos .45, web .35, app .20    pos
com.acme.payment.transfer  20          online .70, branch .20,      branch
                                       phone .10
com.acme.payment.wallet    25          app .60, web .30, nfc .10    nfc
========================== =========== ============================ ==================

``data`` of every event: ``{"payment_id": <uuid>, "amount": <float, 2 decimals>,
"currency": "EUR", "merchant": "<type>-m<k>", "country": <ISO code>, "channel": <name>}``
(``payment_id`` is an identifier and ignored by the built-in model's feature rules; so is the
event id).

* **merchant**: Zipf-like popularity, ``P(k) ∝ 1 / k^1.1`` over the type's merchants.
* **amount**: per merchant a lognormal ``exp(μ_m + σ_m·Z)`` with ``μ_m ~ U(2.5, 6.5)`` (medians
  of about 12 to 665) and ``σ_m ~ U(0.3, 0.8)``; ``Z`` is a standard normal truncated at
  3.09 (the 99.9th percentile), so every merchant has a hard maximum
  ``max_m = exp(μ_m + 3.09·σ_m)``.
* **country**: the same 12 codes for every type with skewed frequencies
  ``P(i) ∝ 1 / i^1.6`` (DE 0.52, FR 0.17, NL 0.09, ... , CZ 0.01); DE is the home country.
* **channel**: depends on the country. At home (DE) the channel frequencies of the table above;
  abroad the in-person channel never occurs (its share is spread over the others in proportion).

Anomalies: ``--anomaly-rate`` (default 2 %) of the events, split equally over four kinds. An
anomaly is first drawn like a normal event of its type, then changed:

* ``amount_x20_80``: the amount is multiplied by ``U(20, 80)``;
* ``unseen_country``: the country is one of 15 codes (per type) that normal events never use;
* ``rare_combination``: in-person channel *and* a foreign country (drawn with the normal foreign
  frequencies): each value is common on its own, the pair never occurs in normal data;
* ``just_above_max``: the amount is ``max_m · U(1.01, 1.15)`` for the event's merchant: above
  anything that merchant ever charges, but often within the type's overall range.

Models and features
-------------------
* **built-in**: ``OnlineAnomalyScorer`` with the gateway's defaults (``warmup`` 30, ``horizon``
  10,000, ...). Its features come from ``data`` by its own rules: ``amount`` numeric (model space
  ``log1p``), ``currency``, ``merchant``, ``country``, ``channel`` categorical, state per type.
  Events arrive in order in micro-batches of ``--batch`` (default 500 = ``scoring.batch_max``,
  what the worker takes under backlog); each batch is scored with the state from before it and
  then learned. The first events of a type (warm-up) get score 0.0.
* **IsolationForest** (scikit-learn, ``n_estimators=200``, ``max_samples=256``, ``random_state``
  = the seed, contamination ``auto``), fitted offline on ALL N events (anomalies included, as an
  unsupervised model is) and scored on the same events; the anomaly score is
  ``-score_samples``. Two encodings of the same fields (``type``, ``merchant``, ``country``,
  ``channel``, ``currency`` and ``log1p(amount)``):

  - ``one-hot``: ``OneHotEncoder`` of the categoricals plus ``log1p(amount)``;
  - ``ordinal``: each categorical as the index of its value in the frequency-sorted value list
    (most frequent = 0) plus ``log1p(amount)``: 6 columns.

ROC-AUC (``sklearn.metrics.roc_auc_score``, label 1 = anomaly) is reported on all events
("overall") and on the events after the first ``--skip`` of the stream ("after warm-up",
default 10 % of N; both models on the same subset), plus per anomaly kind (that kind's anomalies
against all normal events, after warm-up), and for the built-in model the false-alarm rate and
recall at its documented threshold 0.99.

Speed: the built-in model alone, fresh state, the same events (already built ``Event`` objects),
the same micro-batches, on one core (``sched_setaffinity`` to one CPU), best and median of
``--speed-rounds`` passes (default 3).

Usage::

    /work/venv/bin/python bench/scoring_quality.py --events 100000 --json /tmp/quality.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.events import Event
from gateway.scoring.online import OnlineAnomalyScorer

TYPES: dict[str, dict[str, Any]] = {
    "com.acme.payment.card": {
        "share": 0.60, "merchants": 30, "channels": {"pos": 0.45, "web": 0.35, "app": 0.20}, "in_person": "pos",
    },
    "com.acme.payment.transfer": {
        "share": 0.25, "merchants": 20, "channels": {"online": 0.70, "branch": 0.20, "phone": 0.10},
        "in_person": "branch",
    },
    "com.acme.payment.wallet": {
        "share": 0.15, "merchants": 25, "channels": {"app": 0.60, "web": 0.30, "nfc": 0.10}, "in_person": "nfc",
    },
}
COUNTRIES = ["DE", "FR", "NL", "AT", "IT", "ES", "PL", "BE", "CH", "GB", "US", "CZ"]
HOME = "DE"
# Codes normal events never use, 15 per type (disjoint, so "unseen" holds for the offline model too).
UNSEEN_POOL = [
    "AR", "BR", "CL", "CO", "EG", "GH", "ID", "IN", "KE", "KZ", "MA", "MX", "MY", "NG", "NZ",
    "PE", "PH", "PK", "QA", "RS", "SA", "SG", "TH", "TN", "TR", "UA", "UY", "VN", "ZA", "ZW",
    "AE", "AM", "AZ", "BD", "BO", "CR", "DO", "EC", "GE", "GT", "HN", "JM", "JO", "LB", "LK",
]
KINDS = ["amount_x20_80", "unseen_country", "rare_combination", "just_above_max"]
Z_MAX = 3.090232306167813  # standard normal 99.9th percentile


def generate(n: int, seed: int, anomaly_rate: float) -> tuple[list[Event], np.ndarray, list[str]]:
    """The labelled stream: events in arrival order, labels (1 = anomaly) and kinds ("" = normal)."""
    from scipy.special import ndtri  # scikit-learn depends on scipy

    rng = np.random.default_rng(seed)
    type_names = list(TYPES)
    c_p = 1.0 / np.arange(1, len(COUNTRIES) + 1) ** 1.6
    c_p /= c_p.sum()
    foreign_p = c_p[1:] / c_p[1:].sum()
    spec: dict[str, dict[str, Any]] = {}
    for t_i, (t, cfg) in enumerate(TYPES.items()):
        m = cfg["merchants"]
        pop = 1.0 / np.arange(1, m + 1) ** 1.1
        mu = rng.uniform(2.5, 6.5, m)
        sigma = rng.uniform(0.3, 0.8, m)
        chans = list(cfg["channels"])
        home_p = np.array([cfg["channels"][c] for c in chans])
        abroad = np.array([0.0 if c == cfg["in_person"] else cfg["channels"][c] for c in chans])
        spec[t] = {
            "merchants": [f"{t.rsplit('.', 1)[1]}-m{k:02d}" for k in range(m)],
            "pop": pop / pop.sum(), "mu": mu, "sigma": sigma, "max": np.exp(mu + Z_MAX * sigma),
            "chans": chans, "home_p": home_p, "abroad_p": abroad / abroad.sum(),
            "unseen": UNSEEN_POOL[15 * t_i: 15 * (t_i + 1)],
        }

    types = rng.choice(len(type_names), size=n, p=[TYPES[t]["share"] for t in type_names])
    is_anom = rng.random(n) < anomaly_rate
    kinds_idx = rng.integers(0, len(KINDS), n)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    events: list[Event] = []
    labels = np.zeros(n, dtype=np.int8)
    kinds: list[str] = []
    for i in range(n):
        t = type_names[types[i]]
        s = spec[t]
        k = rng.choice(len(s["merchants"]), p=s["pop"])
        country = COUNTRIES[rng.choice(len(COUNTRIES), p=c_p)]
        chan_p = s["home_p"] if country == HOME else s["abroad_p"]
        channel = s["chans"][rng.choice(len(s["chans"]), p=chan_p)]
        # Truncated normal by inversion: Z = Φ⁻¹(U · Φ(Z_MAX)).
        z = float(ndtri(rng.random() * 0.999))
        amount = float(np.exp(s["mu"][k] + s["sigma"][k] * z))
        kind = ""
        if is_anom[i]:
            kind = KINDS[kinds_idx[i]]
            if kind == "amount_x20_80":
                amount *= rng.uniform(20, 80)
            elif kind == "unseen_country":
                country = s["unseen"][rng.integers(0, len(s["unseen"]))]
            elif kind == "rare_combination":
                country = COUNTRIES[1 + rng.choice(len(COUNTRIES) - 1, p=foreign_p)]
                channel = TYPES[t]["in_person"]
            else:  # just_above_max
                amount = float(s["max"][k] * rng.uniform(1.01, 1.15))
        labels[i] = 1 if kind else 0
        kinds.append(kind)
        events.append(Event(
            id=str(uuid.UUID(int=int(rng.integers(0, 2**63)) << 64 | i, version=4)),
            source="/bench/payments",
            type=t,
            time=t0 + timedelta(milliseconds=i),
            subject=f"payment/{i}",
            data={
                "payment_id": f"p-{i:08d}",
                "amount": round(amount, 2),
                "currency": "EUR",
                "merchant": s["merchants"][k],
                "country": country,
                "channel": channel,
            },
        ))
    return events, labels, kinds


def stream_online(events: list[Event], batch: int) -> np.ndarray:
    """Scores of a fresh built-in model fed ``events`` in arrival order, ``batch`` at a time."""
    model = OnlineAnomalyScorer()
    out = np.empty(len(events))
    for i in range(0, len(events), batch):
        res = model.score_batch(events[i: i + batch])
        out[i: i + len(res)] = [r.score for r in res]
    return out


def online_speed(events: list[Event], batch: int, rounds: int) -> dict[str, Any]:
    """Events/s of the built-in model alone, on one core (fresh state per pass)."""
    pinned = None
    if hasattr(os, "sched_setaffinity"):
        before = os.sched_getaffinity(0)
        pinned = min(before)
        os.sched_setaffinity(0, {pinned})
    try:
        rates = []
        for _ in range(rounds):
            t = time.perf_counter()
            stream_online(events, batch)
            rates.append(len(events) / (time.perf_counter() - t))
    finally:
        if pinned is not None:
            os.sched_setaffinity(0, before)
    return {"events_per_s_best": max(rates), "events_per_s_median": statistics.median(rates),
            "rounds": rates, "pinned_cpu": pinned, "batch": batch}


def features_matrix(events: list[Event], encoding: str) -> np.ndarray:
    """IsolationForest's matrix: categoricals one-hot or frequency-ordinal, plus log1p(amount)."""
    cats = np.array([[e.type, e.data["merchant"], e.data["country"], e.data["channel"], e.data["currency"]]
                     for e in events], dtype=object)
    amount = np.log1p(np.array([e.data["amount"] for e in events], dtype=float))[:, None]
    if encoding == "one-hot":
        from sklearn.preprocessing import OneHotEncoder

        enc = OneHotEncoder(handle_unknown="ignore", sparse_output=False, dtype=np.float32)
        return np.hstack([enc.fit_transform(cats), amount])
    cols = []
    for j in range(cats.shape[1]):
        freq = Counter(cats[:, j])
        rank = {v: r for r, (v, _) in enumerate(freq.most_common())}
        cols.append(np.array([rank[v] for v in cats[:, j]], dtype=float))
    return np.hstack([np.column_stack(cols), amount])


def isolation_forest(events: list[Event], encoding: str, seed: int) -> tuple[np.ndarray, float, int]:
    from sklearn.ensemble import IsolationForest

    X = features_matrix(events, encoding)
    t = time.perf_counter()
    forest = IsolationForest(n_estimators=200, max_samples=256, random_state=seed, n_jobs=1).fit(X)
    scores = -forest.score_samples(X)
    return scores, time.perf_counter() - t, X.shape[1]


def evaluate(scores: np.ndarray, labels: np.ndarray, kinds: list[str], skip: int) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    kinds_a = np.array(kinds, dtype=object)
    after = slice(skip, None)
    out: dict[str, Any] = {
        "auc_overall": float(roc_auc_score(labels, scores)),
        "auc_after_warmup": float(roc_auc_score(labels[after], scores[after])),
        "auc_by_kind_after_warmup": {},
    }
    s, lab, kd = scores[after], labels[after], kinds_a[after]
    for kind in KINDS:
        mask = (lab == 0) | (kd == kind)
        if (kd == kind).any():
            out["auc_by_kind_after_warmup"][kind] = float(roc_auc_score(lab[mask], s[mask]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000, help="events to generate (default 100,000)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--anomaly-rate", type=float, default=0.02)
    ap.add_argument("--batch", type=int, default=500, help="micro-batch size of the online model (default 500)")
    ap.add_argument("--skip", type=int, default=None, help="events excluded as warm-up (default 10%% of --events)")
    ap.add_argument("--speed-rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="write the results to this file")
    args = ap.parse_args()
    skip = args.skip if args.skip is not None else args.events // 10

    t = time.perf_counter()
    events, labels, kinds = generate(args.events, args.seed, args.anomaly_rate)
    gen_s = time.perf_counter() - t
    print(f"generated {len(events):,} events ({int(labels.sum()):,} anomalies: "
          f"{dict(Counter(k for k in kinds if k))}) in {gen_s:.1f} s", file=sys.stderr)

    online = stream_online(events, args.batch)
    results: dict[str, Any] = {"built-in online-anomaly": evaluate(online, labels, kinds, skip)}
    thr = 0.99
    after = slice(skip, None)
    flagged = online[after] >= thr
    lab = labels[after]
    kd = np.array(kinds, dtype=object)[after]
    results["built-in online-anomaly"]["at_threshold_0.99"] = {
        "false_alarm_rate": float(flagged[lab == 0].mean()),
        "recall": float(flagged[lab == 1].mean()),
        "recall_by_kind": {k: float(flagged[kd == k].mean()) for k in KINDS if (kd == k).any()},
    }
    fit_info = {}
    for enc in ("one-hot", "ordinal"):
        scores, fit_s, width = isolation_forest(events, enc, args.seed)
        results[f"IsolationForest ({enc})"] = evaluate(scores, labels, kinds, skip)
        fit_info[enc] = {"fit_and_score_s": fit_s, "columns": width}
    speed = online_speed(events, args.batch, args.speed_rounds)

    forests = [k for k in results if k.startswith("IsolationForest")]
    best = max(forests, key=lambda k: results[k]["auc_after_warmup"])
    me = results["built-in online-anomaly"]
    diff = {
        f: {"overall": me["auc_overall"] - results[f]["auc_overall"],
            "after_warmup": me["auc_after_warmup"] - results[f]["auc_after_warmup"]}
        for f in forests
    }

    print(f"\n## Scoring quality ({args.events:,} events, seed {args.seed}, {args.anomaly_rate:.0%} anomalies, "
          f"warm-up skip {skip:,}, batch {args.batch}; {time.strftime('%Y-%m-%d %H:%M')})\n")
    print("| model | ROC-AUC overall | ROC-AUC after warm-up | " + " | ".join(KINDS) + " |")
    print("|---|---:|---:|" + "---:|" * len(KINDS))
    for name, r in results.items():
        by = r["auc_by_kind_after_warmup"]
        print(f"| {name} | {r['auc_overall']:.3f} | {r['auc_after_warmup']:.3f} | "
              + " | ".join(f"{by.get(k, float('nan')):.3f}" for k in KINDS) + " |")
    print()
    for f in forests:
        print(f"built-in minus {f}: {diff[f]['overall']:+.3f} overall, {diff[f]['after_warmup']:+.3f} after warm-up")
    gap = diff[best]["after_warmup"]
    print(f"goal (within 0.05 of IsolationForest, best encoding = {best}): "
          f"{'MET' if gap >= -0.05 else 'NOT MET'} ({gap:+.3f} after warm-up)")
    at = me["at_threshold_0.99"]
    print(f"built-in at threshold 0.99: false alarms {at['false_alarm_rate']:.2%} of normal events, "
          f"recall {at['recall']:.1%} (" + ", ".join(f"{k} {v:.0%}" for k, v in at["recall_by_kind"].items()) + ")")
    print(f"built-in model speed on one core (CPU {speed['pinned_cpu']}): best {speed['events_per_s_best']:,.0f} "
          f"events/s, median {speed['events_per_s_median']:,.0f} of {args.speed_rounds} "
          f"(goal >= 20,000: {'MET' if speed['events_per_s_median'] >= 20_000 else 'NOT MET'})")

    if args.json:
        import sklearn

        payload = {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "args": {**vars(args), "json": str(args.json), "skip": skip},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "numpy": np.__version__, "scikit_learn": sklearn.__version__},
            "data": {"events": len(events), "anomalies": int(labels.sum()),
                     "by_kind": dict(Counter(k for k in kinds if k)),
                     "by_type": dict(Counter(e.type for e in events))},
            "results": results, "difference_builtin_minus_forest": diff, "reference_forest": best,
            "isolation_forest_fit": fit_info, "online_speed": speed,
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
