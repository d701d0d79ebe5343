"""Splits: paper sizes per magnification and class, patient-disjointness, seeds, validation."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from dala_model import storage
from dala_model.data.manifest import MANIFEST_SCHEMA, SCHEMA_VERSION, data_version, manifest_uri
from dala_model.data.splits import (
    check_patient_disjoint,
    make_split,
    read_split,
    split_frame,
    split_hash,
    split_identity,
)


def _manifest(patients: int = 30, seed: int = 0) -> pd.DataFrame:
    """Manifest rows (no image files needed): ~31% benign patients, 3-25 images per magnification."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        label_id = int(p >= round(patients * 0.31))
        for magnification in (40, 100, 200, 400):
            for seq in range(int(rng.integers(3, 26))):
                sha = f"{p:04d}{magnification:04d}{seq:04d}".ljust(64, "0")
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
                        "subtype": "x",
                        "subtype_code": "X",
                        "patient_id": f"14-{p}",
                        # every third case has two lettered slides (14-22549AB/CD in BreakHis)
                        "slide_id": f"14-{p}" + ("" if p % 3 else ("AB", "CD")[seq % 2]),
                        "magnification": magnification,
                        "seq": seq + 1,
                        "procedure": "SOB",
                        "source_version": "v",
                        "ingested_at": pd.Timestamp("2024-01-01", tz="UTC"),
                    }
                )
    return pd.DataFrame(rows)


@pytest.fixture
def root(storage_root) -> str:
    storage.write_parquet_atomic(
        _manifest(),
        manifest_uri(storage_root),
        schema=MANIFEST_SCHEMA,
        metadata={"dala.schema_version": SCHEMA_VERSION},
    )
    return storage_root


def test_paper_split_is_within_one_image_of_60_10_30_per_magnification_and_class(root):
    make_split(root, "paper", seed=3)
    split = read_split(root, "paper")
    assert split.attrs["dala.scheme"] == "paper" and split.attrs["dala.seed"] == "3"
    assert json.loads(split.attrs["dala.fractions"]) == [0.6, 0.1, 0.3]
    assert split.columns.tolist() == ["image_id", "magnification", "split"]
    manifest = _manifest()
    merged = split.merge(manifest[["image_id", "label_id"]], on="image_id")
    assert len(merged) == len(manifest) and split["image_id"].is_unique
    for _, group in merged.groupby(["magnification", "label_id"]):
        counts = group["split"].value_counts()
        for name, fraction in (("train", 0.6), ("val", 0.1), ("test", 0.3)):
            assert abs(counts.get(name, 0) - fraction * len(group)) <= 1


def test_patient_split_is_disjoint_stratified_and_near_the_fractions(root):
    make_split(root, "patient", seed=1)
    split = read_split(root, "patient")
    manifest = _manifest()
    check_patient_disjoint(split, manifest)
    merged = split.merge(manifest[["image_id", "label_id", "patient_id"]], on="image_id")
    assert merged.groupby(["magnification", "patient_id"])["split"].nunique().max() == 1
    for _, group in merged.groupby(["magnification", "label_id"]):
        shares = group["split"].value_counts(normalize=True)
        assert set(shares.index) == {"train", "val", "test"}  # every class in every split
        assert abs(shares["train"] - 0.6) < 0.2 and abs(shares["test"] - 0.3) < 0.2


def test_patient_kfold_tests_each_image_once_and_never_leaks(root):
    make_split(root, "patient-kfold", seed=0, folds=4)
    split = read_split(root, "patient-kfold")
    manifest = _manifest()
    assert sorted(split["fold"].unique()) == [0, 1, 2, 3]
    assert (split.groupby("fold").size() == len(manifest)).all()
    tested = split[split["split"] == "test"]
    assert sorted(tested["image_id"]) == sorted(manifest["image_id"])  # each image tested once
    check_patient_disjoint(split, manifest)
    assert set(split["split"]) == {"train", "val", "test"}


@pytest.mark.parametrize("scheme", ["paper", "patient", "patient-kfold"])
def test_same_seed_same_split_other_seed_other_split(scheme):
    manifest = _manifest()
    first = split_frame(manifest, scheme, seed=5)
    pd.testing.assert_frame_equal(first, split_frame(manifest, scheme, seed=5))
    assert not first["split"].equals(split_frame(manifest, scheme, seed=6)["split"])


def test_check_patient_disjoint_catches_a_leak():
    manifest = _manifest()
    split = split_frame(manifest, "patient", seed=0)
    patient = manifest["patient_id"].iloc[0]
    leak = split["image_id"] == manifest.loc[manifest["patient_id"] == patient, "image_id"].iloc[0]
    split.loc[leak, "split"] = "test" if split.loc[leak, "split"].iloc[0] != "test" else "train"
    with pytest.raises(ValueError, match=f"patient leakage.*{patient}"):
        check_patient_disjoint(split, manifest)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"fractions": (0.6, 0.1, 0.2)}, "must sum to 1"),
        ({"fractions": (0.6, 0.4)}, "three non-negative"),
        ({"fractions": (1.2, -0.1, -0.1)}, "three non-negative"),
        ({"scheme": "random"}, "unknown split scheme"),
        ({"scheme": "patient-kfold", "folds": 1}, "folds must be >= 2"),
        ({"scheme": "patient-kfold", "folds": 20}, "folds=20 needs at least 20 patients"),
    ],
)
def test_bad_parameters_are_rejected(tmp_path, kwargs, message):
    root = str(tmp_path)
    storage.write_parquet_atomic(
        _manifest(),
        manifest_uri(root),
        schema=MANIFEST_SCHEMA,
        metadata={"dala.schema_version": SCHEMA_VERSION},
    )
    with pytest.raises(ValueError, match=message):
        make_split(root, **{"scheme": "paper", **kwargs})
    assert not storage.exists(f"{root}/splits/paper.parquet")


def test_split_records_the_data_version_and_missing_split_is_a_clear_error(tmp_path):
    root = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="dala split"):
        read_split(root, "patient")
    storage.write_parquet_atomic(
        _manifest(),
        manifest_uri(root),
        schema=MANIFEST_SCHEMA,
        metadata={"dala.schema_version": SCHEMA_VERSION},
    )
    make_split(root, "patient")
    assert read_split(root, "patient").attrs["dala.manifest_version"] == data_version(_manifest())


def test_a_patient_has_one_split_at_every_magnification(root):
    make_split(root, "patient", seed=2)
    merged = read_split(root, "patient").merge(
        _manifest()[["image_id", "patient_id", "slide_id"]], on="image_id"
    )
    assert merged.groupby("patient_id")["split"].nunique().max() == 1
    # cases with two slides exist, and both slides of a case share one split
    multi = merged.groupby("patient_id")["slide_id"].nunique()
    assert (multi > 1).sum() >= 5


def test_group_by_slide_reproduces_folder_level_grouping(root):
    manifest = _manifest()
    by_slide = split_frame(manifest, "patient", seed=0, group_by="slide")
    merged = by_slide.merge(manifest[["image_id", "patient_id", "slide_id"]], on="image_id")
    assert merged.groupby("slide_id")["split"].nunique().max() == 1
    check_patient_disjoint(by_slide, manifest, group_by="slide")
    make_split(root, "patient", seed=0, group_by="slide")
    assert read_split(root, "patient").attrs["dala.group_by"] == "slide"
    with pytest.raises(ValueError, match="group_by"):
        split_frame(manifest, "patient", group_by="folder")


@pytest.mark.parametrize("unit", ["slide_id", "sha256"])
def test_disjointness_check_catches_a_planted_slide_or_content_straddle(unit):
    manifest = _manifest()
    split = split_frame(manifest, "patient", seed=0, group_by="slide")
    train = split[split["split"] == "train"]["image_id"].iloc[0]
    test = split[split["split"] == "test"]["image_id"].iloc[0]
    planted = manifest.copy()
    source = planted.loc[planted["image_id"] == train, unit].iloc[0]
    planted.loc[planted["image_id"] == test, unit] = source
    name = {"slide_id": "slide", "sha256": "image content"}[unit]
    with pytest.raises(ValueError, match=f"{name} leakage"):
        check_patient_disjoint(split, planted, group_by="slide")


def test_split_identity_is_recorded_and_hashes_the_assignment(root):
    make_split(root, "patient", seed=4)
    identity = split_identity(root, "patient")
    assert identity["scheme"] == "patient" and identity["seed"] == 4
    assert identity["group_by"] == "patient" and identity["fractions"] == [0.6, 0.1, 0.3]
    assert identity["hash"] == split_hash(read_split(root, "patient"))
    balance = json.loads(read_split(root, "patient").attrs["dala.balance"])
    assert set(balance) == {f"{m}/{c}" for m in (40, 100, 200, 400) for c in (0, 1)}
    make_split(root, "patient", seed=5)
    assert split_identity(root, "patient")["hash"] != identity["hash"]
    make_split(root, "patient", seed=4)
    assert split_identity(root, "patient")["hash"] == identity["hash"]
