"""The operating point and how far a model's probabilities can be taken at their word.

A model trained on an imbalanced set (BreakHis is 31% benign) can rank images well (high ROC-AUC)
while thresholding them at 0.5 calls almost everything one class: G-mean 0 with AUC 0.9 is a
threshold problem, not a ranking one. So the decision threshold is chosen on the *validation*
images, never on test: the one that maximises G-mean (the metric the paper reports, and the one
that weighs both classes' recall equally), ties going to the threshold closest to 0.5 so a model
that needs no shift keeps the conventional one. The model card stores it; test metrics are
reported at 0.5 and at that threshold, and batch inference uses the stored one by default.

Calibration answers a different question: when the model says 0.8, is it right 80% of the time?
``brier_score`` is scikit-learn's ``brier_score_loss``; ``expected_calibration_error`` is the
usual equal-width-bin ECE (10 bins, weighted by the share of images in each bin), and
``reliability_bins`` gives the points of the reliability diagram the report draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import brier_score_loss

from dala_model.metrics import _labels, _metrics_from_counts, _probabilities

DEFAULT_THRESHOLD = 0.5
N_BINS = 10


def choose_threshold(
    y_true: Sequence[int] | np.ndarray, y_prob: Sequence[float] | np.ndarray
) -> dict[str, Any]:
    """The G-mean-maximising threshold on a validation set, ties to the one closest to 0.5.

    Candidates are 0.5 and the midpoints between consecutive distinct probabilities (every
    distinct decision the data can tell apart), plus the extremes. A validation set with one
    class cannot choose a threshold (G-mean is 0 everywhere): 0.5 is kept and ``reason`` says so.
    Returns ``{"threshold", "gmean", "gmean_at_0.5", "n", "reason"}``.
    """
    truth = _labels(y_true, "y_true")
    prob = _probabilities(y_prob, truth.size)
    at_default = _gmean_at(truth, prob, np.array([DEFAULT_THRESHOLD]))[0]
    if truth.min() == truth.max():
        return {
            "threshold": DEFAULT_THRESHOLD,
            "gmean": float(at_default),
            "gmean_at_0.5": float(at_default),
            "n": int(truth.size),
            "reason": "validation holds one class: 0.5 kept",
        }
    distinct = np.unique(prob)
    candidates = np.unique(
        np.concatenate(
            [
                [DEFAULT_THRESHOLD, 0.0, np.nextafter(1.0, 2.0)],
                (distinct[:-1] + distinct[1:]) / 2,
            ]
        )
    )
    gmeans = _gmean_at(truth, prob, candidates)
    best = gmeans.max()
    tied = candidates[np.isclose(gmeans, best, rtol=0, atol=1e-12)]
    chosen = float(tied[np.argmin(np.abs(tied - DEFAULT_THRESHOLD))])
    return {
        "threshold": chosen,
        "gmean": float(best),
        "gmean_at_0.5": float(at_default),
        "n": int(truth.size),
        "reason": "max validation G-mean (ties to 0.5)",
    }


def _gmean_at(truth: np.ndarray, prob: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    pred = prob[None, :] >= thresholds[:, None]
    t = truth[None, :] == 1
    counts = (
        np.sum(~t & ~pred, axis=1),
        np.sum(~t & pred, axis=1),
        np.sum(t & ~pred, axis=1),
        np.sum(t & pred, axis=1),
    )
    return _metrics_from_counts(*counts)["gmean"]


def reliability_bins(
    y_true: Sequence[int] | np.ndarray, y_prob: Sequence[float] | np.ndarray, n_bins: int = N_BINS
) -> list[dict[str, Any]]:
    """Equal-width bins of the malignant probability: count, mean probability, malignant share."""
    truth = _labels(y_true, "y_true")
    prob = _probabilities(y_prob, truth.size)
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(prob, edges[1:-1], right=False), 0, n_bins - 1)
    rows = []
    for k in range(n_bins):
        inside = which == k
        count = int(inside.sum())
        rows.append(
            {
                "low": float(edges[k]),
                "high": float(edges[k + 1]),
                "count": count,
                "mean_prob": float(prob[inside].mean()) if count else None,
                "frac_malignant": float(truth[inside].mean()) if count else None,
            }
        )
    return rows


def expected_calibration_error(
    y_true: Sequence[int] | np.ndarray, y_prob: Sequence[float] | np.ndarray, n_bins: int = N_BINS
) -> float:
    """Sum over bins of (share of images in the bin) x |mean probability - malignant share|."""
    bins = reliability_bins(y_true, y_prob, n_bins)
    total = sum(b["count"] for b in bins)
    return float(
        sum(
            b["count"] / total * abs(b["mean_prob"] - b["frac_malignant"])
            for b in bins
            if b["count"]
        )
    )


def calibration_summary(
    y_true: Sequence[int] | np.ndarray, y_prob: Sequence[float] | np.ndarray, n_bins: int = N_BINS
) -> dict[str, Any]:
    """Brier score, ECE and the reliability-diagram bins for one set of predictions."""
    truth = _labels(y_true, "y_true")
    prob = _probabilities(y_prob, truth.size)
    return {
        "brier": float(brier_score_loss(truth, prob, pos_label=1)),
        "ece": expected_calibration_error(truth, prob, n_bins),
        "n_bins": n_bins,
        "bins": reliability_bins(truth, prob, n_bins),
    }
