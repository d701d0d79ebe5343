"""Evaluation of one test set: intervals that name what they resample, patients, subtypes.

``evaluate`` is what a run records for its test set. Its intervals come from
:func:`bootstrap_ci`: resampling images (optimistic: correlated tiles of one patient counted as
independent draws, kept because other codebases report it) and resampling patients (a cluster
bootstrap stratified by class: the interval to trust, with ~7 benign test patients per
magnification it is wide, and that width is the honest answer). The metric definitions and their
conventions live in :mod:`dala_model.metrics`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from dala_model.metrics import (
    BOOTSTRAP_METRICS,
    _labels,
    _metrics_from_counts,
    _probabilities,
    classification_metrics,
)


def _check_interval_args(metrics: Sequence[str], n_boot: int, level: float) -> None:
    unknown = [name for name in metrics if name not in BOOTSTRAP_METRICS]
    if unknown:
        raise ValueError(f"bootstrap_ci cannot resample {unknown}; choose from {BOOTSTRAP_METRICS}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")


def _percentiles(
    counts: tuple[np.ndarray, ...], metrics: Sequence[str], level: float
) -> dict[str, tuple[float, float]]:
    values = _metrics_from_counts(*counts)
    tail = (1.0 - level) / 2 * 100
    return {
        name: tuple(float(v) for v in np.percentile(values[name], [tail, 100 - tail]))
        for name in metrics
    }


def _confusion_columns(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """One-hot confusion cell per row: columns tn, fp, fn, tp."""
    cell = truth * 2 + pred  # 0 tn, 1 fp, 2 fn, 3 tp
    return np.eye(4, dtype=np.int64)[cell]


def bootstrap_ci(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    y_prob: Sequence[float] | np.ndarray | None = None,
    metrics: Sequence[str] = ("accuracy", "gmean", "iba_unsquared"),
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups: Sequence[str] | np.ndarray | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals, resampling images or, with ``groups``, patients.

    Without ``groups`` images are resampled with replacement. Images of one patient are
    correlated (tiles of the same slides), so those intervals are optimistic: they treat 300 test
    images of 10 patients as 300 independent draws. With ``groups`` (one patient id per image) it
    is a cluster bootstrap stratified by class: each resample draws, with replacement, as many
    patients of each class as the test set has, and takes all of their images; the number of
    patients per class is fixed, so every resample has both classes whenever the test set does.
    Every resample is reduced to confusion counts at once, so 1000 resamples take milliseconds.
    ``y_prob`` is accepted for signature symmetry with :func:`classification_metrics` and
    validated, but only the confusion-count metrics in ``BOOTSTRAP_METRICS`` can be resampled.
    """
    truth = _labels(y_true, "y_true")
    pred = _labels(y_pred, "y_pred")
    if truth.shape != pred.shape:
        raise ValueError(f"y_true has {truth.size} labels but y_pred has {pred.size}")
    if y_prob is not None:
        _probabilities(y_prob, truth.size)
    _check_interval_args(metrics, n_boot, level)
    rng = np.random.default_rng(seed)
    cells = _confusion_columns(truth, pred)
    if groups is None:
        index = rng.integers(0, truth.size, size=(n_boot, truth.size))
        drawn = cells[index].sum(axis=1)
    else:
        drawn = _cluster_counts(cells, truth, np.asarray(groups), n_boot, rng)
    return _percentiles(tuple(drawn[:, k] for k in range(4)), metrics, level)


def _cluster_counts(
    cells: np.ndarray, truth: np.ndarray, groups: np.ndarray, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """(n_boot, 4) confusion counts of patient resamples drawn within each class."""
    if groups.shape != truth.shape:
        raise ValueError(f"groups has {groups.size} entries but y_true has {truth.size}")
    frame = pd.DataFrame(cells, columns=["tn", "fp", "fn", "tp"]).assign(group=groups, label=truth)
    per_group = frame.groupby("group", sort=True).agg(
        tn=("tn", "sum"),
        fp=("fp", "sum"),
        fn=("fn", "sum"),
        tp=("tp", "sum"),
        labels=("label", "nunique"),
        label=("label", "first"),
    )
    mixed = per_group.index[per_group["labels"] > 1].tolist()
    if mixed:
        raise ValueError(
            f"patients {mixed[:5]} have images labelled both benign and malignant: a patient "
            "bootstrap needs one diagnosis per patient"
        )
    total = np.zeros((n_boot, 4), dtype=np.int64)
    for _, members in per_group.groupby("label", sort=True):
        counts = members[["tn", "fp", "fn", "tp"]].to_numpy()
        index = rng.integers(0, len(counts), size=(n_boot, len(counts)))
        total += counts[index].sum(axis=1)
    return total


def interval_records(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    patient_ids: np.ndarray | None,
    patient_truth: np.ndarray | None = None,
    patient_pred: np.ndarray | None = None,
    metrics: Sequence[str] = ("accuracy", "gmean", "iba_unsquared"),
    n_boot: int = 1000,
    level: float = 0.95,
) -> list[dict[str, Any]]:
    """Every interval a run reports, each naming what it resamples and how many units it had.

    Rows: image-level metrics resampled by image (``"optimistic": True``: correlated images
    counted as independent), image-level metrics resampled by patient, and patient-level metrics
    (one prediction per patient) resampled by patient. Patient rows need ``patient_ids``.
    """
    n_patients = None if patient_ids is None else int(len(np.unique(patient_ids)))
    rows = []

    def add(scope: str, unit: str, n_units: int, bounds: dict, optimistic: bool) -> None:
        for name, (low, high) in bounds.items():
            rows.append(
                {
                    "metric": name,
                    "scope": scope,
                    "unit": unit,
                    "n_units": n_units,
                    "n_patients": n_patients,
                    "stratified_by": "class" if unit == "patient" else None,
                    "level": level,
                    "n_boot": n_boot,
                    "optimistic": optimistic,
                    "low": low,
                    "high": high,
                }
            )

    add(
        "image",
        "image",
        int(y_true.size),
        bootstrap_ci(y_true, y_pred, metrics=metrics, n_boot=n_boot, level=level),
        True,
    )
    if patient_ids is not None:
        add(
            "image",
            "patient",
            n_patients,
            bootstrap_ci(
                y_true, y_pred, metrics=metrics, n_boot=n_boot, level=level, groups=patient_ids
            ),
            False,
        )
    if patient_truth is not None and patient_pred is not None:
        add(
            "patient",
            "patient",
            int(patient_truth.size),
            bootstrap_ci(patient_truth, patient_pred, metrics=metrics, n_boot=n_boot, level=level),
            False,
        )
    return rows


def patient_level(
    patient_ids: Sequence[str] | np.ndarray,
    y_true: Sequence[int] | np.ndarray,
    y_prob: Sequence[float] | np.ndarray,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Metrics per patient: the mean malignant probability of a patient's images, thresholded.

    Clinicians decide per patient, and images of one patient are not independent, so this is
    the number to trust most. A patient is called malignant when its mean is ``>= threshold``.
    Every BreakHis patient has one diagnosis; images of one patient with different labels mean
    a broken manifest and raise ``ValueError``.
    """
    truth = _labels(y_true, "y_true")
    prob = _probabilities(y_prob, truth.size)
    ids = np.asarray(patient_ids)
    if ids.shape != truth.shape:
        raise ValueError(f"patient_ids has {ids.size} entries but y_true has {truth.size}")
    frame = pd.DataFrame({"patient_id": ids, "y_true": truth, "prob": prob})
    per_patient = frame.groupby("patient_id", sort=True).agg(
        y_true=("y_true", "first"), labels=("y_true", "nunique"), prob=("prob", "mean")
    )
    mixed = per_patient.index[per_patient["labels"] > 1].tolist()
    if mixed:
        raise ValueError(
            f"patients {mixed[:5]} have images labelled both benign and malignant; "
            "every BreakHis patient has one diagnosis, so rebuild the manifest"
        )
    patient_prob = per_patient["prob"].to_numpy()
    result = classification_metrics(
        per_patient["y_true"].to_numpy(), (patient_prob >= threshold).astype(np.int64), patient_prob
    )
    result["n_patients"] = int(len(per_patient))
    return result


def evaluate(
    y_true: Sequence[int] | np.ndarray,
    y_prob: Sequence[float] | np.ndarray,
    patient_ids: Sequence[str] | np.ndarray | None = None,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Everything a run reports for one test set: ``{"image", "ci", "intervals", "patient"}``.

    Predictions are ``y_prob >= threshold``, the rule the run's ``test_predictions.parquet``
    uses. ``patient`` is ``None`` without ``patient_ids``; ``ci`` maps each default bootstrap
    metric to ``[low, high]`` resampled by image (optimistic, kept for comparison with other
    codebases); ``intervals`` (see :func:`interval_records`) holds every interval with its
    resampling unit, including the patient-resampled ones to trust.
    """
    truth = _labels(y_true, "y_true")
    prob = _probabilities(y_prob, truth.size)
    pred = (prob >= threshold).astype(np.int64)
    patient = None
    ids = None
    p_truth = p_pred = None
    if patient_ids is not None:
        ids = np.asarray(patient_ids)
        patient = patient_level(ids, truth, prob, threshold=threshold)
        per = pd.DataFrame({"g": ids, "t": truth, "p": prob}).groupby("g", sort=True)
        p_truth = per["t"].first().to_numpy()
        p_pred = (per["p"].mean().to_numpy() >= threshold).astype(np.int64)
    return {
        "threshold": float(threshold),
        "image": classification_metrics(truth, pred, prob),
        "ci": {name: list(bounds) for name, bounds in bootstrap_ci(truth, pred).items()},
        "intervals": interval_records(truth, pred, ids, p_truth, p_pred),
        "patient": patient,
    }


def subtype_recall(
    subtypes: Sequence[str] | np.ndarray,
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
) -> dict[str, dict[str, Any]]:
    """Per histological subtype: images, correct calls and recall (each subtype has one class).

    Errors concentrate in a few subtypes (fibroadenoma vs phyllodes, lobular carcinoma); a class
    recall hides that, this table shows it."""
    truth = _labels(y_true, "y_true")
    pred = _labels(y_pred, "y_pred")
    names = np.asarray(subtypes)
    if names.shape != truth.shape or pred.shape != truth.shape:
        raise ValueError("subtypes, y_true and y_pred must have one entry per image")
    out = {}
    for name in sorted(set(names.tolist())):
        inside = names == name
        correct = int(np.sum(pred[inside] == truth[inside]))
        out[str(name)] = {
            "n": int(inside.sum()),
            "correct": correct,
            "recall": correct / int(inside.sum()),
            "label": int(truth[inside][0]),
        }
    return out
