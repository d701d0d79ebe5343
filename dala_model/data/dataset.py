"""Select a magnification's split from the manifest and bring its pixels into memory.

Training reads pixels from the decoded cache (built on demand at the requested size) as one
contiguous uint8 NHWC array: indexing it is a memcpy, so an epoch costs no decoding at all, and
on a GPU the whole array is moved to device memory once. Decoding PNGs is the fallback
(``use_cache=False``), done once per run in a thread pool and never written back.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dala_model import storage
from dala_model.data import cache
from dala_model.data.manifest import data_version, read_manifest
from dala_model.data.splits import read_split

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
COLUMNS = [
    "image_id",
    "uri",
    "label_id",
    "patient_id",
    "slide_id",
    "subtype",
    "magnification",
    "sha256",
]


@dataclass
class SplitImages:
    """One split of one magnification: its manifest rows and their pixels, row-aligned."""

    frame: pd.DataFrame
    images: np.ndarray  # uint8 (N, size, size, 3)

    @property
    def labels(self) -> np.ndarray:
        return self.frame["label_id"].to_numpy(dtype=np.int64)

    def __len__(self) -> int:
        return len(self.frame)


def split_frames(
    root: str, scheme: str, magnification: int, fold: int | None = None
) -> dict[str, pd.DataFrame]:
    """Manifest rows of each split for one magnification (and fold), in a stable order."""
    manifest = read_manifest(root)
    split = read_split(root, scheme)
    made_from = split.attrs.get("dala.manifest_version")
    if made_from is not None and made_from != data_version(manifest):
        raise ValueError(
            f"the {scheme!r} split was made from another manifest (data version {made_from}, now "
            f"{data_version(manifest)}): run `dala split {storage.redact(root)} --scheme {scheme}` again"
        )
    split = split[split["magnification"] == magnification]
    if fold is not None:
        if "fold" not in split.columns:
            raise ValueError(f"split scheme {scheme!r} has no folds; drop fold={fold}")
        split = split[split["fold"] == fold]
        if split.empty:
            raise ValueError(
                f"fold={fold} not found in split {scheme!r}; check the number of folds"
            )
    rows = split[["image_id", "split"]].merge(manifest[COLUMNS], on="image_id", how="inner")
    frames = {}
    for name in SPLITS:
        frame = rows[rows["split"] == name].sort_values("image_id").reset_index(drop=True)
        if frame.empty:
            raise ValueError(
                f"the {name!r} split of scheme {scheme!r} has no images at {magnification}X; "
                "ingest more data or run `dala split` again"
            )
        frames[name] = frame[COLUMNS]
    return frames


def load_pixels(root: str, frame: pd.DataFrame, size: int, use_cache: bool = True) -> np.ndarray:
    """Pixels for ``frame``'s rows: from the decoded cache, building what is missing first."""
    ids = frame["image_id"].tolist()
    if not use_cache:
        log.warning(
            "use_cache=False: decoding %d PNGs for this run only; `dala cache %s --size %d` "
            "makes every later epoch and run skip this",
            len(ids),
            root,
            size,
        )
        return decode_pngs(frame, size)
    if cache.missing_from_cache(root, ids, size):
        log.info("decoded cache at %dpx lacks some images; building it now", size)
        cache.build_cache(root, size)
    return cache.load_images(root, ids, size)


def decode_pngs(frame: pd.DataFrame, size: int, workers: int | None = None) -> np.ndarray:
    """Decode ``frame``'s images exactly as the cache does, refusing files changed since ingest."""
    out = np.empty((len(frame), size, size, 3), dtype=np.uint8)
    rows = zip(frame["uri"], frame["sha256"], strict=True)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # Pillow releases the GIL while decoding
        for i, pixels in enumerate(pool.map(lambda row: cache.decode_verified(*row, size), rows)):
            out[i] = pixels
    return out


def load_split(
    root: str, scheme: str, magnification: int, fold: int | None, size: int, use_cache: bool = True
) -> dict[str, SplitImages]:
    frames = split_frames(root, scheme, magnification, fold)
    return {
        name: SplitImages(frame, load_pixels(root, frame, size, use_cache))
        for name, frame in frames.items()
    }
