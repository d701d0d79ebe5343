"""Train/validation/test splits, written once per scheme and read by every run.

- ``paper``: the paper's protocol, per magnification (the paper trains one model per
  magnification). Images of each (magnification, class) are shuffled and cut at
  ``round(n * train)`` and ``round(n * val)``; the rest is test. Every split is within one image of
  its fraction per magnification and class. Patients leak across splits: near-duplicate tiles of
  one slide end up in train and test, which inflates accuracy (Bussola et al., arXiv:1909.06539).
- ``patient``: patient-disjoint. Each patient (a BreakHis *case*: lettered slides 14-22549AB/CD/G
  are one patient, see ``dala_model.data.breakhis``) gets ONE split for all four magnifications,
  so a patient trained on at 40X is never tested at 100X and multi-magnification comparisons and
  fusion stay honest. Patients of each class are shuffled, then each goes, in that order, to the
  split furthest below its image targets, summed over the magnifications as shares of each
  magnification's target (a greedy fill that keeps every magnification near its fractions);
  each patient has one label (BreakHis labels slides, and a case's slides share the class), so
  this also stratifies by class. With few patients a split can be empty at a magnification or
  off its fraction by a patient: the per-(magnification, class) counts are stored in the file's
  metadata (``dala.balance``) and an empty split is logged.
- ``patient-kfold``: ``folds`` patient-disjoint folds from scikit-learn's ``StratifiedGroupKFold``
  (groups = patients, stratified by class), the same folds at every magnification. Fold ``k``
  tests on group fold ``k``; validation patients are carved from the remaining patients by the
  same greedy fill (``val / (train + val)`` of their images); the rest train.

``group_by="slide"`` (``dala split --group-by slide``) groups by slide folder instead, as this
project did before cases were grouped: it reproduces folder-level splits and knowingly lets two
slides of one case straddle a split, so use it only to compare with such numbers.

Files hold ``image_id, magnification, split`` (and ``fold`` for k-fold). The Parquet metadata holds
the split's identity: scheme, seed, grouping, fractions, folds, the manifest version it was made
from and ``dala.split_hash``, a content hash of the assignment itself (image, split, fold) that
runs record, so a run resumed or reported on another split is refused rather than mixed.
:func:`check_patient_disjoint` runs before a patient scheme is written: it refuses a patient, a
slide or an image content hash (one image under two names) that straddles splits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from dala_model import storage
from dala_model.data.manifest import data_version, read_manifest
from dala_model.layout import RootLayout

log = logging.getLogger(__name__)

SCHEMES = ("paper", "patient", "patient-kfold")
GROUPINGS = {"patient": "patient_id", "slide": "slide_id"}
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
    return RootLayout(root).split(check_scheme(scheme))


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


def check_group_by(group_by: str) -> str:
    if group_by not in GROUPINGS:
        raise ValueError(
            f"unknown group_by {group_by!r}: choose 'patient' (the case, the default) or 'slide'"
        )
    return group_by


def make_split(
    root: str,
    scheme: str,
    seed: int = 0,
    fractions: Sequence[float] = (0.6, 0.1, 0.3),
    folds: int = 5,
    group_by: str = "patient",
) -> str:
    """Split the manifest under ``root`` with ``scheme``; write and return ``ROOT/splits/<scheme>.parquet``."""
    check_scheme(scheme)
    check_group_by(group_by)
    fractions = check_fractions(fractions)
    if scheme == "patient-kfold" and folds < 2:
        raise ValueError(f"folds must be >= 2 for patient-kfold, got {folds}")
    if scheme == "patient-kfold" and fractions[0] <= 0:
        raise ValueError(f"fractions: patient-kfold needs a train fraction > 0, got {fractions}")
    manifest = read_manifest(root)
    split = split_frame(
        manifest, scheme, seed=seed, fractions=fractions, folds=folds, group_by=group_by
    )
    if scheme != "paper":
        check_patient_disjoint(split, manifest, group_by=group_by)
    uri = split_uri(root, scheme)
    storage.write_parquet_atomic(
        split,
        uri,
        schema=SPLIT_SCHEMA if scheme == "patient-kfold" else _SINGLE_SCHEMA,
        metadata={
            "dala.scheme": scheme,
            "dala.seed": str(seed),
            "dala.group_by": group_by if scheme != "paper" else "image",
            "dala.fractions": json.dumps(list(fractions)),
            "dala.folds": str(folds if scheme == "patient-kfold" else 1),
            "dala.manifest_version": data_version(manifest),
            "dala.split_hash": split_hash(split),
            "dala.balance": json.dumps(_balance(split, manifest)),
        },
    )
    return uri


def split_hash(split: pd.DataFrame) -> str:
    """Content hash of an assignment: the sorted (image_id, fold, split) rows, 16 hex digits."""
    fold = split["fold"] if "fold" in split.columns else pd.Series(0, index=split.index)
    rows = sorted(zip(split["image_id"], fold.astype(int), split["split"], strict=True))
    digest = hashlib.sha256()
    for image_id, k, name in rows:
        digest.update(f"{image_id}:{k}:{name}\n".encode())
    return digest.hexdigest()[:16]


def split_identity(root: str, scheme: str) -> dict[str, object]:
    """What a run records about the split it trains on: scheme, seed, grouping, fractions, folds,
    manifest version and the assignment's content hash (``None`` for files made before hashes)."""
    attrs = read_split(root, scheme).attrs
    return {
        "scheme": scheme,
        "seed": int(attrs["dala.seed"]) if "dala.seed" in attrs else None,
        "group_by": attrs.get("dala.group_by", "slide" if scheme != "paper" else "image"),
        "fractions": json.loads(attrs["dala.fractions"]) if "dala.fractions" in attrs else None,
        "folds": int(attrs.get("dala.folds", "1")),
        "manifest_version": attrs.get("dala.manifest_version"),
        "hash": attrs.get("dala.split_hash"),
    }


def split_report(root: str, scheme: str) -> pd.DataFrame:
    """Patients and images per (fold,) magnification, class and split: what ``dala split`` prints.

    Patients are counted by case, slides by folder, so a case with lettered slides shows as one
    patient and several slides."""
    split = read_split(root, scheme)
    manifest = read_manifest(root)[["image_id", "label", "patient_id", "slide_id"]]
    merged = split.merge(manifest, on="image_id", how="left")
    keys = [k for k in ("fold", "magnification") if k in merged] + ["label", "split"]
    table = merged.groupby(keys, sort=True).agg(
        patients=("patient_id", "nunique"),
        slides=("slide_id", "nunique"),
        images=("image_id", "size"),
    )
    return table.unstack("split", fill_value=0).reindex(columns=list(SPLITS), level=1)


def read_split(root: str, scheme: str) -> pd.DataFrame:
    """The split file for ``scheme``; its identity (seed, scheme, grouping, hash...) is in ``.attrs``."""
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
    group_by: str = "patient",
) -> pd.DataFrame:
    """The split table for a manifest frame (no I/O), sorted by (fold,) magnification, image_id.

    Only ``patient-kfold`` has a ``fold`` column, as in the storage contract.
    """
    check_scheme(scheme)
    fractions = check_fractions(fractions)
    group = GROUPINGS[check_group_by(group_by)]
    rng = np.random.default_rng(seed)
    columns = ["image_id", "magnification", "label_id", "patient_id"]
    frame = manifest[[*columns, group] if group not in columns else columns]
    frame = frame.sort_values("image_id").rename(columns={group: "group"})
    if scheme == "paper":
        parts = [
            _paper(images, fractions, rng).assign(fold=0)
            for _, images in frame.groupby("magnification", sort=True)
        ]
    elif scheme == "patient":
        assignment = _greedy_groups(frame, fractions, SPLITS, rng)
        parts = [frame.assign(split=frame["group"].map(assignment), fold=0)]
    else:
        parts = _patient_kfold(frame, fractions, folds, seed, rng)
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


def _greedy_groups(
    images: pd.DataFrame, fractions: Sequence[float], names: Sequence[str], rng: np.random.Generator
) -> dict[str, str]:
    """Assign whole groups, class by class, to the split furthest below its image targets.

    A split's deficit is summed over magnifications, each as a share of that magnification's
    target, so a group with many 400X images fills 400X and not the others. When a class has no
    more groups left than there are splits still lacking it, those go to the lacking splits: a
    validation split with one class cannot choose a threshold (``dala_model.calibration``) and a
    test split with one class has no sensitivity or specificity, so each split gets every class
    whenever the class has a group for each (the greedy rule alone once left a 24-patient set's
    validation split without a benign case).
    """
    labels = images.groupby("group")["label_id"].agg(["min", "max"])
    mixed = labels.index[labels["min"] != labels["max"]]
    if len(mixed):
        raise ValueError(f"patients with both benign and malignant images: {list(mixed)[:5]}")
    sizes = images.groupby(["group", "magnification"]).size().unstack(fill_value=0)
    weights = np.asarray(fractions, dtype=float)[:, None]
    assignment: dict[str, str] = {}
    for _, members in labels.groupby("min", sort=True):
        counts = sizes.loc[members.index].to_numpy(dtype=float)  # groups x magnifications
        totals = np.maximum(counts.sum(axis=0), 1.0)
        targets = weights * totals  # splits x magnifications
        filled = np.zeros_like(targets)
        empty = {i for i, w in enumerate(fractions) if w > 0}  # splits without this class yet
        for done, k in enumerate(rng.permutation(len(members))):
            deficit = ((targets - filled) / totals).sum(axis=1)
            if len(members) - done <= len(empty):  # as many groups left as splits lacking it
                deficit = np.where([i in empty for i in range(len(names))], deficit, -np.inf)
            choice = int(np.argmax(deficit))
            assignment[members.index[k]] = names[choice]
            filled[choice] += counts[k]
            empty.discard(choice)
    return assignment


def _patient_kfold(
    images: pd.DataFrame,
    fractions: Sequence[float],
    folds: int,
    seed: int,
    rng: np.random.Generator,
) -> list[pd.DataFrame]:
    per_class = images.groupby("label_id")["group"].nunique()
    if len(per_class) < 2 or per_class.min() < folds:
        raise ValueError(
            f"folds={folds} needs at least {folds} patients of each class; "
            f"found {per_class.to_dict()} (label_id: patients): lower --folds"
        )
    from sklearn.model_selection import StratifiedGroupKFold  # here: about a second to import

    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    inner = (fractions[0], fractions[1])
    parts = []
    for fold, (rest, _test) in enumerate(
        splitter.split(images, images["label_id"], groups=images["group"])
    ):
        remaining = images.iloc[rest]
        assignment = _greedy_groups(
            remaining, [f / sum(inner) for f in inner], ("train", "val"), rng
        )
        split = pd.Series("test", index=images.index)
        split.iloc[rest] = remaining["group"].map(assignment).to_numpy()
        parts.append(images.assign(split=split, fold=fold))
    return parts


def _balance(split: pd.DataFrame, manifest: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Images per split for each (fold, magnification, class); empty splits are logged."""
    merged = split.merge(manifest[["image_id", "label_id"]], on="image_id", how="left")
    keys = (
        ["fold", "magnification", "label_id"] if "fold" in merged else ["magnification", "label_id"]
    )
    counts = merged.groupby([*keys, "split"]).size().unstack(fill_value=0)
    counts = counts.reindex(columns=list(SPLITS), fill_value=0)
    out = {}
    for key, row in counts.iterrows():
        name = "/".join(str(int(k)) for k in (key if isinstance(key, tuple) else (key,)))
        out[name] = {split_name: int(row[split_name]) for split_name in SPLITS}
        empty = [split_name for split_name in SPLITS if row[split_name] == 0]
        if empty:
            log.warning("split %s: no images in %s (too few patients)", name, ", ".join(empty))
    return out


def check_patient_disjoint(
    split: pd.DataFrame, manifest: pd.DataFrame, group_by: str = "patient"
) -> None:
    """Raise ``ValueError`` if a patient, a slide or an image's content straddles two splits.

    Checked within each fold across all magnifications (one assignment per patient). With
    ``group_by="slide"`` cases may knowingly straddle; slides and content hashes still may not.
    """
    keys = ["patient_id", "slide_id", "sha256"]
    merged = split.merge(manifest[["image_id", *keys]], on="image_id", how="left")
    if merged["patient_id"].isna().any():
        unknown = merged.loc[merged["patient_id"].isna(), "image_id"].head(5).tolist()
        raise ValueError(f"split has image_ids that are not in the manifest, e.g. {unknown}")
    folds = ["fold"] if "fold" in merged else []
    units = keys if check_group_by(group_by) == "patient" else keys[1:]
    for unit in units:
        spread = merged.groupby([*folds, unit])["split"].nunique()
        leaking = spread[spread > 1]
        if len(leaking):
            name = {"patient_id": "patient", "slide_id": "slide", "sha256": "image content"}[unit]
            examples = [
                dict(zip([*folds, unit], k if isinstance(k, tuple) else (k,), strict=True))
                for k in leaking.index[:3]
            ]
            raise ValueError(
                f"{name} leakage: {len(leaking)} {name}(s) in more than one split, e.g. {examples}"
            )
