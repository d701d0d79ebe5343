"""Ingest from a real S3 endpoint (moto server) and a local folder, with every kind of bad file."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dala_model import storage
from dala_model.data import _decode
from dala_model.data.breakhis import parse_breakhis_path
from dala_model.data.cache import load_images, missing_from_cache, resize
from dala_model.data.ingest import ingest
from dala_model.data.manifest import MANIFEST_SCHEMA, manifest_version, read_manifest
from dala_model.data.synth import generate

SIZE = (140, 92)


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def good_tree(module_tmp) -> dict[str, bytes]:
    """A small synthetic archive (8 patients x 4 magnifications) as relpath -> bytes."""
    out = module_tmp("synth")
    generate(str(out), patients=8, images_per_patient=1, seed=3, size=SIZE)
    return {f.relpath: (out / f.relpath).read_bytes() for f in storage.list_file_infos(str(out))}


def _bad_files(good: dict[str, bytes]) -> tuple[dict[str, bytes], dict[str, str], dict[str, str]]:
    """Bad and odd files: (relpath -> bytes, relpath -> quarantine reason, relpath -> accepted mode)."""
    first = next(iter(good.values()))
    rgb = Image.open(io.BytesIO(first)).convert("RGB")
    corrupt = bytearray(first)
    corrupt[len(corrupt) // 2] ^= 0xFF
    files = {
        "bad/SOB_B_A-14-70001-40-001.png": first[: len(first) // 2],
        "bad/SOB_B_A-14-70002-40-001.png": b"",
        "bad/SOB_B_A-14-70003-40-001.png": b"this is a text file, not an image\n",
        "bad/SOB_B_A-14-70004-40-001.png": bytes(corrupt),
        "bad/SOB_B_A-14-70005-40-001.png": _png(Image.fromarray(np.zeros((20, 30), np.uint16))),
        "bad/SOB_B_A-14-70006-40-001.png": _png(Image.new("1", (7000, 6000))),
        "bad/slide_0001.png": first,
        "odd/SOB_M_DC-14-70007-40-001.png": _png(rgb.convert("L")),
        "odd/SOB_M_DC-14-70008-40-001.png": _png(rgb.convert("RGBA")),
        "odd/SOB_M_DC-14-70009-40-001.png": _png(rgb, "JPEG"),
        "odd/SOB_M_DC-14-70010-40-001.png": _png(rgb, "TIFF"),
        "données patients/SOB_M_PC-14-70011-100-002.png": _png(rgb.rotate(90)),
        "zz-copies/SOB_M_PC-14-70012-40-001.png": first,  # same content as a good file
        "notes/README.txt": b"ignored: not an image name",
    }
    reasons = {
        "bad/SOB_B_A-14-70001-40-001.png": "truncated",
        "bad/SOB_B_A-14-70002-40-001.png": "zero_bytes",
        "bad/SOB_B_A-14-70003-40-001.png": "not_an_image",
        "bad/SOB_B_A-14-70004-40-001.png": "corrupt",
        "bad/SOB_B_A-14-70005-40-001.png": "unsupported_mode",
        "bad/SOB_B_A-14-70006-40-001.png": "too_large",
        "bad/slide_0001.png": "unparseable_name",
    }
    modes = {
        "odd/SOB_M_DC-14-70007-40-001.png": ("L", "PNG"),
        "odd/SOB_M_DC-14-70008-40-001.png": ("RGBA", "PNG"),
        "odd/SOB_M_DC-14-70009-40-001.png": ("RGB", "JPEG"),
        "odd/SOB_M_DC-14-70010-40-001.png": ("RGB", "TIFF"),
    }
    return files, reasons, modes


def _upload(source: str, files: dict[str, bytes]) -> None:
    for relpath, data in files.items():
        storage.write_bytes_atomic(f"{source}/{relpath}", data)


@pytest.fixture(params=["local", "s3"])
def source(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "source")
    return f"{request.getfixturevalue('s3_bucket')}/source"


def test_ingest_checks_every_field_and_every_quarantine_reason(
    source, tmp_path, good_tree, monkeypatch
):
    monkeypatch.setenv("DALA_CACHE_DIR", str(tmp_path / "shards"))
    bad, reasons, modes = _bad_files(good_tree)
    _upload(source, {**good_tree, **bad})
    if source.startswith("s3://"):  # only an object store can hold a literal '..' key
        fs, path = storage.filesystem(source)
        fs.pipe_file(f"{path}/evil/../SOB_B_A-14-70013-40-001.png", next(iter(good_tree.values())))
        reasons["evil/../SOB_B_A-14-70013-40-001.png"] = "unsafe_key"
    root = source.rsplit("/", 1)[0] + "/root"

    result = ingest(source, root, workers=2, cache_size=32)

    manifest = read_manifest(root)
    expected_good = {
        rel: data
        for rel, data in {**good_tree, **bad}.items()
        if rel not in reasons and rel.endswith(".png") and not rel.startswith("zz-copies/")
    }
    assert sorted(manifest["relpath"]) == sorted(expected_good)
    assert manifest.columns.tolist() == MANIFEST_SCHEMA.names
    assert manifest.attrs["dala.schema_version"] == "2"
    for row in manifest.to_dict("records"):
        data = expected_good[row["relpath"]]
        name = parse_breakhis_path(row["relpath"])
        sha = hashlib.sha256(data).hexdigest()
        width, height = Image.open(io.BytesIO(data)).size
        mode, fmt = modes.get(row["relpath"], ("RGB", "PNG"))
        assert row["uri"] == f"{source}/{row['relpath']}"
        assert (row["sha256"], row["image_id"], row["bytes"]) == (sha, sha[:16], len(data))
        assert (row["width"], row["height"], row["mode"], row["format"]) == (
            width,
            height,
            mode,
            fmt,
        )
        assert (row["label"], row["label_id"]) == (
            name.label,
            {"benign": 0, "malignant": 1}[name.label],
        )
        assert (row["subtype"], row["subtype_code"], row["patient_id"]) == (
            name.subtype,
            name.subtype_code,
            name.patient_id,
        )
        assert (row["magnification"], row["seq"], row["procedure"]) == (
            name.magnification,
            name.seq,
            "SOB",
        )
        assert row["source_version"]
        assert row["ingested_at"].tzinfo is not None
    assert set(manifest["subtype_code"]) == {"A", "F", "PT", "TA", "DC", "LC", "MC", "PC"}
    assert set(manifest["magnification"]) == {40, 100, 200, 400}

    quarantine = storage.read_parquet(f"{root}/manifests/quarantine.parquet")
    assert dict(zip(quarantine["uri"], quarantine["reason"], strict=True)) == {
        f"{source}/{rel}": reason for rel, reason in reasons.items()
    }
    assert quarantine["detail"].str.len().min() > 0
    duplicates = storage.read_parquet(f"{root}/manifests/duplicates.parquet")
    first_rel = next(iter(good_tree))
    assert duplicates.to_dict("records") == [
        {
            "sha256": hashlib.sha256(good_tree[first_rel]).hexdigest(),
            "uri": f"{source}/zz-copies/SOB_M_PC-14-70012-40-001.png",
            "kept_uri": f"{source}/{first_rel}",
        }
    ]
    assert (result.images, result.quarantined, result.duplicates, result.ignored) == (
        len(expected_good),
        len(reasons),
        1,
        1,
    )
    assert result.images_per_s > 0 and result.manifest_version == manifest_version(root)

    # the decoded cache was built from the same decode, and equals Pillow's resize
    assert missing_from_cache(root, manifest["image_id"], 32) == []
    pixels = load_images(root, manifest["image_id"], 32)
    for row, got in zip(manifest.to_dict("records"), pixels, strict=True):
        expected = resize(Image.open(io.BytesIO(expected_good[row["relpath"]])), 32)
        np.testing.assert_array_equal(got, expected)


def test_reingest_is_idempotent_and_incremental(source, tmp_path, good_tree):
    bad, reasons, _ = _bad_files(good_tree)
    _upload(source, {**good_tree, **bad})
    root = str(tmp_path / "root")
    first = ingest(source, root, workers=2, cache_size=None)
    before = read_manifest(root)

    again = ingest(source, root, workers=2, cache_size=None)
    pd.testing.assert_frame_equal(read_manifest(root), before)
    assert again.reused == first.images and again.read < first.read
    assert again.manifest_version == first.manifest_version

    # new files arrive, one disappears, one is replaced by different content
    removed, changed = sorted(good_tree)[1], sorted(good_tree)[2]
    fs, path = storage.filesystem(source)
    fs.rm_file(f"{path}/{removed}")
    new_image = _png(Image.new("RGB", (64, 48), (200, 120, 180)))
    storage.write_bytes_atomic(
        f"{source}/{changed}", _png(Image.new("RGB", (64, 48), (10, 20, 30)))
    )
    storage.write_bytes_atomic(f"{source}/new/SOB_B_TA-14-80001-200-003.png", new_image)
    time.sleep(0.01)

    third = ingest(source, root, workers=2, cache_size=None)
    after = read_manifest(root)
    assert third.removed == 1
    assert third.read == again.read + 2  # only the new and the changed file are read again
    assert removed not in set(after["relpath"])
    assert "new/SOB_B_TA-14-80001-200-003.png" in set(after["relpath"])
    assert len(after) == len(before)  # one removed, one added, one changed in place
    changed_row = after.set_index("relpath").loc[changed]
    assert changed_row["image_id"] != before.set_index("relpath").loc[changed, "image_id"]
    unchanged = before[~before["relpath"].isin([removed, changed])]
    pd.testing.assert_frame_equal(
        after[after["relpath"].isin(unchanged["relpath"])].reset_index(drop=True),
        unchanged.reset_index(drop=True),
    )
    # the incremental result equals a fresh ingest of the same source, apart from ingest times
    fresh = str(tmp_path / "fresh")
    ingest(source, fresh, workers=2, cache_size=None)
    pd.testing.assert_frame_equal(
        read_manifest(fresh).drop(columns="ingested_at"), after.drop(columns="ingested_at")
    )


def test_real_breakhis_sample(breakhis_sample, tmp_path):
    result = ingest(str(breakhis_sample), str(tmp_path / "root"), workers=2, cache_size=None)
    manifest = read_manifest(str(tmp_path / "root"))
    assert (result.images, result.quarantined, result.duplicates) == (106, 0, 0)
    # 37 slide folders are 31 cases: 14-22549 (AB, CD, G), 14-29960 (AB, CD), 14-14134 (plain, E),
    # 14-16184 (plain, CD) and 14-19979 (plain, C) each have several lettered slides.
    assert manifest["slide_id"].nunique() == 37
    assert manifest["patient_id"].nunique() == 31
    slides = manifest.groupby("patient_id")["slide_id"].nunique()
    assert set(slides[slides > 1].index) == {
        "14-22549",
        "14-29960",
        "14-14134",
        "14-16184",
        "14-19979",
    }
    assert set(manifest["subtype_code"]) == {"A", "F", "PT", "TA", "DC", "LC", "MC", "PC"}
    assert manifest.groupby("label").size().to_dict() == {"benign": 64, "malignant": 42}
    assert manifest.groupby("magnification").size().to_dict() == {40: 47, 100: 18, 200: 18, 400: 23}
    assert set(zip(manifest["width"], manifest["height"], manifest["mode"], strict=True)) == {
        (700, 460, "RGB")
    }
    quirk = manifest[manifest["patient_id"] == "14-13412"]
    assert set(quirk["subtype_code"]) == {"LC"} and len(quirk) == 2


def _ingest_outputs(source: str, root: str) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Manifest (without ingest times), quarantine and cached pixels of one ingest."""
    ingest(source, root, workers=2, cache_size=48)
    manifest = read_manifest(root).drop(columns="ingested_at")
    quarantine = storage.read_parquet(f"{root}/manifests/quarantine.parquet")
    return manifest, quarantine, load_images(root, manifest["image_id"], 48)


def _assert_same_as_pillow_only(source: str, tmp_path, monkeypatch) -> pd.DataFrame:
    fast = _ingest_outputs(source, str(tmp_path / "fast"))
    with monkeypatch.context() as patch:
        patch.setattr(_decode, "_spng_decode", None)  # what ingest did before: Pillow only
        pillow = _ingest_outputs(source, str(tmp_path / "pillow"))
    pd.testing.assert_frame_equal(fast[0], pillow[0])
    pd.testing.assert_frame_equal(fast[1], pillow[1])  # same reasons and the same details
    np.testing.assert_array_equal(fast[2], pillow[2])
    return fast[0]


def test_fast_decoder_ingest_equals_pillow_ingest(tmp_path, good_tree, monkeypatch):
    """The same rows, hashes, sizes, modes, quarantine reasons and details, and cached pixels."""
    monkeypatch.setenv("DALA_CACHE_DIR", str(tmp_path / "shards"))
    bad, reasons, modes = _bad_files(good_tree)
    rgb = Image.open(io.BytesIO(next(iter(good_tree.values())))).convert("RGB")
    odd = {  # 8-bit flavours the fast path takes, and ones it leaves to Pillow
        "odd/SOB_M_DC-14-70020-40-001.png": _png(rgb.quantize(64)),
        "odd/SOB_M_DC-14-70021-40-001.png": _png(rgb.convert("LA")),
    }
    source = str(tmp_path / "source")
    for rel, data in {**good_tree, **bad, **odd}.items():
        storage.write_bytes_atomic(f"{source}/{rel}", data)
    assert all(_decode.takes_fast_path(data) for data in good_tree.values())
    manifest = _assert_same_as_pillow_only(source, tmp_path, monkeypatch)
    assert len(manifest) == len(good_tree) + len(modes) + 1 + len(odd)  # + the rotated one
    assert set(manifest["mode"]) == {"RGB", "RGBA", "L", "P", "LA"}


def test_fast_decoder_ingest_of_the_real_sample_equals_pillow_ingest(
    breakhis_sample, tmp_path, monkeypatch
):
    monkeypatch.setenv("DALA_CACHE_DIR", str(tmp_path / "shards"))
    manifest = _assert_same_as_pillow_only(str(breakhis_sample), tmp_path, monkeypatch)
    assert len(manifest) == 106


def test_empty_and_missing_sources_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no image files"):
        ingest(str(tmp_path / "empty"), str(tmp_path / "root"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ingest(str(tmp_path / "missing"), str(tmp_path / "root"))
    assert not (tmp_path / "root").exists()


def test_killed_ingest_leaves_no_manifest_and_a_rerun_completes(tmp_path):
    source, root = tmp_path / "source", tmp_path / "root"
    count = generate(str(source), patients=8, images_per_patient=3, seed=5, size=(700, 460))
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO);"
        "from dala_model.data.ingest import ingest;"
        f"ingest({str(source)!r}, {str(root)!r}, workers=1, cache_size=224)"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, env={**os.environ}
    )
    for line in process.stderr:  # wait until it is reading images, then kill it mid-run
        if "reading" in line:
            break
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "ingest finished before it could be killed"
    manifests = root / "manifests"
    assert not (manifests / "manifest.parquet").exists()
    assert not manifests.exists() or not any(
        p.name.startswith("manifest") for p in manifests.iterdir()
    )

    result = ingest(str(source), str(root), workers=2, cache_size=224)
    assert result.images == count == len(read_manifest(str(root)))
    assert missing_from_cache(str(root), read_manifest(str(root))["image_id"], 224) == []
