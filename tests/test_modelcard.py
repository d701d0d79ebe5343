"""Model cards on a real tiny training run: the block in best/config.json, MODEL_CARD.md, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dala_model import modelcard, storage
from dala_model.cli import main as dala
from dala_model.data import synth
from dala_model.data.ingest import ingest
from dala_model.data.manifest import read_manifest
from dala_model.data.splits import make_split, read_split, split_identity
from dala_model.engine.config import TrainConfig
from dala_model.engine.train import train
from dala_model.models.checkpoint import load_model, read_model_config
from dala_model.serving import promotion

MAG, SIZE = 40, 32


@pytest.fixture(scope="module")
def run(module_tmp) -> dict:
    """One real 1-epoch 40X run at 32 px on 8 synthetic patients, patient-disjoint split."""
    base = module_tmp("modelcard")
    source, root = str(base / "source"), str(base / "root")
    synth.generate(source, patients=8, images_per_patient=2, seed=0, size=(128, 96))
    ingest(source, root, cache_size=SIZE)
    make_split(root, "patient", seed=0)
    config = TrainConfig(
        root=root,
        magnification=MAG,
        epochs=1,
        batch_size=8,
        image_size=SIZE,
        monitor="val_loss",
        device="cpu",
    )
    result = train(config)
    summary = json.loads(Path(result.run_uri, "run.json").read_text())
    return {"root": root, "result": result, "summary": summary, "base": base}


def _copy_run(run: dict, root: Path) -> str:
    """The trained run folder under another root (so a test may change it or promote it)."""
    target = root / "runs" / run["result"].run_id
    shutil.copytree(run["result"].run_uri, target)
    return str(target)


def test_a_finished_run_writes_the_card_into_best_config(run):
    best = run["result"].best_model_uri
    config = read_model_config(best)
    card = modelcard.ModelCard.parse(config[modelcard.METADATA_KEY], best)
    summary = run["summary"]

    assert card.schema_version == "dala-model-card/1" and card.schema_version in card.changelog
    assert "not to be used for diagnostic purposes" in card.intended_use
    assert card.intended_use.startswith("Research use; not for diagnosis")
    assert card.model_version == config["weights_sha256"]
    assert (card.model, card.magnification, card.run_id) == ("dalaresnet50", MAG, summary["run_id"])

    spec = card.network_data_format.inputs["image"]
    assert spec.spatial_shape == [SIZE, SIZE] and spec.num_channels == 3
    assert spec.channel_order == "RGB" and spec.preset == "paper" == config["preset"]
    assert spec.mean == [0.5, 0.5, 0.5] and spec.std == [0.5, 0.5, 0.5]
    assert spec.value_range == [-1.0, 1.0] and spec.magnification == MAG
    out = card.network_data_format.outputs["pred"]
    assert out.channel_def == {"0": "benign", "1": "malignant"} and out.num_channels == 2

    # The threshold serving reads, the card's and the run's are one value, from validation.
    assert card.threshold.value == config["card"]["threshold"] == summary["threshold"]["threshold"]
    assert card.threshold.chosen_on == "val"
    assert card.threshold.source == summary["threshold"]["reason"]

    data = card.training_data
    identity = split_identity(run["root"], "patient")
    assert data.split_hash == summary["split"]["hash"] == identity["hash"] is not None
    assert data.manifest_version == summary["data_version"]
    assert data.split_scheme == "patient" and data.group_by == "patient"
    # Counts add up to the split file's rows at this magnification, per split and class.
    split = read_split(run["root"], "patient")
    manifest = read_manifest(run["root"])[["image_id", "label_id", "patient_id"]]
    rows = split[split["magnification"] == MAG].merge(manifest, on="image_id")
    assert set(data.counts) == {"train", "val", "test"}
    for name, count in data.counts.items():
        part = rows[rows["split"] == name]
        assert count.images == len(part) == count.benign.images + count.malignant.images
        assert count.patients == part["patient_id"].nunique()
        assert count.patients == count.benign.patients + count.malignant.patients
        assert count.benign.images == int((part["label_id"] == 0).sum())
    assert sum(c.images for c in data.counts.values()) == len(rows)
    assert data.manifest_images == len(manifest)

    metrics = card.metrics
    assert metrics is not None and metrics.threshold == card.threshold.value
    assert metrics.image["n"] == data.counts["test"].images
    assert metrics.image["accuracy"] == summary["metrics"]["test_at_threshold"]["image"]["accuracy"]
    units = {(r.scope, r.unit, r.optimistic) for r in metrics.intervals}
    assert ("image", "image", True) in units and ("image", "patient", False) in units
    assert all(r.low <= r.high for r in metrics.intervals)

    joined = " ".join(card.limitations)
    assert (
        "Single centre" in joined
        and f"Magnification-specific: trained, validated and tested on {MAG}X" in joined
    )
    assert "patient-disjoint" in joined and "leak" not in joined
    assert "does not record whether its images are synthetic" in joined  # ingest did not say


def test_markdown_says_intended_use_limitations_and_data(run):
    card = modelcard.read_card(run["result"].best_model_uri)
    text = modelcard.to_markdown(card)
    assert "## Intended use" in text and "not to be used for diagnostic purposes" in text
    assert "## Limitations" in text and "Single centre" in text and f"{MAG}X images only" in text
    assert card.training_data.split_hash in text and card.model_version in text
    assert "| test |" in text and "resampled" in text


def test_the_paper_split_card_says_patients_leak(run):
    best = run["result"].best_model_uri
    summary = {
        **run["summary"],
        "scheme": "paper",
        "split": {**run["summary"]["split"], "scheme": "paper", "group_by": "image"},
    }
    counts = modelcard.read_card(best).training_data.counts
    planted = "<img src=x onerror=alert(1)>"
    manifest = {"synthetic": True, "source": planted}
    card = modelcard.build_card(read_model_config(best), summary, counts, manifest)
    joined = " ".join(card.limitations)
    assert "patients leak across splits" in joined and "arXiv:1909.06539" in joined
    assert "patient-disjoint" not in joined
    assert "Synthetic data" in joined and card.training_data.synthetic is True
    text = modelcard.to_markdown(card)
    assert "&lt;img src=x onerror=alert(1)>" in text and "<img" not in text  # inert as HTML


def test_promotion_writes_model_card_md_and_models_current_prints_the_card(run, tmp_path, capsys):
    root = tmp_path / "root"
    run_uri = _copy_run(run, root)
    result = promotion.promote(str(root), run_uri)
    assert result.promoted
    record = result.current
    folder = promotion.registry_uri(str(root), record.model, record.magnification)
    written = storage.join(folder, "MODEL_CARD.md")  # promote() wrote it beside the pointer
    text = Path(written).read_text()
    assert modelcard.write_model_card(record.checkpoint_uri, folder) == written
    assert Path(written).read_text() == text  # derived from the checkpoint alone
    # A pointer promoted before cards existed gets its card on a no-op re-promotion.
    Path(written).unlink()
    assert not promotion.promote(str(root), run_uri).promoted and Path(written).exists()
    assert text.startswith("# Model card: dalaresnet50 40X")
    assert "not to be used for diagnostic purposes" in text and record.model_version in text
    # The pointer listing still finds exactly the one served model beside the card.
    assert [r.model_version for r in promotion.current_records(str(root))] == [record.model_version]

    card = modelcard.read_card(record.checkpoint_uri)
    capsys.readouterr()
    assert dala(["models", "current", str(root)]) == 0
    out = capsys.readouterr().out
    assert "model card (dala-model-card/1): Research use; not for diagnosis" in out
    assert f"input: 3x{SIZE}x{SIZE} RGB" in out and "preset paper" in out
    assert f"p >= {card.threshold.value:.4g}" in out
    assert card.training_data.split_hash in out and "Single centre" in out

    assert dala(["models", "current", str(root), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [entry["model_version"] for entry in listed] == [record.model_version]
    assert listed[0]["model_card"] == modelcard.card_json(card)
    assert listed[0]["model_card"]["training_data"]["split_hash"] == run["summary"]["split"]["hash"]


def test_an_old_checkpoint_without_a_card_still_loads_and_says_not_recorded(run, tmp_path, capsys):
    root = tmp_path / "root"
    run_uri = _copy_run(run, root)
    best = storage.join(run_uri, "best")
    config_file = Path(best, "config.json")
    config = json.loads(config_file.read_text())
    del config[modelcard.METADATA_KEY]
    config_file.write_text(json.dumps(config))

    assert modelcard.METADATA_KEY not in read_model_config(best)
    assert load_model(best).training is False
    assert modelcard.read_card(best) is None
    text = modelcard.to_markdown(None, checkpoint=config)
    assert "Model card: not recorded" in text and config["weights_sha256"] in text

    assert promotion.promote(str(root), run_uri).promoted
    capsys.readouterr()
    assert dala(["models", "current", str(root)]) == 0
    assert "model card: not recorded" in capsys.readouterr().out
    assert dala(["models", "current", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["model_card"] is None


def test_a_card_of_an_unknown_schema_fails_naming_the_file(run, tmp_path):
    best = tmp_path / "best"
    shutil.copytree(run["result"].best_model_uri, best)
    config = json.loads((best / "config.json").read_text())
    config[modelcard.METADATA_KEY]["schema_version"] = "dala-model-card/9"
    (best / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"best/config\.json is not a valid ModelCard.*card/9"):
        modelcard.read_card(str(best))


def test_write_model_card_is_atomic_on_each_backend(run, storage_root):
    folder = promotion.registry_uri(storage_root, "dalaresnet50", MAG)
    uri = modelcard.write_model_card(run["result"].best_model_uri, folder)
    text = storage.read_bytes(uri).decode()
    assert "## Limitations" in text and "Research use; not for diagnosis" in text
    assert storage.list_files(folder) == [uri]  # no temporary file left beside it
