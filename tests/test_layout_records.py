"""The storage layout is named once (``dala_model.layout``) and the files read back are records.

Real run folders and registry pointers, written by a real training and promotion, must validate
against the records exactly (unknown keys are refused); older files without ``schema_version``
still load; a misspelt key fails with the file's name.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

import fsspec
import pytest

from dala_model import runs, storage
from dala_model.cli import UsageError
from dala_model.cli.train import config_from_args
from dala_model.data import synth
from dala_model.data.cache import cache_uri
from dala_model.data.ingest import ingest
from dala_model.data.manifest import duplicates_uri, manifest_uri, quarantine_uri
from dala_model.data.splits import make_split, split_uri
from dala_model.engine.config import TrainConfig
from dala_model.engine.train import train
from dala_model.layout import RootLayout
from dala_model.serving import promotion
from dala_model.serving.predictions import predictions_uri

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"manifests", "cache", "splits", "runs", "models", "predictions", "reports", "staging"}
# Modules other work is restructuring; they still join a root folder by hand, to convert next.
PENDING = {
    ("dala_model/report/build.py", "reports"),
}


@pytest.mark.parametrize("root", ["/data/root", "s3://bucket/prefix/"])
def test_every_path_comes_from_the_layout(root: str) -> None:
    layout, base = RootLayout(root), root.rstrip("/")
    expected = {
        manifest_uri(root): f"{base}/manifests/manifest.parquet",
        quarantine_uri(root): f"{base}/manifests/quarantine.parquet",
        duplicates_uri(root): f"{base}/manifests/duplicates.parquet",
        cache_uri(root, 224): f"{base}/cache/224",
        layout.cache_index(64): f"{base}/cache/64/index.parquet",
        split_uri(root, "patient"): f"{base}/splits/patient.parquet",
        runs.runs_uri(root): f"{base}/runs",
        runs.run_folder(root, "r1"): f"{base}/runs/r1",
        promotion.registry_uri(root, "dalaresnet50", 40): f"{base}/models/dalaresnet50/40",
        layout.current_pointer("dalaresnet50", 40): f"{base}/models/dalaresnet50/40/current.json",
        layout.promotion_log("resnet50", 400): f"{base}/models/resnet50/400/promotions",
        predictions_uri(root, "m"): f"{base}/predictions/model=m",
        predictions_uri(
            root, "m", "v", 40
        ): f"{base}/predictions/model=m/version=v/magnification=40",
        layout.batch_report("m", "run-a", 40): f"{base}/predictions/reports/model=m/run-a/40x.json",
        layout.reports("report.html"): f"{base}/reports/report.html",
        layout.staging("ingest-1"): f"{base}/staging/ingest-1",
    }
    assert {got: want for got, want in expected.items() if got != want} == {}
    with pytest.raises(ValueError):
        layout.run("../escape")  # keys are checked by storage.join: nothing leaves the root
    with pytest.raises(ValueError, match="unknown split scheme"):
        split_uri(root, "random")


def test_no_module_joins_a_root_folder_by_hand() -> None:
    """Only layout.py names the folders under a root (``storage.join(x, "runs", ...)``)."""
    found = set()
    for path in [*REPO.glob("dala_model/**/*.py"), *REPO.glob("flows/**/*.py")]:
        relative = path.relative_to(REPO).as_posix()
        if relative == "dala_model/layout.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), relative)):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute | ast.Name)
                and getattr(node.func, "attr", getattr(node.func, "id", None)) == "join"
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value in FOLDERS
            ):
                found.add((relative, node.args[1].value))
    assert found <= PENDING, f"join these through dala_model.layout.RootLayout: {found - PENDING}"


def _old_summary(**changes) -> dict:
    """A run.json as written before ``schema_version``, ``processes`` and ``finished_at``."""
    summary = {
        "status": "complete",
        "run_id": "resnet50-40x-patient-s0",
        "model": "resnet50",
        "magnification": "40X",
        "scheme": "patient",
        "fold": None,
        "seed": 0,
        "parameters": 23_512_130,
        "train_seconds": 12.5,
        "epochs": 2,
        "best_epoch": 1,
        "metrics": {"val": {"accuracy": 0.8, "loss": 0.4}, "test": {"image": {"n": 10}}},
        "data_version": "abc123",
        "code_version": "test",
        "config": {"model": "resnet50", "monitor": "val_loss"},
    }
    summary.update(changes)
    return {k: v for k, v in summary.items() if v is not ...}


def _write(folder: Path, name: str, data: dict) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(data))
    return str(folder)


def test_an_old_run_json_without_schema_version_loads(tmp_path) -> None:
    folder = _write(tmp_path / "runs" / "old", runs.SUMMARY, _old_summary())
    summary = runs.load_summary(folder)
    assert summary.schema_version == 1 and summary.processes == 1
    assert summary.magnification == 40 and summary.monitor == "val_loss"
    assert summary.metrics.val["accuracy"] == 0.8 and summary.complete
    assert runs.read_summary(folder) == _old_summary()  # the raw reader is unchanged
    failed = {"status": "failed", "run_id": "x", "model": "m", "magnification": 400}
    failed |= {"scheme": "patient", "seed": 0}
    assert not runs.load_summary(
        _write(tmp_path / "runs" / "failed", runs.SUMMARY, failed)
    ).complete


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"colour": "red"}, r"colour: Extra inputs are not permitted"),
        ({"metric": {"val": {}}}, r"metric: Extra inputs"),  # a misspelt key
        ({"metrics": ...}, r"status is 'complete' but \['metrics'\] are missing"),
        ({"metrics": {"val": {}, "test": {}}}, r"metrics.test: .*'image'"),
        ({"schema_version": 2}, r"schema_version 2 is not one this code reads"),
        ({"magnification": "forty"}, r"magnification"),
    ],
)
def test_a_bad_run_json_fails_naming_the_file(tmp_path, changes, problem) -> None:
    folder = _write(tmp_path / "runs" / "bad-run", runs.SUMMARY, _old_summary(**changes))
    with pytest.raises(ValueError, match=r"runs/bad-run/run\.json is not a valid RunSummary") as e:
        runs.load_summary(folder)
    assert e.match(problem)
    (folder_path := Path(folder) / runs.SUMMARY).write_text("{not json")
    with pytest.raises(ValueError, match=r"bad-run/run\.json is not valid JSON"):
        runs.load_summary(str(folder_path.parent))


def test_an_unknown_key_in_config_json_or_current_json_fails_naming_it(tmp_path) -> None:
    folder = _write(tmp_path / "runs" / "r", runs.CONFIG, {"config": {}, "run_ID": "r"})
    with pytest.raises(ValueError, match=r"runs/r/config\.json is not a valid RunConfigRecord"):
        runs.load_config(folder)
    assert runs.load_config(_write(tmp_path / "runs" / "old", runs.CONFIG, {"config": {}}))
    pointer = Path(RootLayout(str(tmp_path)).current_pointer("dalaresnet50", 40))
    _write(pointer.parent, pointer.name, {"model": "dalaresnet50", "magnification": 40})
    with pytest.raises(ValueError, match=r"40/current\.json is not a valid RegistryRecord"):
        promotion.current_record(str(tmp_path), "dalaresnet50", 40)


@pytest.fixture(scope="module")
def trained_root(module_tmp) -> str:
    """One real 40X run (1 epoch, 32 px) on tiny synthetic data."""
    base = module_tmp("records")
    source, root = str(base / "source"), str(base / "root")
    synth.generate(source, patients=8, images_per_patient=2, seed=0, size=(128, 96))
    ingest(source, root, cache_size=32)
    make_split(root, "patient", seed=0)
    config = TrainConfig(
        root=root, magnification=40, epochs=1, batch_size=8, image_size=32, device="cpu"
    )
    train(config)
    return root


def test_a_real_training_and_promotion_validate(storage_root, trained_root) -> None:
    local = fsspec.filesystem("file")
    for file in local.find(f"{trained_root}/runs"):
        storage.write_bytes_atomic(
            storage.join(storage_root, file[len(trained_root) + 1 :]), local.cat_file(file)
        )
    (folder,) = runs.list_runs(storage_root)
    summary, config = runs.load_summary(folder.uri), runs.load_config(folder.uri)
    assert summary == folder.record and summary.complete and summary.processes == 1
    assert summary.model_dump(exclude_unset=True) == runs.read_summary(folder.uri)
    assert config.config == summary.config and config.data_version == summary.data_version
    assert config.split_sizes and config.environment["torch"]

    outcome = promotion.promote(storage_root, folder.uri)
    pointer = promotion.current_record(storage_root, "dalaresnet50", 40)
    assert (
        outcome.promoted and outcome.current == pointer and outcome.record == pointer.model_dump()
    )
    assert pointer.schema_version == 1 and pointer.run_id == summary.run_id
    assert pointer.score == summary.metrics.val["accuracy"] and pointer.previous_version is None
    assert promotion.current(storage_root, "dalaresnet50", 40) == pointer.model_dump()
    assert promotion.promotion_records(storage_root, "dalaresnet50", 40) == [pointer]
    assert promotion.current_records(storage_root) == [pointer]


def test_dala_train_config_reads_a_run_folders_config_json(trained_root, tmp_path) -> None:
    folder = runs.run_folder(trained_root, "dalaresnet50-40x-patient-seed0")
    recorded = Path(folder) / runs.CONFIG
    args = argparse.Namespace(config=recorded, epochs=3)
    assert config_from_args(args) == TrainConfig(**{**runs.load_config(folder).config, "epochs": 3})
    broken = tmp_path / "config.json"
    broken.write_text(json.dumps({**json.loads(recorded.read_text()), "colour": "red"}))
    with pytest.raises(UsageError, match=r"config\.json is not a valid RunConfigRecord.*colour"):
        config_from_args(argparse.Namespace(config=broken))
