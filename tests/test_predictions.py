"""Batch inference library: incremental, idempotent Parquet predictions from the current model."""

from __future__ import annotations

import threading

import fsspec
import numpy as np
import pytest
import torch

from dala_model import storage
from dala_model.data import synth
from dala_model.data.dataset import decode_pngs
from dala_model.data.ingest import ingest
from dala_model.data.manifest import read_manifest
from dala_model.data.splits import make_split
from dala_model.engine.config import TrainConfig
from dala_model.engine.inference import fold_batchnorm, predict_proba
from dala_model.engine.train import train
from dala_model.models.checkpoint import load_model
from dala_model.serving import predictions, promotion

COLUMNS = {
    "image_id",
    "uri",
    "magnification",
    "patient_id",
    "prob_malignant",
    "pred_label",
    "threshold",
    "model_name",
    "model_version",
    "flow_run_id",
    "scored_at",
}


@pytest.fixture(scope="module")
def trained_root(module_tmp) -> str:
    """A local root with a manifest, a 32 px cache and one complete 40X run (not yet promoted)."""
    base = module_tmp("predictions")
    source, root = str(base / "source"), str(base / "root")
    synth.generate(source, patients=8, images_per_patient=3, seed=1, size=(128, 96))
    ingest(source, root, cache_size=32)
    make_split(root, "patient", seed=0)
    train(
        TrainConfig(
            root=root, magnification=40, epochs=1, batch_size=8, image_size=32, device="cpu"
        )
    )
    return root


@pytest.fixture
def served_root(storage_root, trained_root) -> str:
    """``trained_root`` copied to the storage backend under test, its run promoted there."""
    local = fsspec.filesystem("file")
    for name in ("manifests", "cache", "runs"):
        for file in local.find(f"{trained_root}/{name}"):
            storage.write_bytes_atomic(
                storage.join(storage_root, file[len(trained_root) + 1 :]), local.cat_file(file)
            )
    promotion.promote(
        storage_root, storage.join(storage_root, "runs", "dalaresnet50-40x-patient-seed0")
    )
    return storage_root


def raw_rows(root: str) -> int:
    uris = storage.list_files(
        predictions.predictions_uri(root, "dalaresnet50"), suffixes=(".parquet",)
    )
    return sum(len(storage.read_parquet(u)) for u in uris)


def test_scores_once_per_model_version(served_root):
    manifest = read_manifest(served_root)
    at40 = manifest[manifest["magnification"] == 40].sort_values("image_id")
    record = promotion.current_record(served_root, "dalaresnet50", 40)

    first = predictions.score_magnification(  # fp32: compared with fp32 probabilities below
        served_root, "dalaresnet50", 40, flow_run_id="run-a", chunk_size=5, precision="fp32"
    )
    assert first.scored == len(at40) and first.skipped == 0
    assert len(first.parts) == -(-len(at40) // 5)
    table = predictions.read_predictions(served_root, "dalaresnet50")
    assert COLUMNS <= set(table.columns) and len(table) == len(at40)
    assert set(table["model_version"]) == {record.model_version} and set(table["flow_run_id"]) == {
        "run-a"
    }
    assert ((table["prob_malignant"] >= 0.5).astype(int) == table["pred_label"]).all()

    # The cached pixels score like freshly decoded PNGs through the same model, with the scorer's
    # arithmetic (BatchNorm folded, tests/test_fold.py): the unfolded model differs by rounding
    # alone, and by more than 1e-4 under AVX2 kernels (1.3e-4 measured), which is not this check.
    model = load_model(record.checkpoint_uri)
    assert fold_batchnorm(model) == 53
    expected = predict_proba(
        model, decode_pngs(at40, 32), preset="paper", device=torch.device("cpu")
    )
    got = table.set_index("image_id").loc[at40["image_id"], "prob_malignant"].to_numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)

    # The labelled batch gets its IBA / G-mean report.
    labels = at40.set_index("image_id").loc[table["image_id"], "label_id"].to_numpy()
    assert first.metrics["n"] == len(at40)
    assert first.metrics["accuracy"] == pytest.approx(float((labels == table["pred_label"]).mean()))
    assert {"iba", "iba_unsquared", "gmean"} <= set(first.metrics)
    assert storage.exists(first.report_uri)

    again = predictions.score_magnification(
        served_root, "dalaresnet50", 40, flow_run_id="run-b", chunk_size=5
    )
    assert again.scored == 0 and again.skipped == len(at40) and again.metrics is None
    assert raw_rows(served_root) == len(at40)


def test_retry_of_a_run_rewrites_only_missing_parts(served_root):
    first = predictions.score_magnification(
        served_root, "dalaresnet50", 40, flow_run_id="run-a", chunk_size=4
    )
    total = first.scored
    fs, path = storage.filesystem(first.parts[-1])
    fs.rm(path)  # as if the run died before its last part landed
    retry = predictions.score_magnification(
        served_root, "dalaresnet50", 40, flow_run_id="run-a", chunk_size=4
    )
    assert retry.parts == [first.parts[-1]] and retry.scored == total - (len(first.parts) - 1) * 4
    assert raw_rows(served_root) == total
    assert retry.metrics["n"] == total  # the batch report covers the whole run, not just the retry


def test_concurrent_runs_never_duplicate_rows(served_root):
    results = {}

    def run(name: str) -> None:
        results[name] = predictions.score_magnification(
            served_root, "dalaresnet50", 40, flow_run_id=name
        )

    threads = [threading.Thread(target=run, args=(name,)) for name in ("left", "right")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    n = results["left"].scored + results["left"].skipped
    assert raw_rows(served_root) == n  # same pending set -> same content-keyed parts
    assert len(predictions.read_predictions(served_root, "dalaresnet50")) == n

    # Racing runs that chunked differently may both store an image; readers still get one row.
    part = results["left"].parts[0] if results["left"].parts else results["right"].parts[0]
    fs, path = storage.filesystem(part)
    fs.pipe_file(path.replace("part-", "part-racer-"), fs.cat_file(path))
    assert raw_rows(served_root) > n
    table = predictions.read_predictions(served_root, "dalaresnet50")
    assert len(table) == n and not table.duplicated(["image_id", "model_version"]).any()


def test_a_racing_run_rewriting_our_parts_does_not_shrink_our_report(served_root, monkeypatch):
    """The racer scores the same pending set, so it rewrites each of our parts (same key, same
    rows) with its own flow_run_id right after we write it; our report still covers every
    image we scored (it used to cover only the rows still attributed to us)."""
    write = storage.write_parquet_atomic

    def write_then_racer_overwrites(frame, uri, **kwargs):
        write(frame, uri, **kwargs)
        if "/predictions/model=" in uri:
            write(frame.assign(flow_run_id="racer"), uri, **kwargs)

    monkeypatch.setattr(storage, "write_parquet_atomic", write_then_racer_overwrites)
    ours = predictions.score_magnification(
        served_root, "dalaresnet50", 40, flow_run_id="ours", chunk_size=4
    )
    table = predictions.read_predictions(served_root, "dalaresnet50")
    assert ours.scored > 4 and set(table["flow_run_id"]) == {"racer"}
    assert ours.metrics["n"] == ours.scored


def test_clear_errors(served_root, tmp_path):
    with pytest.raises(ValueError, match="threshold"):
        predictions.score_magnification(
            served_root, "dalaresnet50", 40, flow_run_id="x", threshold=1.5
        )
    with pytest.raises(LookupError, match="dala promote"):
        predictions.score_magnification(served_root, "dalaresnet50", 200, flow_run_id="x")
