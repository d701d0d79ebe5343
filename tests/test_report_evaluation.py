"""The report's honest-evaluation parts, from run folders as the engine now writes them.

No pooling of unlike runs (one ``config_hash`` per average, one section per scheme and setting),
intervals that name their resampling unit, a k-fold sweep's patient-pooled interval, the
operating threshold and calibration, errors by subtype, the paper's IBA beside ``iba_macro``, the
reporting checklist, and runs from before these keys (dashes, sections left out). The run
folders are written by hand, as ``tests/test_report.py`` does, and every summary is checked
against ``dala_model.runs.RunSummary``.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from dala_model import storage
from dala_model.calibration import calibration_summary, choose_threshold
from dala_model.data.manifest import MANIFEST_SCHEMA, SCHEMA_VERSION, manifest_uri
from dala_model.data.splits import make_split, split_identity, split_report
from dala_model.engine.config import TrainConfig, config_hash, setting_hash
from dala_model.evaluation import bootstrap_ci, subtype_recall
from dala_model.metrics import evaluate
from dala_model.paper import MAGNIFICATIONS as ALL_MAGS
from dala_model.paper import PAPER_ASSUMPTIONS, PAPER_RESULTS
from dala_model.report.build import build_report
from dala_model.report.pooled import POOLED_METRICS
from dala_model.report.tables import fmt_interval, paper_metrics, table6_row
from dala_model.runs import RunSummary
from tests.test_report import EPOCHS, MAGS, MODELS, SEEDS, _png_ok, _write_run

TABLE6_HEADING = "### Test metrics in the paper's Table 6 layout"
BENIGN = ("adenosis", "fibroadenoma", "phyllodes_tumor", "tubular_adenoma")
MALIGNANT = ("ductal_carcinoma", "lobular_carcinoma", "mucinous_carcinoma", "papillary_carcinoma")


def _subtype(patient: str) -> str:
    """Benign patients B0, B1, ... and malignant M0, M1, ... cycle through the eight subtypes."""
    names = BENIGN if patient.startswith("B") else MALIGNANT
    return names[int(patient[1:]) % 4]


def _write_honest_run(
    root: str,
    model: str,
    mag: int,
    seed: int,
    *,
    lr: float = 1e-4,
    scheme: str = "patient",
    fold: int | None = None,
    patients: list[str] | None = None,
    split: dict | None = None,
    **config_fields,
) -> dict:
    """A complete run as the engine now writes it: full TrainConfig, split identity, config hash,
    threshold chosen on a validation set, test metrics at 0.5 and at it, calibration, subtypes.
    The summary is checked against RunSummary, so it matches the record the engine writes."""
    fold_tag = "" if fold is None else f"-fold{fold}"
    run_id = f"{model}-{mag}x-{scheme}{fold_tag}-lr{lr:g}-s{seed}"
    folder = storage.join(root, "runs", run_id)
    params, skill = MODELS[model]
    rng = np.random.default_rng([list(MODELS).index(model), mag, seed, int(lr * 1e6), fold or 0])
    if patients is None:
        patients = [f"B{i}" for i in range(4)] + [f"M{i}" for i in range(6)]
    ids = np.repeat(patients, 8)
    y_true = np.array([0 if p.startswith("B") else 1 for p in ids])
    prob = np.clip(np.where(y_true == 1, skill, 1 - skill) + rng.normal(0, 0.3, ids.size), 0, 1)
    val_true = np.repeat([0, 1], [10, 20])
    val_prob = np.clip(np.where(val_true == 1, skill, 1 - skill) + rng.normal(0, 0.3, 30), 0, 1)
    threshold = choose_threshold(val_true, val_prob)
    at = threshold["threshold"]
    split = split or {
        "scheme": scheme,
        "seed": 0,
        "group_by": "patient",
        "fractions": [0.6, 0.1, 0.3],
        "folds": 3 if scheme == "patient-kfold" else 1,
        "manifest_version": "abc123",
        "hash": "0123456789abcdef",
    }
    config = TrainConfig(
        root=root, model=model, magnification=mag, scheme=scheme, fold=fold, seed=seed,
        epochs=EPOCHS, lr=lr, **config_fields,
    ).model_dump(mode="json")  # fmt: skip
    summary = {
        "status": "complete",
        "run_id": run_id,
        "model": model,
        "magnification": mag,
        "scheme": scheme,
        "fold": fold,
        "seed": seed,
        "parameters": params,
        "train_seconds": 60.0 + seed,
        "epochs": EPOCHS,
        "best_epoch": 3,
        "metrics": {
            "val": {"loss": 0.3, "accuracy": 0.8, "gmean": 0.8, "f1_weighted": 0.8},
            "test": evaluate(y_true, prob, patient_ids=ids),
            "test_at_threshold": evaluate(y_true, prob, patient_ids=ids, threshold=at),
            "calibration": calibration_summary(y_true, prob),
            "subtypes": subtype_recall(
                [_subtype(p) for p in ids], y_true, (prob >= at).astype(np.int64)
            ),
        },
        "data_version": "abc123",
        "code_version": "test",
        "config": config,
        "split": split,
        "threshold": threshold,
        "config_hash": config_hash(config, split["group_by"]),
    }
    RunSummary.parse(summary, run_id)  # the record the engine writes, unknown keys refused
    predictions = pd.DataFrame(
        {
            "image_id": [f"{run_id}-{i:03d}" for i in range(ids.size)],
            "patient_id": ids,
            "magnification": mag,
            "y_true": y_true,
            "prob_malignant": prob,
            "y_pred": (prob >= 0.5).astype(np.int64),
        }
    )
    storage.write_parquet_atomic(predictions, storage.join(folder, "test_predictions.parquet"))
    storage.write_bytes_atomic(storage.join(folder, "run.json"), json.dumps(summary).encode())
    return summary


def _part(md: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    after = md.split(heading + "\n", 1)[1]
    return re.split(rf"\n#{{1,{len(level)}}} ", after, maxsplit=1)[0]


def _md_row(md: str, *starts: str) -> str:
    """The one Markdown table line that starts with ``| a | b | ...``."""
    prefix = "| " + " | ".join(starts) + " |"
    lines = [line for line in md.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, (prefix, lines)
    return lines[0]


def test_two_configs_are_never_averaged_together(tmp_path) -> None:
    root = str(tmp_path / "root")
    slow = [_write_honest_run(root, "dalaresnet50", 40, seed) for seed in (0, 1)]
    # How a run executed is not the experiment: seed 2 on another device still pools with these.
    slow.append(_write_honest_run(root, "dalaresnet50", 40, 2, device="cpu", precision="fp32"))
    fast = [_write_honest_run(root, "dalaresnet50", 40, seed, lr=1e-3) for seed in (0, 1)]
    beside = _write_honest_run(root, "resnet50", 40, 0)  # same setting, other model
    written = build_report(root)
    metrics = json.loads(storage.read_bytes(written["metrics.json"]))

    groups = {(g["model"], g["setting"]["lr"]): g for g in metrics["groups"]}
    assert len(metrics["groups"]) == 3 and len(groups) == 3
    for key, members in ((("dalaresnet50", 1e-4), slow), (("dalaresnet50", 1e-3), fast)):
        group = groups[key]
        assert group["run_ids"] == sorted(r["run_id"] for r in members)
        assert group["n_runs"] == len(members)
        assert group["config_hash"] == members[0]["config_hash"]
        accuracy = [r["metrics"]["test"]["image"]["accuracy"] for r in members]
        assert group["test"]["accuracy"]["mean"] == pytest.approx(np.mean(accuracy))
        assert group["test"]["accuracy"]["std"] == pytest.approx(np.std(accuracy, ddof=1))
    assert (
        groups[("dalaresnet50", 1e-4)]["config_hash"]
        != groups[("dalaresnet50", 1e-3)]["config_hash"]
    )
    # Two settings: two sections, each with its own Table 6 and figures, the setting named.
    slow_setting = setting_hash(slow[0]["config"], "patient")
    fast_setting = setting_hash(fast[0]["config"], "patient")
    assert slow_setting == setting_hash(beside["config"], "patient") != fast_setting
    assert groups[("resnet50", 1e-4)]["setting_hash"] == slow_setting
    md = storage.read_bytes(written["report.md"]).decode()
    for setting, lr, averaged in (
        (slow_setting, "0.0001", "3 runs (seeds 0, 1, 2)"),
        (fast_setting, "0.001", "2 runs (seeds 0, 1)"),
    ):
        heading = f"## Split scheme `patient`, setting `{setting}`"
        assert md.count(heading) == 1
        section = _part(md, heading)
        assert f"| Learning rate | `{lr}` |" in section
        assert "| Split grouping | `patient` |" in section
        assert "| Split hash | `0123456789abcdef` |" in section
        assert f"table6_patient-{setting}.png" in written
        dala = _md_row(_part(section, TABLE6_HEADING), "DALAResNet50")
        assert dala.endswith(f"| {averaged} |")
        assert ("| ResNet50 |" in section) == (setting == slow_setting)
    assert "table6_patient.png" not in written


def test_threshold_calibration_subtypes_and_patient_intervals(storage_root: str) -> None:
    runs = [
        _write_honest_run(storage_root, model, mag, seed)
        for model in MODELS
        for mag in MAGS
        for seed in SEEDS
    ]
    written = build_report(storage_root)
    assert {"reliability_patient.png", "ci_patient.png", "table6_patient.png"} <= set(written)
    width, height = _png_ok(storage.read_bytes(written["reliability_patient.png"]))
    assert width > 300 and height > 150
    metrics = json.loads(storage.read_bytes(written["metrics.json"]))
    md = storage.read_bytes(written["report.md"]).decode()

    group = next(
        g for g in metrics["groups"] if (g["model"], g["magnification"]) == ("dalaresnet50", 40)
    )
    members = [r for r in runs if (r["model"], r["magnification"]) == ("dalaresnet50", 40)]
    thresholds = [r["threshold"]["threshold"] for r in members]
    assert group["threshold"]["mean"] == pytest.approx(np.mean(thresholds))
    brier = [r["metrics"]["calibration"]["brier"] for r in members]
    assert group["brier"]["mean"] == pytest.approx(np.mean(brier))
    at = [r["metrics"]["test_at_threshold"]["image"]["gmean"] for r in members]
    assert group["at_threshold"]["gmean"]["mean"] == pytest.approx(np.mean(at))
    bins = [b for r in members for b in r["metrics"]["calibration"]["bins"]]
    assert sum(b["count"] for b in group["reliability"]) == sum(b["count"] for b in bins) == 160

    # Operating threshold section: threshold, metrics at 0.5 and at it, Brier and ECE.
    assert "### Operating threshold and calibration" in md
    row = _md_row(_part(md, "### Operating threshold and calibration"), "DALAResNet50", "40X", "2")
    t = group["test"]
    assert f"| {group['threshold']['mean']:.3f} ± {group['threshold']['std']:.3f} |" in row
    assert f"| {t['gmean']['mean']:.3f} ± {t['gmean']['std']:.3f} |" in row
    g_at = group["at_threshold"]["gmean"]
    assert f"| {g_at['mean']:.3f} ± {g_at['std']:.3f} |" in row
    assert f"| {group['brier']['mean']:.3f} ± {group['brier']['std']:.3f} |" in row

    # Errors by subtype: the eight subtypes per magnification, pooled over the runs.
    subtypes = _part(md, "### Errors by subtype")
    header = next(line for line in subtypes.splitlines() if line.startswith("| Model |"))
    assert header == (
        "| Model | adenosis (B) | fibroadenoma (B) | phyllodes tumor (B) | tubular adenoma (B) "
        "| ductal carcinoma (M) | lobular carcinoma (M) | mucinous carcinoma (M) "
        "| papillary carcinoma (M) |"
    )
    assert subtypes.count(header) == len(MAGS)
    correct = sum(r["metrics"]["subtypes"]["ductal_carcinoma"]["correct"] for r in members)
    n = sum(r["metrics"]["subtypes"]["ductal_carcinoma"]["n"] for r in members)
    assert n == 32  # M0 and M4, 8 images each, in two runs
    first = subtypes.split("40X:")[1].split("100X:")[0]
    assert f"| {correct / n:.3f} ({correct}/{n}) |" in _md_row(first, "DALAResNet50")

    # The runs table: the patient-resampled interval names its patients, the image one is optimistic.
    run = members[0]
    by_patient = next(
        i
        for i in run["metrics"]["test"]["intervals"]
        if (i["metric"], i["scope"], i["unit"]) == ("gmean", "image", "patient")
    )
    cells = _md_row(md, f"`{run['run_id']}`")
    assert f"[{by_patient['low']:.3f}, {by_patient['high']:.3f}] 10 patients |" in cells
    assert "80 images, optimistic |" in cells
    assert f"| {run['threshold']['threshold']:.3f} |" in cells
    assert f"| `{run['config_hash']}` |" in cells

    # Paper columns: the IBA column is iba_macro beside the paper's IBA; assumptions in the notes.
    dala = _md_row(_part(md, TABLE6_HEADING), "DALAResNet50")
    iba = group["test"]["iba_macro"]
    assert f"{iba['mean']:.3f} ± {iba['std']:.3f} (paper 0.980)" in dala
    assert "iba" in group["test"] and "iba_unsquared" in group["test"]  # binary forms kept
    for sentence in PAPER_ASSUMPTIONS:
        assert sentence in md
    page = storage.read_bytes(written["report.html"]).decode()
    assert len(re.findall(r'src="data:image/png;base64,', page)) == sum(
        name.endswith(".png") for name in written
    )


def _write_manifest(root: str) -> None:
    """A manifest of 20 cases (6 benign) at 40X and 100X, one case with two lettered slides."""
    rows = []
    for p in range(20):
        label_id = int(p >= 6)
        for mag in MAGS:
            for seq in range(6):
                sha = f"{p:04d}{mag:04d}{seq:04d}".ljust(64, "0")
                rows.append(
                    {
                        "image_id": sha[:16],
                        "uri": f"mem://{sha}.png",
                        "relpath": f"{sha}.png",
                        "sha256": sha,
                        "bytes": 1,
                        "width": 700,
                        "height": 460,
                        "format": "PNG",
                        "mode": "RGB",
                        "label": ("benign", "malignant")[label_id],
                        "label_id": label_id,
                        "subtype": (BENIGN, MALIGNANT)[label_id][p % 4],
                        "subtype_code": "X",
                        "patient_id": f"14-{p}",
                        "slide_id": f"14-{p}" + ("" if p else ("AB", "CD")[seq % 2]),
                        "magnification": mag,
                        "seq": seq + 1,
                        "procedure": "SOB",
                        "source_version": "v",
                        "ingested_at": pd.Timestamp("2024-01-01", tz="UTC"),
                    }
                )
    storage.write_parquet_atomic(
        pd.DataFrame(rows),
        manifest_uri(root),
        schema=MANIFEST_SCHEMA,
        metadata={"dala.schema_version": SCHEMA_VERSION, "dala.source": "s3://bucket/BreaKHis_v1"},
    )


def test_reporting_checklist_counts_patients_and_images_from_the_split(storage_root) -> None:
    root = storage_root
    _write_manifest(root)
    make_split(root, "patient", seed=0)
    identity = split_identity(root, "patient")
    _write_honest_run(root, "dalaresnet50", 40, 0, split=identity)
    md = storage.read_bytes(build_report(root)["report.md"]).decode()

    checklist = _part(md, "## Reporting checklist (after TRIPOD+AI and CLAIM)")
    assert "| Intended use | Research use, not for diagnosis. |" in checklist
    assert "one centre, the P&D Laboratory" in checklist and "Brazil" in checklist
    assert "Ingested from `s3://bucket/BreaKHis_v1`" in checklist
    assert "patient = BreakHis case" in checklist
    assert f"split hash `{identity['hash']}`" in checklist
    assert "has changed since" not in checklist
    assert "chosen on validation per run (max G-mean, ties to 0.5): 1 of 1 runs" in checklist
    assert "Brier score, ECE (10 bins) and reliability diagrams" in checklist
    # Patients (cases) / slides / images per split, magnification and class, as split_report says.
    table = split_report(root, "patient")
    for (mag, label), row in table.iterrows():
        cells = " | ".join(
            f"{row[('patients', s)]} / {row[('slides', s)]} / {row[('images', s)]}"
            for s in ("train", "val", "test")
        )
        assert f"| {mag}X | {label} | {cells} |" in checklist
    benign = table.xs("benign", level="label")
    assert int(benign[("patients", "train")].sum() + benign[("patients", "test")].sum()) > 0

    # A re-split under the same root: the checklist says the runs' split is not the file's.
    make_split(root, "patient", seed=1)
    md = storage.read_bytes(build_report(root)["report.md"]).decode()
    assert "the split file has changed since these runs trained" in md


def test_patient_kfold_sweep_shows_folds_and_a_patient_pooled_interval(tmp_path) -> None:
    root = str(tmp_path / "root")
    folds = [
        _write_honest_run(
            root,
            "dalaresnet50",
            40,
            0,
            scheme="patient-kfold",
            fold=k,
            patients=[f"B{2 * k + i}" for i in range(2)] + [f"M{3 * k + i}" for i in range(3)],
        )
        for k in range(3)
    ]
    written = build_report(root)
    metrics = json.loads(storage.read_bytes(written["metrics.json"]))
    (group,) = metrics["groups"]
    assert group["n_runs"] == 3 and group["folds"] == [0, 1, 2] and group["seeds"] == [0]
    accuracy = [r["metrics"]["test"]["image"]["accuracy"] for r in folds]
    assert group["test"]["accuracy"]["std"] == pytest.approx(np.std(accuracy, ddof=1))
    (pooled,) = group["pooled"]
    assert (pooled["n_patients"], pooled["n_images"]) == (15, 120)
    assert pooled["patients_tested_more_than_once"] == 0 and pooled["folds_expected"] == 3

    # The pooled interval is bootstrap_ci over the three folds' predictions, by patient.
    frames = [
        pd.read_parquet(tmp_path / "root" / "runs" / r["run_id"] / "test_predictions.parquet")
        for r in folds
    ]
    frame = pd.concat(frames, ignore_index=True)
    pred = (frame["prob_malignant"] >= 0.5).astype(int)
    expected = bootstrap_ci(
        frame["y_true"], pred, metrics=POOLED_METRICS, groups=frame["patient_id"]
    )
    intervals = {i["metric"]: i for i in pooled["intervals"]}
    for metric, (low, high) in expected.items():
        assert (intervals[metric]["low"], intervals[metric]["high"]) == (low, high)
        assert intervals[metric]["unit"] == "patient" and intervals[metric]["n_units"] == 15

    md = storage.read_bytes(written["report.md"]).decode()
    section = _part(md, "### k-fold sweep: across folds and pooled")
    row = _md_row(section, "DALAResNet50", "40X", "0", "0, 1, 2", "15", "120")
    acc = group["test"]["accuracy"]
    assert f"| {acc['mean']:.3f} ± {acc['std']:.3f} |" in row
    assert f"{pooled['image']['gmean']:.3f} {fmt_interval(intervals['gmean'])} |" in row
    assert "15 patients" in row
    assert "Averaged over" in md and "3 runs (folds 0, 1, 2; seed 0)" in md


def test_runs_from_before_the_new_keys_show_dashes_and_gmean_for_iba(tmp_path) -> None:
    root = str(tmp_path / "root")
    summary = _write_run(root, "dalaresnet50", 40, 0)
    # A summary as written before intervals named their unit and before iba_macro existed.
    test = summary["metrics"]["test"]
    del test["intervals"], test["threshold"]
    for level in ("image", "patient"):
        del test[level]["iba_macro"]
    run_json = tmp_path / "root" / "runs" / summary["run_id"] / "run.json"
    run_json.write_text(json.dumps(summary))
    written = build_report(root)

    metrics = json.loads(storage.read_bytes(written["metrics.json"]))
    (group,) = metrics["groups"]
    (run,) = metrics["runs"]
    gmean = test["image"]["gmean"]
    assert group["test"]["iba_macro"]["mean"] == gmean and run["filled_in"] == ["iba_macro"]
    assert run["config_hash"] == config_hash(summary["config"], None) == group["config_hash"]
    md = storage.read_bytes(written["report.md"]).decode()
    dala = _md_row(_part(md, TABLE6_HEADING), "DALAResNet50")
    assert dala.count(f"{gmean:.3f} (paper 0.980)") == 2  # the IBA and G-mean cells
    assert "1 of these runs predate `iba_macro`" in md
    cells = _md_row(md, f"`{summary['run_id']}`")
    ci = test["ci"]["gmean"]
    assert f"| [{ci[0]:.3f}, {ci[1]:.3f}], optimistic |" in cells  # image-resampled, no count
    assert "| — |" in cells  # no patient interval, no threshold
    for absent in (
        "### Operating threshold",
        "### Errors by subtype",
        "### k-fold",
        "reliability_",
    ):
        assert absent not in md
    assert not any(name.startswith("reliability") for name in written)


def test_iba_column_is_imbalanced_learns_default_form() -> None:
    """Table 6's IBA column reads iba_macro, never G-mean or the binary iba_unsquared."""
    ours = {"accuracy": 0.9, "f1_minority": 0.8, "f1_weighted": 0.9, "gmean": 0.85}
    ours |= {"iba_macro": 0.7, "iba_unsquared": 0.95, "iba": 0.6}
    assert table6_row(ours)["IBA"] == "0.700" and table6_row(ours)["G-mean"] == "0.850"
    # The paper's IBA equals its G-mean within 0.002 in all 36 cells: the default (macro) form,
    # which is why the paper's IBA is set beside our iba_macro.
    cells = [paper_metrics(model, mag) for model in PAPER_RESULTS for mag in ALL_MAGS]
    assert len([c for c in cells if c]) >= 36
    for paper in cells:
        assert abs(paper["iba_macro"] - paper["gmean"]) <= 0.002 + 1e-9
