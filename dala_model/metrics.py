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
``make_index_balanced_accuracy(alpha=0.1, squared=...)`` applied to ``geometric_mean_score``, in
three forms. ``iba`` (García's definition, the library's default ``squared=True``) and
``iba_unsquared`` use ``average="binary", pos_label=1``: ``(1 + 0.1 * (sensitivity -
specificity)) * gmean**k`` with ``k = 2`` and ``k = 1``, so the dominance term rewards the
better-recalled class. ``iba_macro`` is the library's default averaging (``"multiclass"``, macro on
two classes): the dominance term averages to 0 over the two classes and IBA *is* G-mean. The
paper's IBA equals its G-mean to within 0.002 in all 36 cells of Table 6, so the paper used that
default form: compare the paper's IBA with ``iba_macro``; the binary form would read visibly higher
for the imbalanced baselines (about 0.789 where the paper prints 0.769 for ViT at 40X).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
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
    "iba_macro",
    "balanced_accuracy",
    "f1_benign",
    "f1_malignant",
    "f1_macro",
    "f1_weighted",
)


@functools.cache
def _imblearn() -> tuple:
    """G-mean and the two IBA forms, imported on first use: importing imbalanced-learn costs a
    process over a second (it pulls in scikit-learn's estimator machinery and test helpers),
    which every `dala` command and flow run would pay at start-up to compute no metric."""
    from imblearn.metrics import geometric_mean_score, make_index_balanced_accuracy

    iba = make_index_balanced_accuracy(alpha=IBA_ALPHA, squared=True)(geometric_mean_score)
    unsquared = make_index_balanced_accuracy(alpha=IBA_ALPHA, squared=False)(geometric_mean_score)
    return geometric_mean_score, iba, unsquared


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
        geometric_mean_score, _iba_squared, _iba_unsquared = _imblearn()
        gmean = geometric_mean_score(truth, pred, average="binary", pos_label=1)
        iba = _iba_squared(truth, pred, average="binary", pos_label=1)
        iba_unsquared = _iba_unsquared(truth, pred, average="binary", pos_label=1)
        iba_macro = _iba_unsquared(truth, pred)
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
        "iba_macro": float(iba_macro),
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
        "iba_macro": gmean,  # the dominance term averages to 0 over two classes
        "balanced_accuracy": (sensitivity + specificity) / present,
        "f1_benign": f1_benign,
        "f1_malignant": f1_malignant,
        "f1_macro": (f1_benign + f1_malignant) / 2,
        "f1_weighted": (f1_benign * n_neg + f1_malignant * n_pos) / (n_pos + n_neg),
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


# Test-set evaluation (intervals, patient level, subtypes) lives in dala_model.evaluation, which
# builds on this module; its names stay importable from here, resolved on first use.
_EVALUATION_NAMES = (
    "bootstrap_ci",
    "evaluate",
    "interval_records",
    "patient_level",
    "subtype_recall",
)


def __getattr__(name: str) -> Any:
    if name in _EVALUATION_NAMES:
        import dala_model.evaluation

        return getattr(dala_model.evaluation, name)
    raise AttributeError(f"module 'dala_model.metrics' has no attribute {name!r}")
