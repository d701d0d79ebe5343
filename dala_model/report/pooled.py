"""What a group of runs says when their counts or predictions are pooled rather than averaged.

Averaging a per-run metric (``aggregate``) answers "how much does it vary between seeds or
folds"; some questions need the runs' counts or predictions put together instead:

* ``pool_folds``: a ``patient-kfold`` sweep tests every patient exactly once across its folds, so
  the folds' test predictions pooled are one test set of all patients. Its patient-resampled
  (cluster, class-stratified) interval, ``dala_model.evaluation.bootstrap_ci(groups=...)``, is
  the sweep's honest interval; the mean ± std across folds only says how much folds differ.
  Pooled once per seed: pooling two seeds would count each patient twice and narrow the
  interval for nothing.
* ``pool_calibration``: reliability bins summed over runs (counts add, means weight by count).
* ``pool_subtypes``: per-subtype correct calls and images summed, recall recomputed from them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from dala_model.evaluation import bootstrap_ci
from dala_model.metrics import classification_metrics
from dala_model.report.collect import Run

KFOLD = "patient-kfold"
POOLED_METRICS = ("accuracy", "gmean", "iba_macro", "sensitivity", "specificity")
POOLED_LEVEL = 0.95
POOLED_BOOT = 1000


def pool_folds(members: list[Run]) -> tuple[list[dict[str, Any]], list[str]]:
    """Per seed of a k-fold group: pooled test metrics at 0.5 and their patient-resampled
    intervals; plus problems (folds without predictions). Empty for other schemes."""
    if not members or members[0].key[0] != KFOLD:
        return [], []
    records, problems = [], []
    by_seed: dict[Any, list[Run]] = {}
    for run in members:
        by_seed.setdefault(run.summary.get("seed"), []).append(run)
    for seed, runs in sorted(by_seed.items(), key=lambda item: str(item[0])):
        missing = [r.run_id for r in runs if r.predictions is None]
        if missing:
            problems.append(
                f"k-fold runs {missing} have no test predictions: seed {seed} is not pooled"
            )
            continue
        try:
            records.append(_pooled_record(seed, runs))
        except ValueError as exc:  # e.g. a patient labelled both ways: no cluster bootstrap
            problems.append(f"k-fold seed {seed} could not be pooled: {exc}")
    return records, problems


def _pooled_record(seed: Any, runs: list[Run]) -> dict[str, Any]:
    frame = pd.concat([r.predictions for r in runs], ignore_index=True)
    truth = frame["y_true"].to_numpy(dtype=np.int64)
    prob = frame["prob_malignant"].to_numpy(dtype=np.float64)
    pred = (prob >= 0.5).astype(np.int64)
    patients = frame["patient_id"].astype(str).to_numpy()
    # A patient in the test folds of two runs means those folds came from different splits.
    tested = {r.run_id: set(r.predictions["patient_id"].astype(str)) for r in runs}
    seen: dict[str, int] = {}
    for ids in tested.values():
        for patient in ids:
            seen[patient] = seen.get(patient, 0) + 1
    n_patients = len(seen)
    image = classification_metrics(truth, pred, prob)
    bounds = bootstrap_ci(
        truth, pred, metrics=POOLED_METRICS, n_boot=POOLED_BOOT, level=POOLED_LEVEL, groups=patients
    )
    expected = {r.split.get("folds") for r in runs} - {None}
    return {
        "seed": seed,
        "folds": sorted({r.summary.get("fold") for r in runs}, key=str),
        "folds_expected": max(expected) if expected else None,
        "run_ids": [r.run_id for r in runs],
        "threshold": 0.5,
        "n_images": int(truth.size),
        "n_patients": n_patients,
        "patients_tested_more_than_once": sum(1 for n in seen.values() if n > 1),
        "image": {key: image[key] for key in POOLED_METRICS},
        "intervals": [
            {
                "metric": metric,
                "scope": "image",
                "unit": "patient",
                "n_units": n_patients,
                "n_patients": n_patients,
                "stratified_by": "class",
                "level": POOLED_LEVEL,
                "n_boot": POOLED_BOOT,
                "optimistic": False,
                "low": low,
                "high": high,
            }
            for metric, (low, high) in bounds.items()
        ],
    }


def pool_calibration(members: list[Run]) -> list[dict[str, Any]] | None:
    """The members' reliability bins summed: count, count-weighted mean probability and share."""
    summaries = [r.metrics.get("calibration") for r in members]
    bins: dict[tuple[float, float], list[dict[str, Any]]] = {}
    for summary in summaries:
        for b in (summary or {}).get("bins") or []:
            bins.setdefault((float(b["low"]), float(b["high"])), []).append(b)
    if not bins:
        return None
    pooled = []
    for (low, high), parts in sorted(bins.items()):
        counted = [p for p in parts if p["count"]]
        count = int(sum(p["count"] for p in counted))
        pooled.append(
            {
                "low": low,
                "high": high,
                "count": count,
                "mean_prob": (
                    sum(p["count"] * p["mean_prob"] for p in counted) / count if count else None
                ),
                "frac_malignant": (
                    sum(p["count"] * p["frac_malignant"] for p in counted) / count
                    if count
                    else None
                ),
            }
        )
    return pooled


def pool_subtypes(members: list[Run]) -> dict[str, dict[str, Any]] | None:
    """Per subtype: images and correct calls summed over the members, recall from the sums."""
    totals: dict[str, dict[str, Any]] = {}
    for run in members:
        for name, row in (run.metrics.get("subtypes") or {}).items():
            total = totals.setdefault(name, {"n": 0, "correct": 0, "label": row.get("label")})
            total["n"] += int(row["n"])
            total["correct"] += int(row["correct"])
    if not totals:
        return None
    for total in totals.values():
        total["recall"] = total["correct"] / total["n"] if total["n"] else None
    return totals
