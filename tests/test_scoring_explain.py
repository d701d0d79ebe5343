"""Heatmaps from batch scoring (``explain=True`` / ``dala predict --explain``): real model, real PNGs.

One tiny dalaresnet50 (40X, 32 px, one epoch) is trained and promoted once; the drop is eight
of its 40X synthetic images, renamed into case folders (noise images saturate its
probabilities at 1). The threshold and the uncertain band are then set from the
model's own probabilities so that the malignant calls, one uncertain benign call and three
confident benign calls are all present, and the test knows which images must be explained.
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from PIL import Image

from dala_model import storage
from dala_model.cli import main as dala
from dala_model.data import synth
from dala_model.data._decode import resize_rgb
from dala_model.data.ingest import ingest
from dala_model.data.manifest import read_manifest
from dala_model.data.splits import make_split
from dala_model.engine.config import TrainConfig
from dala_model.engine.train import train
from dala_model.models.checkpoint import load_model
from dala_model.report.explain import CamTarget
from dala_model.serving import promotion, scoring
from dala_model.serving.drop import decode_rgb
from dala_model.serving.outputs import (
    IMAGE_SCHEMA,
    ScoringLayout,
    read_image_predictions,
    scored_hashes,
)
from dala_model.serving.scoring import DEFAULT_UNCERTAIN_BAND, rebuild_cases, score_source

MODEL, MAG, SIZE = "dalaresnet50", 40, 32
N_IMAGES = 8
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def served(module_tmp) -> dict:
    """A registry root with a promoted 40X model, a drop of 8 PNGs, and the model's calls on it."""
    base = module_tmp("scoring-explain")
    source, root = str(base / "source"), str(base / "root")
    synth.generate(source, patients=8, images_per_patient=2, seed=1, size=(128, 96))
    ingest(source, root, cache_size=SIZE)
    make_split(root, "patient", seed=0)
    config = TrainConfig(
        root=root, magnification=MAG, epochs=1, batch_size=8, image_size=SIZE, device="cpu"
    )
    train(config)
    promotion.promote(root, storage.join(root, "runs", config.resolved_run_id))
    manifest = read_manifest(root)
    drop = str(base / "drop")
    files = {}
    for i, uri in enumerate(sorted(manifest.loc[manifest["magnification"] == MAG, "uri"])[:8]):
        files[f"{drop}/case-{i % 2}/{MAG}X/scan_{i}.png"] = storage.read_bytes(uri)
    for uri, data in files.items():
        storage.write_bytes_atomic(uri, data)
    # Scored once without explain: the model's probabilities, from which the test picks a
    # threshold between the 4th and 5th and a band that takes in the 4th only.
    plain = str(base / "plain")
    score_source(drop, root, plain, device="cpu", precision="fp32", flow_run_id="plain")
    prob = np.sort(read_image_predictions(plain, MODEL)["prob_malignant"].to_numpy(float))
    assert len(prob) == N_IMAGES and (np.diff(prob[1:6]) > 1e-4).all(), prob
    threshold = float(prob[3] + prob[4]) / 2
    band = float((threshold - prob[3]) + (threshold - prob[2])) / 2
    return {
        "root": root,
        "drop": drop,
        "plain": plain,
        "files": files,
        "threshold": threshold,
        "band": band,
    }


def _explained(table: pd.DataFrame) -> set[str]:
    return set(table.loc[table["heatmap_uri"].notna(), "sha256"])


def _heatmap_files(out: str) -> dict[str, bytes]:
    folder = storage.join(out, "explain")
    if not storage.exists(folder):
        return {}
    return {u: storage.read_bytes(u) for u in storage.list_files(folder, suffixes=(".png",))}


def test_explain_writes_heatmaps_for_malignant_and_uncertain_calls_only(served, tmp_path):
    out = str(tmp_path / "out")
    threshold, band = served["threshold"], served["band"]
    result = score_source(
        served["drop"],
        served["root"],
        out,
        threshold=threshold,
        device="cpu",
        precision="fp32",
        explain=True,
        uncertain_band=band,
        flow_run_id="explained",
    )
    (at40,) = [m for m in result.magnifications if m.magnification == MAG]
    table = read_image_predictions(out, MODEL)
    assert list(table.columns) == IMAGE_SCHEMA.names and len(table) == N_IMAGES
    prob = table["prob_malignant"].astype(float)
    malignant = table["pred_label"] == 1
    uncertain = (prob - threshold).abs() <= band
    want = set(table.loc[malignant | uncertain, "sha256"])
    assert malignant.sum() == 4 and (uncertain & ~malignant).sum() == 1  # the set-up holds
    assert _explained(table) == want and len(want) == 5  # and the 3 confident benign: none
    assert at40.explained == 5 and at40.explain["band"] == band
    assert at40.explain["method"] == "gradcam" and at40.explain["class"] == 1
    assert at40.explain["layer"] == "layer4"
    assert at40.tuning["batchnorm_folded"] == 53  # folded in place: "layer4" is still hooked
    for part in at40.parts:  # what was asked is in each part's metadata
        assert json.loads(storage.read_parquet(part).attrs["dala.explain"])["band"] == band

    # Each column value names an existing overlay PNG at the model's input size, keyed by content.
    files = _heatmap_files(out)
    assert set(files) == set(table["heatmap_uri"].dropna())
    for row in table[table["heatmap_uri"].notna()].itertuples():
        data = files[row.heatmap_uri]
        assert data.startswith(PNG) and f"{row.sha256}.gradcam.png" in row.heatmap_uri
        assert f"/explain/model={MODEL}/version={row.model_version}/mag={MAG}/" in row.heatmap_uri
        heat = np.asarray(Image.open(io.BytesIO(data)))
        assert heat.shape == (SIZE, SIZE, 3) and heat.dtype == np.uint8
        seen = resize_rgb(decode_rgb(storage.read_bytes(row.uri))[0], SIZE)
        assert np.abs(heat.astype(int) - seen.astype(int)).mean() > 5  # the map is laid over it

    # A rerun scores nothing, writes no file and keeps every row's column.
    again = score_source(
        served["drop"],
        served["root"],
        out,
        threshold=threshold,
        device="cpu",
        precision="fp32",
        explain=True,
        uncertain_band=band,
        flow_run_id="rerun",
    )
    assert sum(m.scored for m in again.magnifications) == 0
    assert sum(m.explained for m in again.magnifications) == 0
    assert _heatmap_files(out) == files
    rerun = read_image_predictions(out, MODEL, dedupe=False)
    assert len(rerun) == N_IMAGES
    assert rerun.set_index("sha256")["heatmap_uri"].to_dict() == (
        table.set_index("sha256")["heatmap_uri"].to_dict()
    )


def test_explain_over_images_scored_without_it_does_not_re_explain_them(served):
    """The documented rule: rows are never rewritten, so earlier rows keep a null column."""
    plain = served["plain"]
    before = read_image_predictions(plain, MODEL, dedupe=False)
    assert before["heatmap_uri"].isna().all()
    result = score_source(
        served["drop"], served["root"], plain, device="cpu", precision="fp32", explain=True
    )
    assert sum(m.scored for m in result.magnifications) == 0
    after = read_image_predictions(plain, MODEL, dedupe=False)
    assert len(after) == len(before) and after["heatmap_uri"].isna().all()
    assert _heatmap_files(plain) == {}


def test_parts_written_before_the_column_existed_still_read(tmp_path):
    out = str(tmp_path / "out")
    layout = ScoringLayout(out)
    old_schema = pa.schema([f for f in IMAGE_SCHEMA if f.name != "heatmap_uri"])
    now = pd.Timestamp("2025-01-01", tz="UTC")

    def rows(shas: list[str], heatmaps: list | None) -> pd.DataFrame:
        frame = pd.DataFrame(
            {
                "image_id": [s[:16] for s in shas],
                "sha256": shas,
                "uri": [f"s3://drop/{s}.png" for s in shas],
                "case_id": "case-1",
                "magnification": MAG,
                "prob_malignant": np.float32(0.7),
                "pred_label": np.int8(1),
                "threshold": np.float32(0.5),
                "model_name": MODEL,
                "model_version": "v" * 64,
                "scored_at": now,
                "flow_run_id": "old",
            }
        )
        return frame if heatmaps is None else frame.assign(heatmap_uri=heatmaps)

    folder = layout.images(MODEL, "v" * 64, MAG)
    old, new = ["a" * 64, "b" * 64], ["c" * 64, "d" * 64]
    storage.write_parquet_atomic(rows(old, None), f"{folder}/part-old.parquet", schema=old_schema)
    assert "heatmap_uri" not in storage.read_parquet(f"{folder}/part-old.parquet").columns
    table = read_image_predictions(out, MODEL)  # only old parts: the column is there, null
    assert list(table.columns) == IMAGE_SCHEMA.names and table["heatmap_uri"].isna().all()
    heat = ["s3://out/explain/c.png", None]
    storage.write_parquet_atomic(rows(new, heat), f"{folder}/part-new.parquet", schema=IMAGE_SCHEMA)
    table = read_image_predictions(out, MODEL)
    assert list(table.columns) == IMAGE_SCHEMA.names and len(table) == 4
    table = table.set_index("sha256")
    assert table["heatmap_uri"].isna().to_dict() == {old[0]: True, old[1]: True, new[1]: True} | {
        new[0]: False
    }
    assert table.loc[new[0], "heatmap_uri"] == heat[0]
    assert table["heatmap_uri"].dtype == read_image_predictions(out, MODEL)["uri"].dtype
    assert scored_hashes(out, MODEL, "v" * 64) == set(old + new)
    assert len(rebuild_cases(layout, MODEL)) == 1  # the case table still rebuilds from both
    # pyarrow.dataset readers get the same given the schema (as outputs' docstring says).
    fs, path = storage.filesystem(layout.images())
    dataset = pads.dataset(path, filesystem=fs, schema=IMAGE_SCHEMA, format="parquet")
    read = dataset.to_table().to_pandas().set_index("sha256")
    assert read["heatmap_uri"].isna().to_dict() == table["heatmap_uri"].isna().to_dict()
    assert read.loc[new[0], "heatmap_uri"] == heat[0]


def test_dala_predict_explain_with_gradcam_plus_plus(served, tmp_path, capsys):
    out = str(tmp_path / "cli")
    args = ["predict", served["drop"], "--registry", served["root"], "--out", out]
    args += ["--device", "cpu", "--precision", "fp32", "--threshold", str(served["threshold"])]
    assert dala([*args, "--uncertain-band", "1.5", "--explain"]) == 2
    assert "--uncertain-band must lie in [0, 1)" in capsys.readouterr().err
    code = dala([*args, "--explain", "--explain-method", "gradcam++", "--uncertain-band", "0"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "heatmaps: 4 written" in printed and f"{out}/explain/model={MODEL}" in printed
    table = read_image_predictions(out, MODEL)
    assert _explained(table) == set(table.loc[table["pred_label"] == 1, "sha256"])
    files = _heatmap_files(out)
    assert len(files) == 4 and all(u.endswith(".gradcampp.png") for u in files)
    # Without --explain the column is written, null.
    plain = str(tmp_path / "no-explain")
    assert dala([*args[:5], plain, *args[6:]]) == 0
    assert read_image_predictions(plain, MODEL)["heatmap_uri"].isna().all()


def test_int8_scoring_explains_with_the_float_model_on_the_cpu(served, tmp_path):
    out = str(tmp_path / "int8")
    result = score_source(
        served["drop"],
        served["root"],
        out,
        threshold=served["threshold"],
        device="cpu",
        precision="int8",
        explain=True,
        uncertain_band=0.0,
    )
    (at40,) = [m for m in result.magnifications if m.magnification == MAG]
    assert at40.precision == "int8" and at40.scored == N_IMAGES
    table = read_image_predictions(out, MODEL)
    called = set(table.loc[table["pred_label"] == 1, "sha256"])
    assert called and _explained(table) == called and at40.explained == len(called)
    for uri in table["heatmap_uri"].dropna():
        assert np.asarray(Image.open(io.BytesIO(storage.read_bytes(uri)))).shape == (32, 32, 3)


def test_what_cannot_be_explained_is_logged_and_left_null(served, caplog):
    record = promotion.current_record(served["root"], MODEL, MAG)
    layout = ScoringLayout(served["plain"])
    swin = record.model_copy(update={"model": "swin_b"})
    with caplog.at_level(logging.WARNING, logger="dala_model.serving.scoring"):
        explainer, why = scoring._explainer(
            layout, swin, None, {"method": "gradcam", "band": 0.1}, MAG, "paper"
        )
    assert explainer is None and "not supported for 'swin_b'" in why["not_explained"]
    assert "no heatmaps, heatmap_uri stays null" in caplog.text

    # A map that fails (a ViT reshape asked of a CNN layer) leaves the chunk's column null.
    model = load_model(record.checkpoint_uri)
    broken = scoring.Explainer(
        model, CamTarget("layer4", "vit_tokens"), "gradcam", 0.1, "paper", layout, MODEL, "v", MAG
    )
    pixels = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dala_model.serving.scoring"):
        uris = scoring._explain_chunk(
            broken, ["a", "b", "c"], pixels, np.array([0.9, 0.1, 0.55]), 0.5
        )
    assert uris == [None, None, None]
    assert "2 images could not be explained" in caplog.text
    assert "ExplanationNotSupported" in caplog.text
    assert not storage.exists(storage.join(served["plain"], "explain"))


def test_explain_arguments_are_checked_before_any_work(served, tmp_path):
    out = str(tmp_path / "never")
    with pytest.raises(ValueError, match="explain_method"):
        score_source(served["drop"], served["root"], out, explain=True, explain_method="scorecam")
    with pytest.raises(ValueError, match="uncertain_band"):
        score_source(served["drop"], served["root"], out, explain=True, uncertain_band=-0.1)
    assert not storage.exists(out)
    assert DEFAULT_UNCERTAIN_BAND == 0.1


def test_flow_passes_explain_to_a_source_and_refuses_it_without_one(served, tmp_path):
    from flows.inference import inference_flow, score_source_task

    with pytest.raises(ValueError, match="explain=True writes heatmaps for a source drop"):
        inference_flow.fn(root=served["root"], explain=True)
    with pytest.raises(ValueError, match="source drop"):
        inference_flow.fn(root=served["root"], source="  ", explain=True)
    out = str(tmp_path / "flow")
    result = score_source_task.fn(
        served["drop"],
        served["root"],
        out,
        MODEL,
        served["threshold"],
        None,
        "cpu",
        "fp32",
        "flow-run",
        True,
        "gradcam",
    )
    (at40,) = [m for m in result["magnifications"] if m["magnification"] == MAG]
    table = read_image_predictions(out, MODEL)
    prob, threshold = table["prob_malignant"].astype(float), served["threshold"]
    want = (prob >= threshold) | ((prob - threshold).abs() <= DEFAULT_UNCERTAIN_BAND)
    assert _explained(table) == set(table.loc[want, "sha256"])
    assert at40["explained"] == want.sum() >= 4 and at40["explain"]["method"] == "gradcam"
    assert len(_heatmap_files(out)) == at40["explained"]
