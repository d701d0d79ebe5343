"""Train/validation/test splits, written once per scheme and read by every run.

Each magnification is split on its own (the paper trains one model per magnification).

- ``paper``: the paper's protocol. Images of each (magnification, class) are shuffled and cut at
  ``round(n * train)`` and ``round(n * val)``; the rest is test. Every split is within one image of
  its fraction per magnification and class. Patients leak across splits: near-duplicate tiles of
  one slide end up in train and test, which inflates accuracy (Bussola et al., arXiv:1909.06539).
- ``patient``: patient-disjoint. Patients of each (magnification, class) are shuffled, then each
  goes, in that order, to the split that is furthest below its image target (``fraction * images``).
  This greedy fill keeps every patient in one split, stratifies by class (each patient has one
  label: BreakHis labels slides), and lands close to the target image counts; the seed changes which
  patients go where. With few patients a split can be empty or off its fraction by a patient.
- ``patient-kfold``: ``folds`` patient-disjoint folds per magnification from scikit-learn's
  ``StratifiedGroupKFold`` (groups = patients, stratified by class). Fold ``k`` tests on group
  fold ``k``; validation patients are carved from the remaining patients by the same greedy fill
  (``val / (train + val)`` of their images); the rest train. Every image appears once per fold.

Files hold ``image_id, magnification, split`` (and ``fold`` for k-fold); the Parquet metadata holds
the scheme, seed, fractions, folds and the manifest version they were made from.
:func:`check_patient_disjoint` runs before a patient scheme is written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
from sklearn.model_selection import StratifiedGroupKFold

from dala_model import storage
from dala_model.data.manifest import data_version, read_manifest

SCHEMES = ("paper", "patient", "patient-kfold")
SPLITS = ("train", "val", "test")
SPLIT_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("magnification", pa.int16(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("fold", pa.int16(), nullable=False),
    ]
)
_SINGLE_SCHEMA = SPLIT_SCHEMA.remove(SPLIT_SCHEMA.get_field_index("fold"))


def split_uri(root: str, scheme: str) -> str:
    return storage.join(root, "splits", f"{check_scheme(scheme)}.parquet")


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown split scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    return scheme


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or any(not math.isfinite(f) or f < 0 for f in values):
        raise ValueError(
            f"fractions must be three non-negative numbers (train, val, test), got {fractions}"
        )
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(
            f"fractions (train, val, test) must sum to 1, got {fractions} (sum {sum(values):g})"
        )
    return values  # type: ignore[return-value]


def make_split(
    root: str,
    scheme: str,
    seed: int = 0,
    fractions: Sequence[float] = (0.6, 0.1, 0.3),
    folds: int = 5,
) -> str:
    """Split the manifest under ``root`` with ``scheme``; write and return ``ROOT/splits/<scheme>.parquet``."""
    check_scheme(scheme)
    fractions = check_fractions(fractions)
    if scheme == "patient-kfold" and folds < 2:
        raise ValueError(f"folds must be >= 2 for patient-kfold, got {folds}")
    if scheme == "patient-kfold" and fractions[0] <= 0:
        raise ValueError(f"fractions: patient-kfold needs a train fraction > 0, got {fractions}")
    manifest = read_manifest(root)
    split = split_frame(manifest, scheme, seed=seed, fractions=fractions, folds=folds)
    if scheme != "paper":
        check_patient_disjoint(split, manifest)
    uri = split_uri(root, scheme)
    storage.write_parquet_atomic(
        split,
        uri,
        schema=SPLIT_SCHEMA if scheme == "patient-kfold" else _SINGLE_SCHEMA,
        metadata={
            "dala.scheme": scheme,
            "dala.seed": str(seed),
            "dala.fractions": json.dumps(list(fractions)),
            "dala.folds": str(folds if scheme == "patient-kfold" else 1),
            "dala.manifest_version": data_version(manifest),
        },
    )
    return uri


def read_split(root: str, scheme: str) -> pd.DataFrame:
    """The split file for ``scheme``; seed, scheme and fractions are in ``.attrs``."""
    uri = split_uri(root, scheme)
    if not storage.exists(uri):
        raise FileNotFoundError(
            f"no {scheme} split at {storage.redact(uri)}: run `dala split {storage.redact(root)} --scheme {scheme}`"
        )
    return storage.read_parquet(uri)


def split_frame(
    manifest: pd.DataFrame,
    scheme: str,
    seed: int = 0,
    fractions: Sequence[float] = (0.6, 0.1, 0.3),
    folds: int = 5,
) -> pd.DataFrame:
    """The split table for a manifest frame (no I/O), sorted by (fold,) magnification, image_id.

    Only ``patient-kfold`` has a ``fold`` column, as in the storage contract.
    """
    check_scheme(scheme)
    fractions = check_fractions(fractions)
    rng = np.random.default_rng(seed)
    frame = manifest[["image_id", "magnification", "label_id", "patient_id"]].sort_values(
        "image_id"
    )
    parts = []
    for magnification, images in frame.groupby("magnification", sort=True):
        if scheme == "paper":
            parts.append(_paper(images, fractions, rng).assign(fold=0))
        elif scheme == "patient":
            parts.append(_patient(images, fractions, rng).assign(fold=0))
        else:
            parts.extend(_patient_kfold(images, fractions, folds, seed, int(magnification), rng))
    split = pd.concat(parts, ignore_index=True)[SPLIT_SCHEMA.names]
    split = split.sort_values(["fold", "magnification", "image_id"], ignore_index=True)
    return split if scheme == "patient-kfold" else split.drop(columns="fold")


def _paper(
    images: pd.DataFrame, fractions: tuple[float, ...], rng: np.random.Generator
) -> pd.DataFrame:
    parts = []
    for _, group in images.groupby("label_id", sort=True):
        order = group.iloc[rng.permutation(len(group))]
        n_train = round(len(group) * fractions[0])
        n_val = round(len(group) * fractions[1])
        names = ["train"] * n_train + ["val"] * n_val + ["test"] * (len(group) - n_train - n_val)
        parts.append(order.assign(split=names))
    return pd.concat(parts)


def _patient(
    images: pd.DataFrame, fractions: Sequence[float], rng: np.random.Generator
) -> pd.DataFrame:
    assignment = _greedy_patients(images, fractions, SPLITS, rng)
    return images.assign(split=images["patient_id"].map(assignment))


def _greedy_patients(
    images: pd.DataFrame, fractions: Sequence[float], names: Sequence[str], rng: np.random.Generator
) -> dict[str, str]:
    """Assign whole patients, class by class, to the split furthest below its image target."""
    labels = images.groupby("patient_id")["label_id"].agg(["min", "max", "size"])
    mixed = labels.index[labels["min"] != labels["max"]]
    if len(mixed):
        raise ValueError(f"patients with both benign and malignant images: {list(mixed)[:5]}")
    assignment: dict[str, str] = {}
    for _, group in labels.groupby("min", sort=True):
        targets = np.asarray(fractions, dtype=float) * group["size"].sum()
        filled = np.zeros(len(names))
        for patient in group.index[rng.permutation(len(group))]:
            choice = int(np.argmax(targets - filled))
            assignment[patient] = names[choice]
            filled[choice] += group.at[patient, "size"]
    return assignment


def _patient_kfold(
    images: pd.DataFrame,
    fractions: Sequence[float],
    folds: int,
    seed: int,
    magnification: int,
    rng: np.random.Generator,
) -> list[pd.DataFrame]:
    per_class = images.groupby("label_id")["patient_id"].nunique()
    if len(per_class) < 2 or per_class.min() < folds:
        raise ValueError(
            f"folds={folds} needs at least {folds} patients of each class at {magnification}X; "
            f"found {per_class.to_dict()} (label_id: patients): lower --folds"
        )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    inner = (fractions[0], fractions[1])
    parts = []
    for fold, (rest, _test) in enumerate(
        splitter.split(images, images["label_id"], groups=images["patient_id"])
    ):
        remaining = images.iloc[rest]
        assignment = _greedy_patients(
            remaining, [f / sum(inner) for f in inner], ("train", "val"), rng
        )
        split = pd.Series("test", index=images.index)
        split.iloc[rest] = remaining["patient_id"].map(assignment).to_numpy()
        parts.append(images.assign(split=split, fold=fold))
    return parts


def check_patient_disjoint(split: pd.DataFrame, manifest: pd.DataFrame) -> None:
    """Raise ``ValueError`` if any patient appears in two splits of one magnification and fold."""
    merged = split.merge(manifest[["image_id", "patient_id"]], on="image_id", how="left")
    if merged["patient_id"].isna().any():
        unknown = merged.loc[merged["patient_id"].isna(), "image_id"].head(5).tolist()
        raise ValueError(f"split has image_ids that are not in the manifest, e.g. {unknown}")
    keys = ["magnification", "fold"] if "fold" in merged else ["magnification"]
    spread = merged.groupby([*keys, "patient_id"])["split"].nunique()
    leaking = spread[spread > 1]
    if len(leaking):
        raise ValueError(
            f"patient leakage: {len(leaking)} patient(s) in more than one split, e.g. "
            f"{[dict(zip([*keys, 'patient_id'], k, strict=True)) for k in leaking.index[:3]]}"
        )
