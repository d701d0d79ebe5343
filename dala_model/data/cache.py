"""Decoded-image cache: each good image decoded once, resized, stored as uint8, read by mmap.

Training at 224x224 would otherwise re-decode 700x460 PNGs every epoch. Layout under
``ROOT/cache/<size>/``:

- ``shard-<hash>.npy``: ``uint8 [N, size, size, 3]`` written with ``np.save``, so a local copy
  opens with ``np.load(mmap_mode="r")`` and rows are read straight from the page cache. ``<hash>``
  is the sha256 of the file's bytes: shards are content-addressed and immutable, new images go into
  new shards, an existing shard is never rewritten.
- ``index.parquet``: ``image_id, shard, row``. The image id is itself a content hash, so a changed
  image gets a new id and only it is decoded again.

Remote shards (S3) are downloaded once into the local shard cache (``$DALA_CACHE_DIR``, default
``~/.cache/dala``), keyed by the shard's content hash, then memory-mapped like local ones.

Resizing is Pillow's bilinear resize (antialiased when shrinking) straight to ``size x size``: the
paper's plain resize to 224x224, and what torchvision's ``Resize`` does on PIL images. The decode
before it is ``dala_model.data._decode.decode_rgb`` (libspng where it gives Pillow's pixels bit
for bit, Pillow otherwise), the same as ingest's, so both fill the cache with the same pixels.

One writer at a time per root and size: two concurrent builders would each rewrite the index.
A writer killed between a shard and the index update leaves an unreferenced shard, never a
wrong index entry.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem
from PIL import Image
from tqdm import tqdm

from dala_model import storage
from dala_model.data._decode import decode_rgb, resize_rgb
from dala_model.data._pool import bounded_map, default_workers
from dala_model.data.manifest import read_manifest
from dala_model.layout import RootLayout

log = logging.getLogger(__name__)

INDEX_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("row", pa.int32(), nullable=False),
    ]
)
SHARD_BYTES = 64 * 2**20  # about 440 images at 224: bounded memory while building, few files


def cache_uri(root: str, size: int) -> str:
    return RootLayout(root).cache(size)


def resize(image: Image.Image, size: int) -> np.ndarray:
    """``image`` as RGB, resized to ``size x size`` with Pillow's bilinear filter: uint8 HxWx3."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def read_index(root: str, size: int) -> pd.DataFrame:
    uri = RootLayout(root).cache_index(size)
    if not storage.exists(uri):
        return pd.DataFrame({name: pd.Series(dtype=object) for name in INDEX_SCHEMA.names})
    return storage.read_parquet(uri)


class ShardWriter:
    """Collects resized images and writes them as new shards, updating the index after each.

    Ids already in the index (or already added) are skipped, so callers can offer every image.
    """

    def __init__(self, root: str, size: int) -> None:
        self.root, self.size = root, int(size)
        self.index = read_index(root, size)
        self._known = set(self.index["image_id"])
        self._ids: list[str] = []
        self._arrays: list[np.ndarray] = []
        self._capacity = max(1, SHARD_BYTES // (self.size * self.size * 3))
        self._lock = threading.Lock()
        self.added = 0

    def wants(self, image_id: str) -> bool:
        return image_id not in self._known

    def add(self, image_id: str, array: np.ndarray) -> None:
        if array.shape != (self.size, self.size, 3) or array.dtype != np.uint8:
            raise ValueError(f"cache entry {image_id} has shape {array.shape} {array.dtype}")
        with self._lock:
            if image_id in self._known:
                return
            self._known.add(image_id)
            self._ids.append(image_id)
            self._arrays.append(array)
            if len(self._ids) >= self._capacity:
                self._flush()

    def close(self) -> int:
        with self._lock:
            self._flush()
        return self.added

    def _flush(self) -> None:
        if not self._ids:
            return
        buffer = io.BytesIO()
        np.save(buffer, np.stack(self._arrays), allow_pickle=False)
        data = buffer.getvalue()
        shard = f"shard-{hashlib.sha256(data).hexdigest()[:16]}.npy"
        base = cache_uri(self.root, self.size)
        storage.write_bytes_atomic(storage.join(base, shard), data)
        new = pd.DataFrame({"image_id": self._ids, "shard": shard, "row": range(len(self._ids))})
        self.index = pd.concat([self.index, new], ignore_index=True) if len(self.index) else new
        storage.write_parquet_atomic(
            self.index, RootLayout(self.root).cache_index(self.size), schema=INDEX_SCHEMA
        )
        self.added += len(self._ids)
        self._ids, self._arrays = [], []


def decode_verified(uri: str, sha256: str, size: int) -> np.ndarray:
    """Read ``uri``, check it is still the file ingest saw, and decode + resize it."""
    data = storage.read_bytes(uri)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(
            f"{storage.redact(uri)} changed since ingest (sha256 differs): re-run `dala ingest`"
        )
    return resize_rgb(decode_rgb(data), size)  # libspng where identical to Pillow (see _decode)


def build_cache(root: str, size: int = 224, workers: int | None = None) -> int:
    """Decode and cache every manifest image missing from ``ROOT/cache/<size>``; return how many.

    Each file's sha256 is checked against the manifest, so a file changed since ingest is an
    error (re-run ingest) rather than a silently wrong cache entry.
    """
    if int(size) <= 0:
        raise ValueError(f"cache size must be a positive number of pixels, got {size}")
    manifest = read_manifest(root)
    writer = ShardWriter(root, size)
    todo = manifest[[writer.wants(i) for i in manifest["image_id"]]]
    if todo.empty:
        return 0
    rows = list(todo[["image_id", "uri", "sha256"]].itertuples(index=False))

    def decode(row: tuple[str, str, str]) -> tuple[str, np.ndarray]:
        image_id, uri, sha = row
        return image_id, decode_verified(uri, sha, size)

    # On an error (a file changed since ingest) what was decoded so far is still committed.
    try:
        with ThreadPoolExecutor(workers or default_workers()) as pool:
            for image_id, array in tqdm(
                bounded_map(pool, decode, rows, window=4 * (workers or default_workers())),
                total=len(rows),
                desc=f"cache {size}",
                unit="img",
                disable=None,
            ):
                writer.add(image_id, array)
    finally:
        added = writer.close()
    return added


def missing_from_cache(root: str, image_ids: Iterable[str], size: int) -> list[str]:
    known = set(_index(root, int(size)).index)
    return [i for i in image_ids if i not in known]


def load_images(root: str, image_ids: Sequence[str], size: int) -> np.ndarray:
    """The cached images for ``image_ids``, in that order: contiguous uint8 ``(N, size, size, 3)``."""
    ids = list(image_ids)
    index = _index(root, int(size))
    out = np.empty((len(ids), size, size, 3), dtype=np.uint8)
    if not ids:
        return out
    try:
        located = index.loc[ids]
    except KeyError:
        missing = [i for i in ids if i not in index.index]
        raise KeyError(
            f"{len(missing)} image(s) not in the {size}px cache under {storage.redact(root)} "
            f"(e.g. {missing[:5]}): run `dala cache {storage.redact(root)} --size {size}`"
        ) from None
    located = located.reset_index(drop=True)
    located["position"] = np.arange(len(ids))
    for shard, group in located.groupby("shard", sort=False):
        group = group.sort_values("row", kind="stable")  # ascending rows read the mmap in order
        out[group["position"].to_numpy()] = _open_shard(root, int(size), shard)[
            group["row"].to_numpy()
        ]
    return out


def _index(root: str, size: int) -> pd.DataFrame:
    """The index as a frame keyed by image_id, re-read only when the file's ETag/mtime changes."""
    fs, path = storage.filesystem(RootLayout(root).cache_index(size))
    info = fs.info(path) if fs.exists(path) else {}
    return _read_index_cached(root, size, str(info.get("ETag") or info.get("mtime") or ""))


@functools.lru_cache(maxsize=8)
def _read_index_cached(root: str, size: int, version: str) -> pd.DataFrame:
    return read_index(root, size).set_index("image_id")


@functools.lru_cache(maxsize=256)
def _open_shard(root: str, size: int, shard: str) -> np.ndarray:
    uri = storage.join(cache_uri(root, size), shard)
    fs, path = storage.filesystem(uri)
    if not isinstance(fs, LocalFileSystem):
        local = Path(os.environ.get("DALA_CACHE_DIR") or Path.home() / ".cache" / "dala") / shard
        if not local.exists():
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f"{shard}.tmp-{os.getpid()}-{threading.get_ident()}")
            fs.get_file(path, str(tmp))
            digest = hashlib.sha256(tmp.read_bytes()).hexdigest()[:16]
            if shard != f"shard-{digest}.npy":
                tmp.unlink()
                raise ValueError(f"{storage.redact(uri)} is corrupt (content hash {digest})")
            os.replace(tmp, local)
        path = str(local)
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    if array.dtype != np.uint8 or array.shape[1:] != (size, size, 3):
        raise ValueError(
            f"{storage.redact(uri)} holds {array.shape} {array.dtype}, not {size}px RGB"
        )
    return array
