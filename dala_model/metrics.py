"""Imbalance-aware evaluation: the paper's metrics plus the honest ones it does not report.

Labels are 0 = benign and 1 = malignant; malignant is the positive class, so *sensitivity* is
the recall of malignant tumours and *specificity* the recall of benign ones. Every number comes
from scikit-learn or imbalanced-learn so that it means exactly what those libraries document;
the only hand-written formulas are the vectorised confusion-count versions used by
:func:`bootstrap_ci` (a thousand library calls per run would be too slow), and the tests check
them against the library values.

Conventions for undefined values (documented once here, applied everywhere):

* precision / recall / F1 / sensitivity / specificity of a class with no samples in the
  denominator are 0 (scikit-learn's ``zero_division=0``); G-mean and IBA follow from those.
* ``roc_auc`` and ``average_precision`` are ``None`` when ``y_true`` holds a single class:
  ranking metrics are undefined there, and 0 would read as "worst possible".
* ``balanced_accuracy`` is scikit-learn's: the mean recall over the classes present in
  ``y_true``.

IBA (index balanced accuracy, García et al. 2012) is imbalanced-learn's
``make_index_balanced_accuracy(alpha=0.1, squared=...)`` applied to
``geometric_mean_score(average="binary", pos_label=1)``, i.e.
``(1 + 0.1 * (sensitivity - specificity)) * gmean**k`` with ``k = 2`` for ``iba`` (the
library default, squared) and ``k = 1`` for ``iba_unsquared``. The paper's tables show IBA
almost equal to G-mean, which matches the unsquared form; note that imbalanced-learn's default
``average="multiclass"`` would make the dominance term identically 0 on two classes (IBA would
*be* G-mean), so we pass ``average="binary"`` to keep the dominance term meaningful.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from imblearn.metrics import geometric_mean_score, make_index_balanced_accuracy
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

LABELS = (0, 1)
IBA_ALPHA = 0.1
# Metrics bootstrap_ci can resample: the ones that are functions of the confusion counts.
BOOTSTRAP_METRICS = (
    "accuracy",
    "sensitivity",
    "specificity",
    "gmean",
    "iba",
    "iba_unsquared",
    "balanced_accuracy",
    "f1_benign",
    "f1_malignant",
    "f1_macro",
    "f1_weighted",
)

_iba_squared = make_index_balanced_accuracy(alpha=IBA_ALPHA, squared=True)(geometric_mean_score)
_iba_unsquared = make_index_balanced_accuracy(alpha=IBA_ALPHA, squared=False)(geometric_mean_score)


def _labels(values: Any, name: str) -> np.ndarray:
    """Validate a label vector: 1-D, non-empty, only 0 (benign) and 1 (malignant)."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of labels, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty: metrics need at least one prediction")
    bad = np.setdiff1d(np.unique(array), LABELS)
    if bad.size:
        raise ValueError(
            f"{name} holds labels {bad[:5].tolist()} outside {{0 = benign, 1 = malignant}}; "
            "map class names to 0/1 first"
        )
    return array.astype(np.int64)


def _probabilities(values: Any, n: int) -> np.ndarray:
    """Validate malignant-class probabilities: finite, within [0, 1], one per label."""
    array = np.asarray(values, dtype=np.float64)
    if array.shape != (n,):
        raise ValueError(
            f"y_prob must hold one probability per label ({n}), got shape {array.shape}"
        )
    if not np.all(np.isfinite(array)) or array.min() < 0.0 or array.max() > 1.0:
        raise ValueError("y_prob must hold finite malignant-class probabilities within [0, 1]")
    return array


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    y_prob: Sequence[float] | np.ndarray | None = None,
) -> dict[str, Any]:
    """All test-set metrics for one binary prediction, as JSON-ready Python numbers.

    ``f1_minority`` is the paper's "F1 minority": the F1 of the class with fewer samples in
    ``y_true`` (benign in BreakHis; on a tie, benign), reported with ``minority_label``.
    ``y_prob`` is the predicted probability of *malignant*; with it, ``roc_auc`` and
    ``average_precision`` are added (``None`` when ``y_true`` has a single class).
    ``confusion_matrix`` is ``[[tn, fp], [fn, tp]]``.
    """
    truth = _labels(y_true, "y_true")
    pred = _labels(y_pred, "y_pred")
    if truth.shape != pred.shape:
        raise ValueError(f"y_true has {truth.size} labels but y_pred has {pred.size}")
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, pred, labels=list(LABELS), zero_division=0
    )
    n_benign, n_malignant = int(support[0]), int(support[1])
    minority = 1 if n_malignant < n_benign else 0
    with warnings.catch_warnings():
        # Sensitivity/specificity of an absent class: 0 by the documented convention.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        gmean = geometric_mean_score(truth, pred, average="binary", pos_label=1)
        iba = _iba_squared(truth, pred, average="binary", pos_label=1)
        iba_unsquared = _iba_unsquared(truth, pred, average="binary", pos_label=1)
        balanced = balanced_accuracy_score(truth, pred)
    result: dict[str, Any] = {
        "n": int(truth.size),
        "n_benign": n_benign,
        "n_malignant": n_malignant,
        "accuracy": float(accuracy_score(truth, pred)),
        "precision_benign": float(precision[0]),
        "precision_malignant": float(precision[1]),
        "recall_benign": float(recall[0]),
        "recall_malignant": float(recall[1]),
        "f1_benign": float(f1[0]),
        "f1_malignant": float(f1[1]),
        "f1_macro": float(
            f1_score(truth, pred, labels=list(LABELS), average="macro", zero_division=0)
        ),
        "f1_weighted": float(
            f1_score(truth, pred, labels=list(LABELS), average="weighted", zero_division=0)
        ),
        "minority_label": minority,
        "f1_minority": float(f1[minority]),
        "sensitivity": float(recall[1]),
        "specificity": float(recall[0]),
        "gmean": float(gmean),
        "iba": float(iba),
        "iba_unsquared": float(iba_unsquared),
        "balanced_accuracy": float(balanced),
        "confusion_matrix": confusion_matrix(truth, pred, labels=list(LABELS)).tolist(),
    }
    if y_prob is not None:
        prob = _probabilities(y_prob, truth.size)
        both_classes = n_benign > 0 and n_malignant > 0
        result["roc_auc"] = float(roc_auc_score(truth, prob)) if both_classes else None
        result["average_precision"] = (
            float(average_precision_score(truth, prob)) if both_classes else None
        )
    return result


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise division that yields 0 where the denominator is 0 (``zero_division=0``)."""
    return np.divide(
        numerator,
        denominator,
        out=np.zeros_like(numerator, dtype=np.float64),
        where=denominator > 0,
    )


def _metrics_from_counts(
    tn: np.ndarray, fp: np.ndarray, fn: np.ndarray, tp: np.ndarray
) -> dict[str, np.ndarray]:
    """The BOOTSTRAP_METRICS for many confusion matrices at once, same conventions as above."""
    tn, fp, fn, tp = (np.asarray(x, dtype=np.float64) for x in (tn, fp, fn, tp))
    n_pos, n_neg = tp + fn, tn + fp
    sensitivity, specificity = _ratio(tp, n_pos), _ratio(tn, n_neg)
    gmean = np.sqrt(sensitivity * specificity)
    weight = 1.0 + IBA_ALPHA * (sensitivity - specificity)
    f1_malignant = _ratio(2 * tp, 2 * tp + fp + fn)
    f1_benign = _ratio(2 * tn, 2 * tn + fn + fp)
    present = (n_pos > 0).astype(np.float64) + (n_neg > 0)
    return {
        "accuracy": (tp + tn) / (n_pos + n_neg),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "gmean": gmean,
        "iba": weight * gmean**2,
        "iba_unsquared": weight * gmean,
        "balanced_accuracy": (sensitivity + specificity) / present,
        "f1_benign": f1_benign,
        "f1_malignant": f1_malignant,
        "f1_macro": (f1_benign + f1_malignant) / 2,
        "f1_weighted": (f1_benign * n_neg + f1_malignant * n_pos) / (n_pos + n_neg),
    }


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


# What each ``TrainConfig.monitor`` reads from the validation metrics, and its direction (+1: higher
# is better). The engine's best-epoch choice and the promotion log's ranking both use this table.
MONITORS: dict[str, tuple[str, float]] = {
    "val_accuracy": ("accuracy", 1.0),
    "val_gmean": ("gmean", 1.0),
    "val_loss": ("loss", -1.0),
}


def monitor_score(monitor: str, val: dict[str, Any]) -> float:
    """``val``'s score under ``monitor``, signed so that higher is always better."""
    key, sign = MONITORS[monitor]
    return sign * float(val[key])
