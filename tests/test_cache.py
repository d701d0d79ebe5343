"""The decoded cache on both backends: exact round trip, order, incremental shards, clear errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dala_model import storage
from dala_model.data.cache import (
    build_cache,
    cache_uri,
    load_images,
    missing_from_cache,
    read_index,
    resize,
)
from dala_model.data.ingest import ingest
from dala_model.data.manifest import read_manifest


def _write_images(source: str, names: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        pixels = rng.integers(0, 256, (46, 70, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        storage.write_bytes_atomic(f"{source}/{name}", buffer.getvalue())


def _shards(root: str, size: int) -> dict[str, bytes]:
    return {
        url: storage.read_bytes(url) for url in storage.list_files(cache_uri(root, size), (".npy",))
    }


def test_cache_round_trip_order_and_incremental_build(storage_root, tmp_path, monkeypatch):
    monkeypatch.setenv("DALA_CACHE_DIR", str(tmp_path / "shards"))
    source = f"{storage_root}/source"
    names = [f"SOB_M_MC-14-{1000 + i}-100-001.png" for i in range(5)]
    _write_images(source, names, seed=0)
    ingest(source, storage_root, workers=2, cache_size=None)
    assert build_cache(storage_root, 24) == 5
    first_shards = _shards(storage_root, 24)
    assert len(first_shards) == 1

    manifest = read_manifest(storage_root)
    ids = list(manifest["image_id"])
    wanted = [ids[3], ids[0], ids[3], ids[4]]  # any order, repeats allowed
    got = load_images(storage_root, wanted, 24)
    assert got.shape == (4, 24, 24, 3) and got.dtype == np.uint8 and got.flags["C_CONTIGUOUS"]
    by_id = dict(zip(manifest["image_id"], manifest["uri"], strict=True))
    for image_id, pixels in zip(wanted, got, strict=True):
        expected = resize(Image.open(io.BytesIO(storage.read_bytes(by_id[image_id]))), 24)
        np.testing.assert_array_equal(pixels, expected)

    # new images go into a new shard; the existing shard is never rewritten
    _write_images(source, [f"SOB_M_MC-14-{2000 + i}-100-001.png" for i in range(2)], seed=1)
    ingest(source, storage_root, workers=2, cache_size=None)
    assert build_cache(storage_root, 24) == 2
    assert build_cache(storage_root, 24) == 0
    shards = _shards(storage_root, 24)
    assert len(shards) == 2 and {u: shards[u] for u in first_shards} == first_shards
    all_ids = list(read_manifest(storage_root)["image_id"])
    assert missing_from_cache(storage_root, all_ids, 24) == []
    assert sorted(read_index(storage_root, 24)["image_id"]) == sorted(all_ids)
    assert load_images(storage_root, all_ids, 24).shape == (7, 24, 24, 3)


def test_missing_ids_name_the_ids_and_the_command(tmp_path):
    source, root = str(tmp_path / "source"), str(tmp_path / "root")
    _write_images(source, ["SOB_B_F-14-3000-40-001.png"], seed=2)
    ingest(source, root, cache_size=16)
    image_id = read_manifest(root)["image_id"][0]
    assert missing_from_cache(root, [image_id, "0123456789abcdef"], 16) == ["0123456789abcdef"]
    with pytest.raises(KeyError, match=r"0123456789abcdef.*run `dala cache .* --size 16`"):
        load_images(root, [image_id, "0123456789abcdef"], 16)
    with pytest.raises(KeyError, match="not in the 32px cache"):
        load_images(root, [image_id], 32)


def test_a_file_changed_after_ingest_is_refused(tmp_path):
    source, root = str(tmp_path / "source"), str(tmp_path / "root")
    _write_images(source, ["SOB_B_F-14-3001-40-001.png"], seed=3)
    ingest(source, root, cache_size=None)
    _write_images(source, ["SOB_B_F-14-3001-40-001.png"], seed=4)
    with pytest.raises(ValueError, match="changed since ingest"):
        build_cache(root, 16)
