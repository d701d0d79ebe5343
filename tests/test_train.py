"""The training engine on real synthetic BreakHis data: it learns, it resumes exactly, it refuses bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError

from dala_model import load_model, storage
from dala_model.cli import UsageError
from dala_model.data.ingest import ingest
from dala_model.data.splits import make_split
from dala_model.data.synth import generate
from dala_model.device import resolve_precision
from dala_model.engine.config import TrainConfig
from dala_model.engine.inference import predict_proba
from dala_model.engine.sampling import epoch_order
from dala_model.engine.train import RunConflict, _beats, train

SIZE = 64
MAG = 400


@pytest.fixture(scope="module")
def synth_root(module_tmp) -> str:
    """Synthetic BreakHis archive (40 patients) -> manifest + 64px cache + image-level split.

    The learning tests use the ``paper`` split: at 64 px only the coarse class cues (nuclear
    density, stain darkness) survive, and a few CPU epochs of a from-scratch ResNet50 do not
    generalise them to unseen patients reliably. These tests check that the engine learns; honest
    patient-level accuracy needs full-size runs (see bench/ and the README).
    """
    base = module_tmp("synth")
    generate(str(base / "source"), patients=40, images_per_patient=4, seed=0, size=(350, 230))
    root = str(base / "root")
    ingest(str(base / "source"), root, cache_size=SIZE)
    make_split(root, "paper", seed=0)
    return root


def quick_config(root: str, **overrides) -> TrainConfig:
    fields = dict(
        root=root,
        magnification=MAG,
        scheme="paper",
        image_size=SIZE,
        epochs=8,
        batch_size=16,
        lr=1e-3,
    )
    return TrainConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def learned_run(synth_root):
    return train(quick_config(synth_root))


def test_training_learns_the_class_signal(learned_run, synth_root):
    # Ranking (AUC) holds whatever the kernels; G-mean is asserted at the threshold the run chose
    # on validation, since at 0.5 a short run may call every image one class on some CPUs.
    test = learned_run.metrics["test"]["image"]
    assert test["roc_auc"] > 0.8, test
    at_threshold = learned_run.metrics["test_at_threshold"]["image"]
    assert at_threshold["gmean"] > 0.6, at_threshold
    assert at_threshold["roc_auc"] == test["roc_auc"]  # same probabilities, other cut
    run = Path(learned_run.run_uri)
    history = pd.read_parquet(run / "history.parquet")
    assert list(history["epoch"]) == list(range(8))
    assert {
        "train_loss",
        "val_loss",
        "val_acc",
        "val_gmean",
        "lr",
        "images_per_s",
        "epoch_seconds",
    } <= set(history)
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    summary = json.loads((run / "run.json").read_text())
    assert summary["status"] == "complete" and summary["parameters"] == 25_611_842
    assert summary["data_version"] and summary["code_version"]
    assert 0 <= summary["best_epoch"] < 8


def test_shuffled_labels_stay_near_chance(synth_root, tmp_path):
    """Same data and recipe, labels permuted across images: nothing real to learn, AUC stays near 0.5.

    Each image becomes its own "patient" so the permuted labels stay consistent per patient (the
    metrics refuse a patient with two diagnoses) and no patient identity can carry a label.
    """
    root = tmp_path / "shuffled"
    shutil.copytree(synth_root, root, ignore=shutil.ignore_patterns("runs"))
    manifest_path = root / "manifests" / "manifest.parquet"
    table = pq.read_table(manifest_path)
    labels = np.random.default_rng(1).permutation(table.column("label_id").to_numpy())
    replacements = {"label_id": labels, "patient_id": table.column("image_id")}
    for name, values in replacements.items():
        index = table.schema.get_field_index(name)
        table = table.set_column(
            index, table.schema.field(name), pa.array(values, table.schema.field(name).type)
        )
    pq.write_table(table, manifest_path)
    result = train(quick_config(str(root)))
    assert abs(result.metrics["test"]["image"]["roc_auc"] - 0.5) < 0.25


def test_best_model_round_trip_reproduces_test_predictions(learned_run):
    model = load_model(learned_run.best_model_uri)
    predictions = pd.read_parquet(Path(learned_run.run_uri) / "test_predictions.parquet")
    from dala_model.data.cache import load_images

    images = load_images(
        str(Path(learned_run.run_uri).parents[1]), predictions["image_id"].tolist(), SIZE
    )
    # The run evaluated with the precision and layout it measured on this machine (run.json's
    # `tuning`); the reloaded model, run the same way, gives the same probabilities.
    tuning = json.loads((Path(learned_run.run_uri) / "run.json").read_text())["tuning"]
    device = torch.device("cpu")
    if tuning["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    prob = predict_proba(
        model,
        images,
        preset="paper",
        device=device,
        dtype=resolve_precision(tuning["precision"], device),
        channels_last=tuning["channels_last"],
    )
    np.testing.assert_allclose(prob, predictions["prob_malignant"], atol=1e-5)
    assert set(predictions.columns) >= {
        "image_id",
        "patient_id",
        "y_true",
        "prob_malignant",
        "y_pred",
    }


def test_completed_run_is_skipped_and_conflicting_run_refused(learned_run, synth_root):
    again = train(quick_config(synth_root))
    assert again.status == "skipped" and again.best_epoch == learned_run.best_epoch
    with pytest.raises(RunConflict, match="lr"):
        train(quick_config(synth_root, lr=5e-4, run_id=learned_run.run_id))


def test_a_run_is_never_resumed_or_skipped_on_another_split(learned_run, synth_root):
    summary = json.loads((Path(learned_run.run_uri) / "run.json").read_text())
    recorded = json.loads((Path(learned_run.run_uri) / "config.json").read_text())["split"]
    assert summary["split"] == recorded and recorded["hash"] and recorded["seed"] == 0
    assert summary["config_hash"] and summary["tuning"]["precision"] in ("fp32", "bf16")
    try:
        make_split(synth_root, "paper", seed=1)  # `dala split --seed 1`: another assignment
        with pytest.raises(RunConflict, match="split"):
            train(quick_config(synth_root))  # a finished run on the old split is not "skipped"
        with pytest.raises(RunConflict, match="split"):
            train(quick_config(synth_root, resume=True))
    finally:
        make_split(synth_root, "paper", seed=0)  # the same seed gives the same hash back
    assert train(quick_config(synth_root)).status == "skipped"


def test_threshold_is_chosen_on_validation_and_stored_on_the_model_card(learned_run):
    run = Path(learned_run.run_uri)
    summary = json.loads((run / "run.json").read_text())
    chosen = summary["threshold"]
    assert 0.0 <= chosen["threshold"] <= 1.0 and chosen["gmean"] >= chosen["gmean_at_0.5"]
    card = json.loads((run / "best" / "config.json").read_text())["card"]
    assert card["threshold"] == chosen["threshold"]
    at = summary["metrics"]["test_at_threshold"]
    assert at["threshold"] == chosen["threshold"]
    predictions = pd.read_parquet(run / "test_predictions.parquet")
    expected = (predictions["prob_malignant"] >= chosen["threshold"]).astype(int)
    assert at["image"]["confusion_matrix"][1][1] == int(
        ((expected == 1) & (predictions["y_true"] == 1)).sum()
    )
    calibration = summary["metrics"]["calibration"]
    assert sum(b["count"] for b in calibration["bins"]) == len(predictions)
    assert 0.0 <= calibration["brier"] <= 1.0 and 0.0 <= calibration["ece"] <= 1.0
    subtypes = summary["metrics"]["subtypes"]
    assert sum(v["n"] for v in subtypes.values()) == len(predictions)


def test_killed_run_resumes_to_the_uninterrupted_result(synth_root):
    """SIGKILL `dala train` after its first checkpoint; `--resume` matches an uninterrupted run.

    All three runs are fresh processes with the same environment (thread count included): exact
    replay needs the same floating-point reduction order, which this process's earlier tests
    could have changed. Each gets this test process's thread count (one per core it was given),
    so the resumed and the clean run, which run at once, do not oversubscribe the cores. Two
    epochs: the kill lands after the first, so the resumed run replays one epoch from the
    checkpoint (weights, optimiser and RNG) and its evaluation.
    """

    def dala_train(run_id: str, *extra: str) -> subprocess.Popen:
        args = [sys.executable, "-m", "dala_model.cli", "train", synth_root, "--magnification", str(MAG),
                "--scheme", "paper", "--epochs", "2", "--batch-size", "16", "--lr", "1e-3",
                "--image-size", str(SIZE), "--run-id", run_id, *extra]  # fmt: skip
        threads = str(torch.get_num_threads())
        env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)

    runs = Path(synth_root) / "runs"
    checkpoint = runs / "killed" / "checkpoint.pt"
    proc = dala_train("killed")
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists(), "the subprocess never checkpointed its first epoch"
    assert not (runs / "killed" / "run.json").exists(), "killed too late to test resume"
    interrupted_at = torch.load(checkpoint, weights_only=True)["state"]["epoch"]
    assert interrupted_at == 0

    for proc in (dala_train("killed", "--resume"), dala_train("clean")):
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr.decode()[-2000:]
    a = pd.read_parquet(runs / "killed" / "history.parquet")
    b = pd.read_parquet(runs / "clean" / "history.parquet")
    assert list(a["epoch"]) == [0, 1]
    np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(a["val_loss"], b["val_loss"], rtol=1e-4)
    resumed, clean = (json.loads((runs / r / "run.json").read_text()) for r in ("killed", "clean"))
    assert resumed["best_epoch"] == clean["best_epoch"]
    wa = load_model(str(runs / "killed" / "best")).state_dict()
    wb = load_model(str(runs / "clean" / "best")).state_dict()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)


def test_unfinished_run_needs_resume(synth_root):
    root = Path(synth_root)
    folder = root / "runs" / "unfinished"
    folder.mkdir(parents=True)
    config = quick_config(synth_root, run_id="unfinished", epochs=1)
    storage.write_bytes_atomic(
        str(folder / "config.json"), json.dumps({"config": config.model_dump(mode="json")}).encode()
    )
    (folder / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(RunConflict, match="resume"):
        train(config)


def test_best_epoch_ties_go_to_the_lower_validation_loss():
    best = {"epoch": 0, "score": 0.75, "val": {"accuracy": 0.75, "loss": 0.53, "gmean": 0.0}}
    assert _beats("val_accuracy", {"accuracy": 0.75, "loss": 0.38, "gmean": 0.0}, best)
    assert not _beats("val_accuracy", {"accuracy": 0.75, "loss": 0.60, "gmean": 0.0}, best)
    assert not _beats("val_accuracy", {"accuracy": 0.75, "loss": 0.53, "gmean": 0.0}, best)
    assert not _beats("val_accuracy", {"accuracy": 0.70, "loss": 0.10, "gmean": 0.5}, best)
    assert _beats("val_accuracy", {"accuracy": 0.80, "loss": 0.90, "gmean": 0.5}, best)
    by_loss = {"epoch": 0, "score": -0.53, "val": {"accuracy": 0.75, "loss": 0.53}}
    assert _beats("val_loss", {"accuracy": 0.5, "loss": 0.52}, by_loss)
    assert not _beats("val_loss", {"accuracy": 0.9, "loss": 0.53}, by_loss)
    assert _beats("val_gmean", {"gmean": 0.1, "loss": 9.0}, {"epoch": -1, "score": None, "val": {}})


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    labels = np.array([0] * 10 + [1] * 30)
    first = epoch_order(labels, seed=3, epoch=2, imbalance="none")
    assert np.array_equal(first, epoch_order(labels, seed=3, epoch=2, imbalance="none"))
    assert not np.array_equal(first, epoch_order(labels, seed=3, epoch=3, imbalance="none"))
    assert sorted(first) == list(range(40))
    balanced = epoch_order(labels, seed=3, epoch=2, imbalance="oversample")
    assert np.bincount(labels[balanced]).tolist() == [30, 30]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"magnification": 50}, "magnification"),
        ({"model": "resnet51"}, "model"),
        ({"epochs": 0}, "epochs"),
        ({"scheme": "patient-kfold"}, "fold"),
        ({"device": "gpu0"}, "device"),
        ({"run_id": "../escape"}, "run_id"),
    ],
)
def test_bad_parameters_are_rejected_by_name(overrides, field):
    with pytest.raises(ValidationError, match=field):
        TrainConfig(**{"root": "/tmp/x", "magnification": 40, **overrides})


def test_cli_reports_bad_parameter_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dala_model.cli", "train", str(tmp_path), "--magnification", "50"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "--magnification" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_config_file_reproduces_a_recorded_run_and_flags_override_it(tmp_path):
    from dala_model.cli import build_parser
    from dala_model.cli.train import config_from_args

    recorded = TrainConfig(root=str(tmp_path), magnification=200, epochs=7, seed=3, lr=3e-4)
    run_file = tmp_path / "config.json"  # a run folder's config.json: the config under "config"
    run_file.write_text(json.dumps({"config": recorded.model_dump(mode="json"), "run_id": "x"}))
    parser = build_parser()
    assert config_from_args(parser.parse_args(["train", "--config", str(run_file)])) == recorded
    overridden = config_from_args(
        parser.parse_args(["train", "--config", str(run_file), "--epochs", "2", "--resume"])
    )
    assert overridden == recorded.model_copy(update={"epochs": 2, "resume": True})
    resumable = tmp_path / "resumable.json"  # a flag can also switch a file's True off
    resumable.write_text(json.dumps({**recorded.model_dump(mode="json"), "resume": True}))
    args = parser.parse_args(["train", "--config", str(resumable), "--no-resume", "--no-cache"])
    assert config_from_args(args) == recorded.model_copy(update={"use_cache": False})
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({**recorded.model_dump(mode="json"), "colour": "red"}))
    with pytest.raises(UsageError, match="--colour: Extra inputs are not permitted"):
        config_from_args(parser.parse_args(["train", "--config", str(plain)]))
