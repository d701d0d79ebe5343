"""Aggregation across seeds/folds: one record per experiment, i.e. per ``config_hash``.

Only runs with one ``config_hash`` (the full training config minus seed/fold and how/where it
ran, plus the split's grouping) are ever averaged: runs that differ in lr, epochs, pretrained
weights, image size, recalibration, grouping or scheme are different experiments, and a
"mean ± std across seeds" over them would measure those differences as noise. Groups that share
a ``setting_hash`` (the same minus model, model options and magnification) form one report
section (``sections``), whose tables set their models side by side.

Each record holds the mean and sample standard deviation (``ddof=1``; ``None`` for a single
run) of every numeric test metric, image and patient level, at 0.5 and at the validation-chosen
threshold, the summed confusion matrix, the setting that defines it, pooled calibration bins and
subtype counts, a k-fold sweep's patient-pooled intervals (``pooled``), and the paper's published
values beside them. These records are what metrics.json stores and what every table and figure
of the report reads.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dala_model.paper import PAPER_CONVERGENCE_SECONDS, PAPER_NAMES, PAPER_PARAMS, PAPER_RESULTS
from dala_model.report.collect import Run
from dala_model.report.pooled import pool_calibration, pool_folds, pool_subtypes

# The config fields that define a section's setting, in the order the report shows them.
SETTING_FIELDS = (
    "epochs",
    "lr",
    "batch_size",
    "image_size",
    "pretrained",
    "imbalance",
    "monitor",
    "recalibrate_bn",
    "preset",
    "weight_decay",
    "rotation_degrees",
)


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool): what a table may format as a number."""
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)


def _stat(values: list[Any]) -> dict[str, Any] | None:
    """Mean and sample standard deviation of the numeric values; None when there are none."""
    numbers = [float(v) for v in values if is_number(v)]
    if not numbers:
        return None
    std = float(np.std(numbers, ddof=1)) if len(numbers) > 1 else None
    return {"mean": float(np.mean(numbers)), "std": std, "n": len(numbers)}


def _stats(dicts: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    keys = sorted({key for d in dicts for key, value in d.items() if is_number(value)})
    return {key: _stat([d.get(key) for d in dicts]) for key in keys}


def model_order(model: str) -> tuple[int, str]:
    """Sort key: the paper's Table 6 order, then models the paper does not have, by name."""
    order = list(PAPER_NAMES)
    return (order.index(model) if model in order else len(order), model)


def aggregate(runs: list[Run]) -> tuple[list[dict[str, Any]], list[str]]:
    """One record per ``config_hash``, ordered by scheme, setting, then as the paper's tables
    are; plus problems met on the way (k-fold folds that could not be pooled)."""
    by_hash: dict[tuple[Any, ...], list[Run]] = {}
    for run in runs:
        # The hash alone decides; the key's other parts only guard summaries whose recorded
        # config is too sparse to tell models or magnifications apart.
        by_hash.setdefault((*run.key, run.row[1], run.config_hash), []).append(run)
    groups, problems = [], []
    for members in by_hash.values():
        group, trouble = _group(members)
        groups.append(group)
        problems += trouble
    groups.sort(
        key=lambda g: (
            g["scheme"],
            g["setting_hash"],
            model_order(g["model"]),
            g["model_options"],
            g["magnification"],
        )
    )
    return groups, problems


def sections(groups: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The report's sections: each (scheme, setting hash) its groups hold, in their order."""
    return list(dict.fromkeys((g["scheme"], g["setting_hash"]) for g in groups))


def setting_of(run: Run) -> dict[str, Any]:
    """What defines ``run``'s section: the setting fields as recorded (None: not recorded)."""
    return {key: run.config.get(key) for key in SETTING_FIELDS} | {"split_group_by": run.group_by}


def _numbers(values: list[Any]) -> list[Any]:
    return sorted({v for v in values if v is not None}, key=str)


def _group(members: list[Run]) -> tuple[dict[str, Any], list[str]]:
    scheme, model, mag = members[0].key
    patients = [r.test["patient"] for r in members if r.test.get("patient")]
    matrices = [
        r.test["image"]["confusion_matrix"]
        for r in members
        if "confusion_matrix" in r.test["image"]
    ]
    paper = PAPER_RESULTS.get(model, {}).get(mag)
    at_threshold = [r.metrics.get("test_at_threshold") for r in members]
    calibration = [r.metrics.get("calibration") or {} for r in members]
    pooled, problems = pool_folds(members)
    group = {
        "scheme": scheme,
        "model": model,
        "magnification": mag,
        "model_options": members[0].row[1],
        "config_hash": members[0].config_hash,
        "setting_hash": members[0].setting_hash,
        "setting": setting_of(members[0]),
        "split_hashes": _numbers([r.split.get("hash") for r in members]),
        "n_runs": len(members),
        "run_ids": [r.run_id for r in members],
        "seeds": sorted({r.summary.get("seed") for r in members}, key=str),
        "folds": sorted({r.summary.get("fold") for r in members}, key=str),
        "test": _stats([r.test["image"] for r in members]),
        "patient": _stats(patients),
        "confusion_matrix": np.sum(matrices, axis=0).tolist() if matrices else None,
        "train_seconds": _stat([r.summary.get("train_seconds") for r in members]),
        "parameters": _stat([r.summary.get("parameters") for r in members]),
        "best_epoch": _stat([r.summary.get("best_epoch") for r in members]),
        "epochs": sorted({r.summary.get("epochs") for r in members}, key=str),
        "filled_in": sorted({name for r in members for name in r.filled}),
        "threshold": _stat([(r.summary.get("threshold") or {}).get("threshold") for r in members]),
        "at_threshold": _stats([t["image"] for t in at_threshold if t and t.get("image")]),
        "brier": _stat([c.get("brier") for c in calibration]),
        "ece": _stat([c.get("ece") for c in calibration]),
        "reliability": pool_calibration(members),
        "subtypes": pool_subtypes(members),
        "pooled": pooled,
        "paper": {
            **({} if paper is None else {k: v for k, v in vars(paper).items() if v is not None}),
            "parameters": PAPER_PARAMS.get(model),
            "convergence_seconds": PAPER_CONVERGENCE_SECONDS.get(model, {}).get(mag),
        },
    }
    return group, problems
