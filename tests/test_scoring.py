"""Scoring new images (`dala predict`): real models, real PNGs, ROOT/SOURCE/OUT in three S3 buckets.

Two tiny real models (40X and 100X, 32 px, one epoch) are trained and promoted once; every
drop is built from PNG bytes written to moto's S3 server.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import threading
import uuid

import fsspec
import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
import torch
from PIL import Image

from dala_model import storage
from dala_model.cli import main as dala
from dala_model.data import synth
from dala_model.data.cache import resize
from dala_model.data.ingest import ingest
from dala_model.data.manifest import read_manifest
from dala_model.data.sources import SourceError, discover
from dala_model.data.splits import make_split, read_split
from dala_model.engine.config import TrainConfig
from dala_model.engine.inference import predict_proba
from dala_model.engine.train import train
from dala_model.models.checkpoint import load_model
from dala_model.serving import promotion, scoring
from dala_model.serving.drop import to_rgb
from dala_model.serving.outputs import (
    IMAGE_SCHEMA,
    ScoringLayout,
    read_case_predictions,
    read_image_predictions,
)
from dala_model.serving.scoring import resolve_threshold, score_source

MAGS = (40, 100)
COPIED = ("manifests", "splits", "runs")


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _bucket(endpoint: str) -> str:
    import boto3
    import s3fs

    name = f"scoring-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    s3fs.S3FileSystem.clear_instance_cache()
    return f"s3://{name}"


@pytest.fixture(scope="module")
def trained(module_tmp) -> str:
    """A local training root with a manifest, a patient split and 40X and 100X runs, promoted."""
    base = module_tmp("scoring")
    source, root = str(base / "source"), str(base / "root")
    synth.generate(source, patients=8, images_per_patient=2, seed=1, size=(128, 96))
    ingest(source, root, cache_size=32)
    make_split(root, "patient", seed=0)
    for mag in MAGS:
        train(
            TrainConfig(
                root=root, magnification=mag, epochs=1, batch_size=8, image_size=32, device="cpu"
            )
        )
        promotion.promote(root, storage.join(root, "runs", f"dalaresnet50-{mag}x-patient-seed0"))
    return root


@pytest.fixture(scope="module")
def registry(trained, s3_endpoint) -> str:
    """ROOT in its own bucket: the training manifest, split and run folders, both runs promoted."""
    root = f"{_bucket(s3_endpoint)}/root"
    local = fsspec.filesystem("file")
    for name in COPIED:
        for file in local.find(f"{trained}/{name}"):
            if not file.endswith("checkpoint.pt"):  # resume state: scoring never needs it
                relpath = file[len(trained) + 1 :]
                storage.write_bytes_atomic(storage.join(root, relpath), local.cat_file(file))
    for mag in MAGS:
        promotion.promote(root, storage.join(root, "runs", f"dalaresnet50-{mag}x-patient-seed0"))
    return root


@pytest.fixture
def buckets(s3_endpoint) -> tuple[str, str]:
    """SOURCE and OUT, each in a fresh bucket of its own."""
    return f"{_bucket(s3_endpoint)}/incoming", f"{_bucket(s3_endpoint)}/scored"


def _images(seed: int, n: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [
        _png(Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))) for _ in range(n)
    ]


def _drop(layout: str) -> tuple[dict[str, bytes], dict[str, dict], dict[str, str], dict[str, str]]:
    """(files, expected images by relpath, quarantine reasons by relpath, modes by relpath)."""
    good, rgba_src, wide_src, other = _images(7, 4)
    rgba = _png(Image.open(io.BytesIO(rgba_src)).convert("RGBA"))
    wide = _png(Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)))
    bad = {"truncated": good[: len(good) // 2], "not_an_image": b"just text, not a PNG\n"}
    if layout == "folders":
        paths = {
            "good": "site-a/case-0001/40X/scan_17.png",
            "rgba": "site-a/case-0001/40X/scan_18.png",
            "wide": "site-a/case-0001/100X/scan_19.png",
            "other": "case-0002/40X/a.png",
            "copy": "case-0002/40X/copy of a.png",
            "truncated": "case-0002/40X/broken.png",
            "not_an_image": "case-0002/40X/notes.png",
            "unknown_magnification": "case-0003/loose.png",
        }
        extra = {"README.txt": b"not an image"}
    else:
        paths = {
            "good": "exports/IMG_0001.png",
            "rgba": "exports/IMG_0002.png",
            "wide": "exports/IMG_0003.png",
            "other": "exports/IMG_0004.png",
            "copy": "exports/dup/IMG_0004_again.png",
            "truncated": "exports/IMG_0005.png",
            "not_an_image": "exports/IMG_0006.png",
            "unknown_magnification": "exports/IMG_0007.png",
        }
        cases = ["case-0001"] * 3 + ["case-0002"] * 5
        mags = ["40", "40X", "100", "40", "40", "40", "40", ""]
        rows = [f"{p},{c},{m}" for p, c, m in zip(paths.values(), cases, mags, strict=True)]
        extra = {"metadata.csv": ("path,case_id,magnification\n" + "\n".join(rows)).encode()}
    content = {"good": good, "rgba": rgba, "wide": wide, "other": other, "copy": other}
    content |= bad | {"unknown_magnification": _images(8, 1)[0]}
    files = {paths[k]: v for k, v in content.items()} | extra
    expected = {
        paths["good"]: {"case_id": "case-0001", "magnification": 40},
        paths["rgba"]: {"case_id": "case-0001", "magnification": 40},
        paths["wide"]: {"case_id": "case-0001", "magnification": 100},
        paths["other"]: {"case_id": "case-0002", "magnification": 40},
    }
    reasons = {paths[k]: k for k in ("truncated", "not_an_image", "unknown_magnification")}
    modes = {paths["good"]: "RGB", paths["rgba"]: "RGBA", paths["wide"]: "I;16"}
    return files, expected, reasons, modes


def _upload(source: str, files: dict[str, bytes]) -> None:
    for relpath, data in files.items():
        storage.write_bytes_atomic(f"{source}/{relpath}", data)


def _raw_rows(out: str) -> int:
    uris = storage.list_files(ScoringLayout(out).images(), suffixes=(".parquet",))
    return sum(len(storage.read_parquet(u)) for u in uris)


@functools.cache
def _served(registry: str, mag: int) -> torch.nn.Module:
    return load_model(promotion.current_record(registry, "dalaresnet50", mag).checkpoint_uri)


def _expected_prob(registry: str, mag: int, data: bytes) -> float:
    pixels = resize(to_rgb(Image.open(io.BytesIO(data))), 32)[None]
    model = _served(registry, mag)
    return float(predict_proba(model, pixels, preset="paper", device=torch.device("cpu"))[0])


@pytest.mark.parametrize("layout", ["folders", "sidecar"])
def test_scores_a_drop_once_by_content(registry, buckets, layout):
    source, out = buckets
    files, expected, reasons, modes = _drop(layout)
    _upload(source, files)
    # fp32 pinned: the rows are checked against fp32 probabilities below, and "auto" may
    # measure bf16 faster on a CPU with native bf16.
    result = score_source(
        source, registry, out, flow_run_id="first", device="cpu", precision="fp32"
    )
    assert all(m.precision == "fp32" for m in result.magnifications if m.scored)
    assert result.layout == ("case_folders" if layout == "folders" else "sidecar")
    assert result.quarantined == {r: 1 for r in reasons.values()} and result.duplicates == 1

    # Every image row: one per content, with its case, magnification and model.
    table = read_image_predictions(out, "dalaresnet50")
    assert list(table.columns) == IMAGE_SCHEMA.names and len(table) == len(expected)
    assert table["heatmap_uri"].isna().all()  # written, null: nothing was asked to explain
    assert not storage.exists(storage.join(out, "explain"))
    by_uri = table.set_index("uri")
    for relpath, want in expected.items():
        row = by_uri.loc[f"{source}/{relpath}"]
        record = promotion.current_record(registry, "dalaresnet50", want["magnification"])
        threshold, _ = resolve_threshold(record, None)
        assert (row["case_id"], row["magnification"]) == (want["case_id"], want["magnification"])
        assert row["model_version"] == record.model_version and row["flow_run_id"] == "first"
        assert row["threshold"] == pytest.approx(threshold)
        assert row["pred_label"] == int(row["prob_malignant"] >= row["threshold"])
        assert row["sha256"].startswith(row["image_id"]) and row["model_name"] == "dalaresnet50"
        prob = _expected_prob(registry, want["magnification"], files[relpath])
        assert row["prob_malignant"] == pytest.approx(prob, abs=1e-4)

    # OUT's own manifest records the conversions; the quarantine every reason.
    manifest = storage.read_parquet(ScoringLayout(out).manifest()).set_index("relpath")
    for relpath, mode in modes.items():
        assert manifest.loc[relpath, "mode"] == mode
        assert bool(manifest.loc[relpath, "converted"]) == (mode != "RGB")
    assert manifest["label"].isna().all() and len(manifest) == len(expected)
    quarantine = storage.read_parquet(ScoringLayout(out).quarantine())
    assert dict(zip(quarantine["uri"], quarantine["reason"], strict=True)) == {
        f"{source}/{p}": r for p, r in reasons.items()
    }
    duplicates = storage.read_parquet(ScoringLayout(out).duplicates())
    assert len(duplicates) == 1 and duplicates["kept_uri"].iloc[0] in set(table["uri"])
    assert not storage.exists(storage.join(registry, "scored"))  # ROOT untouched

    # Consumers read the Hive layout with pyarrow; cases: per magnification + across them.
    fs, path = storage.filesystem(ScoringLayout(out).images())
    assert pads.dataset(path, filesystem=fs, partitioning="hive").count_rows() == len(expected)
    cases = read_case_predictions(out, "dalaresnet50")
    one = cases[cases["case_id"] == "case-0001"].set_index("magnification", drop=False)
    at40 = table[(table["case_id"] == "case-0001") & (table["magnification"] == 40)]
    at100 = table[(table["case_id"] == "case-0001") & (table["magnification"] == 100)]
    assert len(one) == 3 and one["magnification"].isna().sum() == 1
    assert one.loc[40, "n_images"] == 2 and one.loc[100, "n_images"] == 1
    assert one.loc[40, "prob_malignant"] == pytest.approx(at40["prob_malignant"].mean(), abs=1e-6)
    across = one[one["magnification"].isna()].iloc[0]
    assert across["n_images"] == 3 and across["prob_malignant"] == pytest.approx(
        (at40["prob_malignant"].mean() + at100["prob_malignant"].iloc[0]) / 2, abs=1e-6
    )
    two = cases[cases["case_id"] == "case-0002"]
    assert len(two) == 1 and two["n_images"].iloc[0] == 1  # the duplicate counts once

    # A rerun adds no row; one new file adds exactly one.
    rows = _raw_rows(out)
    again = score_source(source, registry, out, flow_run_id="second", device="cpu")
    assert sum(m.scored for m in again.magnifications) == 0 and _raw_rows(out) == rows
    new = _images(9, 1)[0]
    if layout == "folders":
        _upload(source, {"case-0004/200X/new.png": b"x", "case-0004/40X/new.png": new})
    else:
        meta = files["metadata.csv"] + b"\nexports/IMG_0100.png,case-0004,40"
        _upload(source, {"metadata.csv": meta, "exports/IMG_0100.png": new})
    third = score_source(source, registry, out, flow_run_id="third", device="cpu")
    assert sum(m.scored for m in third.magnifications) == 1 and _raw_rows(out) == rows + 1

    # Another drop into the same OUT: a known image under a new name and prefix is not scored
    # again, and the earlier drop's quarantine records stay.
    other = f"{source}-second"
    _upload(
        other, {"case-0009/40X/renamed.png": files[next(iter(expected))], "case-0009/x.png": b""}
    )
    fourth = score_source(other, registry, out, flow_run_id="fourth", device="cpu")
    assert sum(m.scored for m in fourth.magnifications) == 0
    assert sum(m.skipped for m in fourth.magnifications) == 1
    quarantine = storage.read_parquet(ScoringLayout(out).quarantine())
    assert {f"{source}/{p}" for p in reasons} <= set(quarantine["uri"])
    assert f"{other}/case-0009/x.png" in set(quarantine["uri"]) and _raw_rows(out) == rows + 1


def test_pixel_handoff_scores_exactly_what_a_second_decode_scores(trained, tmp_path, caplog):
    """The drop check's decoded pixels, handed to the scorer, give the rows a fresh read gives:
    RGB, RGBA and 16-bit files, a duplicate, a quarantined file; with the cap at one image only
    that image is held and the rest are read again."""
    files, expected, _, _ = _drop("folders")
    source = str(tmp_path / "drop")
    _upload(source, files)
    one_image = 32 * 32 * 3
    rows = {}
    for name, cap in (("held", scoring.HANDOFF_BYTES), ("capped", one_image), ("off", 0)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dala_model.serving.scoring"):
            score_source(
                source,
                trained,
                str(tmp_path / name),
                device="cpu",
                precision="fp32",
                handoff_bytes=cap,
            )
        lines = [r.getMessage() for r in caplog.records if "pixel handoff" in r.getMessage()]
        taken = {"held": len(expected), "capped": 1}.get(name)
        if taken is None:
            assert lines == []  # off: nothing is held, every file is read again
        else:
            assert lines and lines[0].startswith(f"pixel handoff: {taken} images scored")
        table = read_image_predictions(str(tmp_path / name), "dalaresnet50")
        rows[name] = table.set_index("sha256")["prob_malignant"].sort_index()
    assert len(rows["off"]) == len(expected)
    pd.testing.assert_series_equal(rows["held"], rows["off"], check_exact=True)
    pd.testing.assert_series_equal(rows["capped"], rows["off"], check_exact=True)


def test_pixel_handoff_holds_within_its_cap_and_lets_go(trained, tmp_path):
    """plan_scoring's handoff: held bytes never pass the cap, images already scored are let go,
    and each held image is handed over once."""
    files, expected, _, _ = _drop("folders")
    source, out = str(tmp_path / "drop"), str(tmp_path / "out")
    _upload(source, files)
    plan = scoring.plan_scoring(source, trained, out, device="cpu", handoff_bytes=10**9)
    pixels = plan.pixels
    held = {(sha, c.job.image_size) for c in plan.chunks for sha in c.rows["sha256"]}
    assert pixels.kept == len(expected) and pixels.held_bytes == len(held) * 32 * 32 * 3
    sha, size = next(iter(held))
    first = pixels.take(sha, size)
    assert first.shape == (size, size, 3) and first.dtype == np.uint8
    assert pixels.take(sha, size) is None  # handed over once
    assert pixels.held_bytes == (len(held) - 1) * 32 * 32 * 3
    pixels.retain(set())
    assert pixels.held_bytes == 0
    tight = scoring.plan_scoring(
        source, trained, str(tmp_path / "out2"), device="cpu", handoff_bytes=2 * 32 * 32 * 3 + 1
    )
    assert tight.pixels.kept == 2 and tight.pixels.refused >= len(expected) - 2
    assert tight.pixels.held_bytes <= tight.pixels.max_bytes


def test_concurrent_runs_never_duplicate_rows(trained, buckets):
    """Two runs at once (the schedule firing during a manual run), models from a local root."""
    source, out = buckets
    registry = trained
    files, expected, _, _ = _drop("folders")
    _upload(source, files)
    errors = []

    def run(name: str) -> None:
        try:
            score_source(source, registry, out, flow_run_id=name, device="cpu", chunk_size=2)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("left", "right")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert _raw_rows(out) == len(expected)  # same pending set -> the same content-keyed parts
    table = read_image_predictions(out, "dalaresnet50", dedupe=False)
    assert not table.duplicated(["sha256", "model_version"]).any()


def test_labelled_drop_is_measured_only_on_images_the_model_never_saw(registry, trained, tmp_path):
    """Training, validation and test images renamed into a labelled sidecar, plus unseen ones."""
    manifest = read_manifest(trained)
    split = read_split(trained, "patient").merge(
        manifest.drop(columns="magnification"), on="image_id"
    )
    at40 = split[split["magnification"] == 40]
    picked = pd.concat([at40[at40["split"] == s].head(2) for s in ("train", "val", "test")])
    source, out = str(tmp_path / "labelled"), str(tmp_path / "out")
    rows = ["path,case_id,magnification,label"]
    for i, row in enumerate(picked.itertuples()):
        data = storage.read_bytes(row.uri)
        storage.write_bytes_atomic(f"{source}/renamed/{i:03d}.png", data)
        rows.append(f"renamed/{i:03d}.png,{row.patient_id},40,{row.label}")
    for i, data in enumerate(_images(11, 3)):
        storage.write_bytes_atomic(f"{source}/new/{i}.png", data)
        rows.append(f"new/{i}.png,case-new-{i},40,{'malignant' if i % 2 else 'benign'}")
    storage.write_bytes_atomic(f"{source}/metadata.csv", "\n".join(rows).encode())

    code = dala(["predict", source, "--registry", registry, "--out", out, "--device", "cpu"])
    assert code == 0
    table = read_image_predictions(out, "dalaresnet50")
    assert len(table) == len(picked) + 3
    (uri,) = storage.list_files(f"{out}/predictions/reports", suffixes=(".json",))
    report = json.loads(storage.read_bytes(uri))
    n_train, n_val = (int((picked["split"] == s).sum()) for s in ("train", "val"))
    assert report["excluded"] == {"training": n_train, "validation": n_val}
    assert report["labelled"] == len(picked) + 3
    assert report["evaluated"] == len(picked) + 3 - n_train - n_val
    assert report["metrics"]["image"]["n"] == report["evaluated"]


def test_sidecar_and_source_errors_name_the_row(tmp_path, registry):
    source = tmp_path / "drop"
    source.mkdir()
    (source / "a.png").write_bytes(_images(12, 1)[0])
    cases = {
        "path,case_id,magnification,stain\na.png,c1,40,HE": "unknown column",
        "path,magnification\na.png,40": "missing column",
        "path,case_id,magnification,label\na.png,c1,40,maybe": "line 2: label",
        "path,case_id,magnification\na.png,c1,40\na.png,c1,40": "line 3: path 'a.png' is listed again",
        "path,case_id,magnification\na.png,c1,50": "line 2: magnification '50'",
        "path,case_id,magnification\na.png,,40": "line 2: empty case_id",
        "path,case_id,magnification\n../a.png,c1,40": "line 2: path '../a.png' is not inside",
        "path,case_id,magnification\n/etc/a.png,c1,40": "line 2: path '/etc/a.png'",
        "path,case_id,magnification\ns3://other/a.png,c1,40": "line 2: path 's3://other",
    }
    for text, message in cases.items():
        (source / "metadata.csv").write_text(text)
        with pytest.raises(SourceError, match=message.replace("(", r"\(")):
            discover(str(source))
    (source / "b.png").write_bytes(_images(13, 1)[0])
    (source / "metadata.csv").write_text("path,case_id,magnification\na.png,c1,40\ngone.png,c1,40")
    found = discover(str(source))
    assert [i.file.relpath for i in found.images] == ["a.png"] and found.layout == "sidecar"
    assert {q["uri"].rsplit("/", 1)[1]: q["reason"] for q in found.quarantined} == {
        "gone.png": "missing_file",
        "b.png": "not_in_metadata",
    }
    (source / "metadata.csv").unlink()
    (source / "b.png").unlink()
    found = discover(str(source), magnification=200)  # a file straight under SOURCE: no case
    assert [q["reason"] for q in found.quarantined] == ["unknown_case"]
    with pytest.raises(ValueError, match="registry root"):
        score_source(str(source), registry, registry)
    code = dala(["predict", str(source), "--registry", str(tmp_path / "empty"), "--out", "x"])
    assert code == 2
