"""The storage-backed model registry on real training runs, locally and on the S3 endpoint."""

from __future__ import annotations

import hashlib

import fsspec
import pytest

from dala_model import storage
from dala_model.cli import main as dala
from dala_model.data import synth
from dala_model.data.ingest import ingest
from dala_model.data.manifest import manifest_version
from dala_model.data.splits import make_split
from dala_model.engine.config import TrainConfig
from dala_model.engine.train import train
from dala_model.models.checkpoint import read_model_config
from dala_model.runs import load_summary
from dala_model.serving import promotion


@pytest.fixture(scope="module")
def trained(module_tmp) -> dict:
    """Two real 40X runs (seeds 0 and 1) on tiny synthetic data, monitored on validation loss.

    Validation loss is continuous, so the two runs differ and one is strictly better.
    """
    base = module_tmp("registry")
    source, root = str(base / "source"), str(base / "root")
    synth.generate(source, patients=8, images_per_patient=2, seed=0, size=(128, 96))
    ingest(source, root, cache_size=32)
    make_split(root, "patient", seed=0)
    runs = []
    for seed in (0, 1):
        config = TrainConfig(
            root=root,
            magnification=40,
            epochs=1,
            batch_size=8,
            image_size=32,
            seed=seed,
            monitor="val_loss",
            device="cpu",
        )
        runs.append(train(config).run_id)
    return {"root": root, "runs": runs, "data_version": manifest_version(root)}


def copy_runs(trained: dict, target: str) -> dict[str, str]:
    """Put the trained run folders under ``target`` (a local folder or the S3 bucket)."""
    local = fsspec.filesystem("file")
    for run_id in trained["runs"]:
        src = f"{trained['root']}/runs/{run_id}"
        for file in local.find(src):
            storage.write_bytes_atomic(
                storage.join(target, "runs", run_id, file[len(src) + 1 :]), local.cat_file(file)
            )
    return {run_id: storage.join(target, "runs", run_id) for run_id in trained["runs"]}


def ranked(runs: dict[str, str]) -> tuple[str, str]:
    scores = {uri: promotion.ranking_score(load_summary(uri)) for uri in runs.values()}
    worse, better = sorted(scores, key=scores.get)
    assert scores[worse] < scores[better]
    return worse, better


def test_promotes_first_then_only_better_runs(storage_root, trained):
    runs = copy_runs(trained, storage_root)
    worse, better = ranked(runs)
    assert promotion.current_record(storage_root, "dalaresnet50", 40) is None

    first = promotion.promote(storage_root, worse)
    assert first.promoted and first.previous is None
    record = promotion.current_record(storage_root, "dalaresnet50", 40)
    best = storage.join(worse, "best")
    weights = storage.read_bytes(storage.join(best, read_model_config(best)["weights_file"]))
    assert record.model_version == hashlib.sha256(weights).hexdigest()
    assert record.checkpoint_uri == storage.join(worse, "best")
    assert record.data_version == trained["data_version"]
    assert record.code_version and record.config["monitor"] == "val_loss"
    assert record.metrics.test["image"]["n"] > 0

    second = promotion.promote(storage_root, better)
    assert second.promoted and second.current.previous_version == record.model_version
    assert promotion.current_record(storage_root, "dalaresnet50", 40).run_uri == better

    again = promotion.promote(storage_root, worse)  # does not beat the current one
    assert not again.promoted and "does not beat" in again.reason
    assert promotion.current_record(storage_root, "dalaresnet50", 40).run_uri == better
    assert not promotion.promote(storage_root, better).promoted  # already current

    pinned = promotion.promote(storage_root, worse, force=True)
    assert (
        pinned.promoted
        and promotion.current_record(storage_root, "dalaresnet50", 40).run_uri == worse
    )
    log = promotion.promotion_records(storage_root, "dalaresnet50", 40)
    assert [entry.run_uri for entry in log] == [worse, better, worse]
    assert [r.magnification for r in promotion.current_records(storage_root)] == [40]


def test_refuses_a_run_without_summary(tmp_path):
    unfinished = tmp_path / "root" / "runs" / "half-done"
    unfinished.mkdir(parents=True)
    (unfinished / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"run\.json does not exist.*--resume"):
        promotion.promote(str(tmp_path / "root"), str(unfinished))


def test_cli_promotes_best_pins_and_shows_current(tmp_path, trained, capsys):
    root = str(tmp_path / "root")
    runs = copy_runs(trained, root)
    worse, better = ranked(runs)
    assert dala(["promote", root, "--model", "dalaresnet50", "--magnification", "40"]) == 0
    assert promotion.current_record(root, "dalaresnet50", 40).run_uri == better
    worse_id = worse.rsplit("/", 1)[1]
    assert (
        dala(
            ["promote", root, "--model", "dalaresnet50", "--magnification", "40", "--run", worse_id]
        )
        == 0
    )
    assert promotion.current_record(root, "dalaresnet50", 40).reason.startswith(
        "pinned by operator"
    )
    capsys.readouterr()
    assert dala(["models", "current", root]) == 0
    out = capsys.readouterr().out
    assert worse_id in out and "40X" in out and trained["data_version"] in out
    assert "model card (dala-model-card/1): Research use; not for diagnosis" in out
    assert dala(["promote", root, "--model", "dalaresnet50", "--magnification", "200"]) == 2
    assert "no complete dalaresnet50 run at 200X" in capsys.readouterr().err
    pin_elsewhere = ["--model", "dalaresnet50", "--magnification", "100", "--run", worse_id]
    assert dala(["promote", root, *pin_elsewhere]) == 2
    assert "not --model dalaresnet50 --magnification 100" in capsys.readouterr().err
    assert promotion.current_record(root, "dalaresnet50", 100) is None
