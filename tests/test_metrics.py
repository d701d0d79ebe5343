"""Metrics against direct scikit-learn / imbalanced-learn computations, plus the degenerate cases."""

from __future__ import annotations

import json
import time
import warnings

import numpy as np
import pytest
from imblearn.metrics import (
    geometric_mean_score,
    make_index_balanced_accuracy,
    sensitivity_score,
    specificity_score,
)
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from dala_model.calibration import calibration_summary, choose_threshold
from dala_model.metrics import (
    BOOTSTRAP_METRICS,
    _metrics_from_counts,
    bootstrap_ci,
    classification_metrics,
    evaluate,
    patient_level,
)


def _case(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed predictions: realistic imbalance, one class never predicted, a single true class."""
    rng = np.random.default_rng(7)
    if name == "imbalanced":
        y_true = np.r_[np.zeros(40, int), np.ones(90, int)]
        prob = np.clip(0.35 * y_true + rng.random(y_true.size) * 0.65, 0, 1)
    elif name == "never_malignant":
        y_true = np.r_[np.zeros(12, int), np.ones(8, int)]
        prob = rng.random(y_true.size) * 0.49
    elif name == "only_benign_true":
        y_true = np.zeros(15, int)
        prob = rng.random(y_true.size)
    else:
        raise AssertionError(name)
    return y_true, (prob >= 0.5).astype(int), prob


def _reference(y_true: np.ndarray, y_pred: np.ndarray, y_prob: np.ndarray) -> dict:
    """Each metric straight from the libraries, with the documented zero-division convention."""
    zero = {"zero_division": 0, "labels": [0, 1]}
    iba = make_index_balanced_accuracy(alpha=0.1, squared=True)(geometric_mean_score)
    iba_u = make_index_balanced_accuracy(alpha=0.1, squared=False)(geometric_mean_score)
    single = len(np.unique(y_true)) == 1
    n_benign, n_malignant = int((y_true == 0).sum()), int((y_true == 1).sum())
    minority = 1 if n_malignant < n_benign else 0
    return {
        "n": len(y_true),
        "n_benign": n_benign,
        "n_malignant": n_malignant,
        "accuracy": accuracy_score(y_true, y_pred),
        "precision_benign": precision_score(y_true, y_pred, pos_label=0, zero_division=0),
        "precision_malignant": precision_score(y_true, y_pred, pos_label=1, zero_division=0),
        "recall_benign": recall_score(y_true, y_pred, pos_label=0, zero_division=0),
        "recall_malignant": recall_score(y_true, y_pred, pos_label=1, zero_division=0),
        "f1_benign": f1_score(y_true, y_pred, pos_label=0, zero_division=0),
        "f1_malignant": f1_score(y_true, y_pred, pos_label=1, zero_division=0),
        "f1_macro": f1_score(y_true, y_pred, average="macro", **zero),
        "f1_weighted": f1_score(y_true, y_pred, average="weighted", **zero),
        "minority_label": minority,
        "f1_minority": f1_score(y_true, y_pred, pos_label=minority, zero_division=0),
        "sensitivity": sensitivity_score(y_true, y_pred, pos_label=1),
        "specificity": specificity_score(y_true, y_pred, pos_label=1),
        "gmean": geometric_mean_score(y_true, y_pred, average="binary"),
        "iba": iba(y_true, y_pred, average="binary"),
        "iba_unsquared": iba_u(y_true, y_pred, average="binary"),
        "iba_macro": iba_u(y_true, y_pred),  # imbalanced-learn's default averaging
        "balanced_accuracy": balanced_accuracy_score(y_true, y_pred),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=[0, 1]).tolist(),
        "roc_auc": None if single else roc_auc_score(y_true, y_prob),
        "average_precision": None if single else average_precision_score(y_true, y_prob),
    }


@pytest.mark.parametrize("case", ["imbalanced", "never_malignant", "only_benign_true"])
def test_every_metric_matches_the_libraries(case: str) -> None:
    y_true, y_pred, y_prob = _case(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.simplefilter("ignore", UserWarning)
        ours = classification_metrics(y_true, y_pred, y_prob)
        expected = _reference(y_true, y_pred, y_prob)
    assert set(ours) == set(expected)
    for key, value in expected.items():
        if isinstance(value, float):
            assert ours[key] == pytest.approx(value, abs=1e-12), key
        else:
            assert ours[key] == value, key
    json.dumps(ours, allow_nan=False)  # plain Python numbers only
    assert all(type(v) in (int, float, list, type(None)) for v in ours.values())


def test_imbalanced_case_is_not_trivial() -> None:
    """The fixed case exercises distinct values, so the comparison above can fail."""
    y_true, y_pred, y_prob = _case("imbalanced")
    m = classification_metrics(y_true, y_pred, y_prob)
    assert m["minority_label"] == 0 and m["f1_minority"] == m["f1_benign"]
    assert 0.5 < m["accuracy"] < 1.0
    assert m["sensitivity"] != m["specificity"]
    assert m["iba_unsquared"] != pytest.approx(m["gmean"])  # the dominance term is live
    assert m["iba"] == pytest.approx(
        (1 + 0.1 * (m["sensitivity"] - m["specificity"])) * m["gmean"] ** 2
    )
    assert m["confusion_matrix"][0][0] + m["confusion_matrix"][0][1] == m["n_benign"] == 40


def test_never_predicting_malignant_gives_zero_malignant_scores() -> None:
    y_true, y_pred, _ = _case("never_malignant")
    m = classification_metrics(y_true, y_pred)
    assert m["precision_malignant"] == 0.0 and m["sensitivity"] == 0.0
    assert m["gmean"] == 0.0 and m["specificity"] == 1.0
    assert "roc_auc" not in m  # no probabilities given


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_single_true_class_leaves_ranking_metrics_undefined() -> None:
    y_true, y_pred, y_prob = _case("only_benign_true")
    m = classification_metrics(y_true, y_pred, y_prob)
    assert m["roc_auc"] is None and m["average_precision"] is None
    assert m["n_malignant"] == 0 and m["minority_label"] == 1


@pytest.mark.parametrize(
    ("y_true", "y_pred", "message"),
    [
        ([], [], "empty"),
        ([0, 1, 2], [0, 1, 1], "outside"),
        ([0, 1], [0, -1], "outside"),
        ([0, 1, 1], [0, 1], "3 labels"),
        ([[0, 1]], [[0, 1]], "1-D"),
    ],
)
def test_bad_labels_are_refused_with_a_clear_message(y_true, y_pred, message) -> None:
    with pytest.raises(ValueError, match=message):
        classification_metrics(y_true, y_pred)


@pytest.mark.parametrize("y_prob", [[0.2, 1.5], [0.2, float("nan")], [0.3]])
def test_bad_probabilities_are_refused(y_prob) -> None:
    with pytest.raises(ValueError, match="y_prob"):
        classification_metrics([0, 1], [0, 1], y_prob)


def test_vectorised_count_formulas_equal_the_library_metrics() -> None:
    """bootstrap_ci resamples through _metrics_from_counts; on the full sample it must agree."""
    for case in ("imbalanced", "never_malignant", "only_benign_true"):
        y_true, y_pred, _ = _case(case)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            m = classification_metrics(y_true, y_pred)
        (tn, fp), (fn, tp) = m["confusion_matrix"]
        counts = _metrics_from_counts(
            np.array([tn]), np.array([fp]), np.array([fn]), np.array([tp])
        )
        for name in BOOTSTRAP_METRICS:
            assert counts[name][0] == pytest.approx(m[name], abs=1e-12), (case, name)


def test_bootstrap_ci_contains_the_estimate_is_seeded_and_fast() -> None:
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 2, 1000)
    y_pred = np.where(rng.random(1000) < 0.85, y_true, 1 - y_true)
    started = time.perf_counter()
    ci = bootstrap_ci(y_true, y_pred, n_boot=1000, seed=5)
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0
    point = classification_metrics(y_true, y_pred)
    for name in ("accuracy", "gmean", "iba_unsquared"):
        low, high = ci[name]
        assert low <= point[name] <= high
        assert 0.0 < high - low < 0.1  # about +-2.2 points for n = 1000 at 85% accuracy
    assert bootstrap_ci(y_true, y_pred, n_boot=1000, seed=5) == ci
    assert bootstrap_ci(y_true, y_pred, n_boot=1000, seed=6) != ci
    narrow = bootstrap_ci(y_true, y_pred, n_boot=1000, seed=5, level=0.5)["accuracy"]
    assert ci["accuracy"][0] < narrow[0] < narrow[1] < ci["accuracy"][1]


def test_bootstrap_refuses_metrics_it_cannot_resample() -> None:
    with pytest.raises(ValueError, match="roc_auc"):
        bootstrap_ci([0, 1], [0, 1], metrics=("roc_auc",))
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([0, 1], [0, 1], level=1.5)


def test_patient_level_averages_probabilities_per_patient() -> None:
    # p1 benign: mean 0.3 -> benign. p2 benign: mean 0.6 -> malignant (a false positive).
    # p3 malignant: mean 0.8 -> malignant. p4 malignant: mean 0.45 -> benign (a false negative).
    patients = ["p1", "p1", "p2", "p2", "p2", "p3", "p4", "p4"]
    y_true = [0, 0, 0, 0, 0, 1, 1, 1]
    y_prob = [0.2, 0.4, 0.9, 0.5, 0.4, 0.8, 0.3, 0.6]
    m = patient_level(patients, y_true, y_prob)
    assert m["n_patients"] == 4 and m["n"] == 4
    assert m["confusion_matrix"] == [[1, 1], [1, 1]]
    assert m["accuracy"] == 0.5
    # Ranking of patient means (0.3, 0.6 benign; 0.8, 0.45 malignant): 3 of 4 pairs ordered.
    assert m["roc_auc"] == pytest.approx(0.75)


def test_patient_level_refuses_mixed_labels_for_one_patient() -> None:
    with pytest.raises(ValueError, match="p1"):
        patient_level(["p1", "p1"], [0, 1], [0.2, 0.7])


def test_evaluate_combines_image_ci_and_patient_levels() -> None:
    y_true, _, y_prob = _case("imbalanced")
    patients = np.array([f"p{i % 13}" if y else f"q{i % 5}" for i, y in enumerate(y_true)])
    result = evaluate(y_true, y_prob, patient_ids=patients)
    assert result["image"] == classification_metrics(y_true, (y_prob >= 0.5).astype(int), y_prob)
    assert result["patient"]["n_patients"] == 18
    low, high = result["ci"]["accuracy"]
    assert low <= result["image"]["accuracy"] <= high
    json.dumps(result, allow_nan=False)
    assert evaluate(y_true, y_prob)["patient"] is None


# ---------------------------------------------------------------- patient-resampled intervals


def _correlated_set(n_patients: int = 10, per_patient: int = 30, seed: int = 3):
    """Every patient's images share one prediction (perfect within-patient correlation)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_patients) % 2, per_patient)
    patient_right = rng.random(n_patients) < 0.7
    correct = np.repeat(patient_right, per_patient)
    pred = np.where(correct, labels, 1 - labels)
    groups = np.repeat([f"p{k}" for k in range(n_patients)], per_patient)
    return labels, pred, groups


def test_patient_bootstrap_is_wider_than_image_bootstrap_for_correlated_images():
    truth, pred, groups = _correlated_set()
    by_image = bootstrap_ci(truth, pred, metrics=["accuracy", "gmean"])
    by_patient = bootstrap_ci(truth, pred, metrics=["accuracy", "gmean"], groups=groups)
    for name in ("accuracy", "gmean"):
        width_image = by_image[name][1] - by_image[name][0]
        width_patient = by_patient[name][1] - by_patient[name][0]
        assert width_patient > 2 * width_image, (name, width_image, width_patient)


def test_patient_bootstrap_keeps_the_patients_per_class_and_rejects_mixed_patients():
    truth, pred, groups = _correlated_set(n_patients=4, per_patient=5)
    # All predictions right: every patient resample is perfect, so the interval is a point.
    exact = bootstrap_ci(truth, truth, metrics=["gmean"], groups=groups)
    assert exact["gmean"] == (1.0, 1.0)
    mixed = truth.copy()
    mixed[0] = 1 - mixed[0]
    with pytest.raises(ValueError, match="both benign and malignant"):
        bootstrap_ci(mixed, pred, groups=groups)


def test_evaluate_names_the_resampling_unit_of_every_interval():
    truth, pred, groups = _correlated_set()
    prob = np.where(pred == 1, 0.8, 0.2)
    result = evaluate(truth, prob, patient_ids=groups)
    rows = result["intervals"]
    units = {(r["scope"], r["unit"]) for r in rows}
    assert units == {("image", "image"), ("image", "patient"), ("patient", "patient")}
    for row in rows:
        assert row["n_patients"] == 10
        assert row["optimistic"] is (row["unit"] == "image")
        assert row["n_units"] == (300 if row["unit"] == "image" else 10)
        assert row["low"] <= row["high"]
    # The legacy image-resampled "ci" is the same interval as the image/image rows.
    image_rows = {r["metric"]: [r["low"], r["high"]] for r in rows if r["unit"] == "image"}
    assert image_rows == result["ci"]


# ---------------------------------------------------------------- threshold and calibration


def test_threshold_is_chosen_to_maximise_validation_gmean():
    # A model that ranks perfectly but puts every probability below 0.5: at 0.5 all benign.
    truth = np.array([0] * 6 + [1] * 4)
    prob = np.array([0.05, 0.1, 0.1, 0.15, 0.2, 0.22, 0.3, 0.35, 0.4, 0.45])
    chosen = choose_threshold(truth, prob)
    assert chosen["gmean_at_0.5"] == 0.0
    assert chosen["gmean"] == pytest.approx(1.0)
    assert 0.22 < chosen["threshold"] <= 0.3
    pred = (prob >= chosen["threshold"]).astype(int)
    assert (pred == truth).all()


def test_threshold_ties_go_to_half_and_one_class_keeps_half():
    truth = np.array([0, 0, 1, 1])
    prob = np.array([0.1, 0.2, 0.8, 0.9])  # every threshold in (0.2, 0.8] is perfect
    assert choose_threshold(truth, prob)["threshold"] == 0.5
    single = choose_threshold(np.zeros(4, dtype=int), prob)
    assert single["threshold"] == 0.5 and "one class" in single["reason"]


def test_calibration_summary_matches_hand_computation():
    truth = np.array([0, 0, 1, 1, 1])
    prob = np.array([0.05, 0.15, 0.85, 0.95, 0.15])
    summary = calibration_summary(truth, prob)
    assert summary["brier"] == pytest.approx(np.mean((prob - truth) ** 2))
    # bins: [0,0.1): {0.05 -> 0}; [0.1,0.2): {0.15 -> 0, 0.15 -> 1}; [0.8,0.9): {0.85 -> 1}; [0.9,1]: {0.95 -> 1}
    expected = (1 * 0.05 + 2 * abs(0.15 - 0.5) + 1 * 0.15 + 1 * 0.05) / 5
    assert summary["ece"] == pytest.approx(expected)
    assert sum(b["count"] for b in summary["bins"]) == 5
