"""Ingest of a big bucket spread over any executor (a Dask client, a process pool).

Ingest of a big bucket spreads over a cluster through any ``concurrent.futures.Executor`` (a Dask
``Client.get_executor()``, a process pool): ``ingest_distributed`` runs the ordinary
``dala_model.data.ingest.ingest`` on each folder of the source in parallel, into a staging area under
the root, so the expensive per-file work (read, hash, verify, decode, resize) happens on the
workers with ingest's own rules. Then one ordinary ingest of the whole source finds every staged
row unchanged and reuses it, re-reading only what the folders rejected, so the manifest,
quarantine and duplicate lists are by construction what the default path writes; it is published
in ingest's commit order (cache, quarantine, duplicates, manifest last), each write atomic.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from concurrent.futures import Executor

import pandas as pd

from dala_model import storage
from dala_model.data import cache
from dala_model.data.breakhis import IMAGE_SUFFIXES
from dala_model.data.ingest import IngestResult, ingest
from dala_model.data.manifest import (
    MANIFEST_SCHEMA,
    SCHEMA_VERSION,
    duplicates_uri,
    manifest_uri,
    quarantine_uri,
)


def ingest_partitions(source: str) -> list[str]:
    """Relative folders of ``source`` that hold all of its images between them, none inside another.

    BreakHis keeps each patient's magnification in its own folder (328 of them), which gives many
    similar-sized tasks. Images directly under ``source`` make the whole source one partition.
    """
    files = storage.list_file_infos(source)
    folders = sorted(
        {posixpath.dirname(f.relpath) for f in files if f.relpath.lower().endswith(IMAGE_SUFFIXES)}
    )
    if not folders:
        raise ValueError(
            f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {storage.redact(source)}: "
            "check the source URL"
        )
    kept: list[str] = []
    for folder in folders:  # sorted, so an ancestor comes before its descendants
        if folder == "":
            return [""]
        if not any(folder.startswith(parent + "/") for parent in kept):
            kept.append(folder)
    return kept


def stage_partition(source: str, folder: str, staging: str, cache_size: int | None) -> str:
    """Ingest one folder of ``source`` into its own staging root (runs on a cluster worker)."""
    ingest(storage.join(source, folder) if folder else source, staging, cache_size=cache_size)
    return staging


def ingest_distributed(
    source: str, root: str, executor: Executor, cache_size: int | None = 224
) -> IngestResult:
    """``ingest(source, root, cache_size=...)`` with the per-file work spread over ``executor``.

    Every worker must reach ``source`` and ``root`` (object storage, or a shared file system for
    a local cluster). The staged folders live under ``ROOT/staging/`` and are removed at the end.
    Each call reads every source file on the workers: for a re-ingest of a mostly unchanged
    source, the default ``ingest`` (which reuses unchanged rows) is cheaper.
    """
    source = source if "://" in source else os.path.abspath(source)
    storage.check_writable(root)
    folders = ingest_partitions(source)
    staging = storage.join(root, "staging", f"ingest-{uuid.uuid4().hex[:12]}")
    parts = [storage.join(staging, "parts", str(k)) for k in range(len(folders))]
    final = storage.join(staging, "final")
    try:
        list(
            executor.map(
                stage_partition,
                [source] * len(folders),
                folders,
                parts,
                [cache_size] * len(folders),
            )
        )
        _seed_from_parts(source, folders, parts, final, root, cache_size)
        result = ingest(source, final, cache_size=cache_size)
        _publish(final, root, cache_size)
    finally:
        fs, path = storage.filesystem(staging)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    return result


def _seed_from_parts(
    source: str,
    folders: list[str],
    parts: list[str],
    final: str,
    root: str,
    cache_size: int | None,
) -> None:
    """The staged rows as ``final``'s previous manifest, and their shards in ``root``'s cache."""
    frames = []
    for folder, part in zip(folders, parts, strict=True):
        frame = storage.read_parquet(manifest_uri(part))
        if folder:  # relpaths were relative to the folder; the manifest's are relative to source
            frame["relpath"] = folder + "/" + frame["relpath"]
        frames.append(frame)
    # The metadata ingest checks before reusing a previous manifest's rows (same schema version,
    # same source); if that rule changes, the final ingest re-reads files (slower, still correct).
    storage.write_parquet_atomic(
        pd.concat(frames, ignore_index=True),
        manifest_uri(final),
        schema=MANIFEST_SCHEMA,
        metadata={"dala.schema_version": SCHEMA_VERSION, "dala.source": storage.redact(source)},
    )
    if not cache_size:
        return
    # Shards are content-addressed and immutable: move them straight to the root's cache (an
    # unreferenced shard there is harmless), and give ``final`` an index naming them, so its
    # ingest decodes nothing again.
    indexes = []
    for part in parts:
        index = cache.read_index(part, cache_size)
        _move_shards(part, root, index, cache_size)
        indexes.append(index)
    storage.write_parquet_atomic(
        pd.concat(indexes, ignore_index=True).drop_duplicates("image_id"),
        storage.join(cache.cache_uri(final, cache_size), "index.parquet"),
        schema=cache.INDEX_SCHEMA,
    )


def _publish(final: str, root: str, cache_size: int | None) -> None:
    """Copy ``final``'s outputs to ``root`` in ingest's commit order: cache, lists, manifest last."""
    if cache_size:
        index = cache.read_index(final, cache_size)
        _move_shards(final, root, index, cache_size)  # any that ``final``'s own ingest decoded
        merged = pd.concat(
            [cache.read_index(root, cache_size), index], ignore_index=True
        ).drop_duplicates("image_id")
        storage.write_parquet_atomic(
            merged,
            storage.join(cache.cache_uri(root, cache_size), "index.parquet"),
            schema=cache.INDEX_SCHEMA,
        )
    for uri in (quarantine_uri, duplicates_uri, manifest_uri):
        storage.write_bytes_atomic(uri(root), storage.read_bytes(uri(final)))


def _move_shards(origin: str, root: str, index: pd.DataFrame, size: int) -> None:
    """Move the shards ``index`` names from ``origin``'s cache to ``root``'s (server-side on S3)."""
    target_fs, target = storage.filesystem(cache.cache_uri(root, size))
    target_fs.makedirs(target, exist_ok=True)  # local roots; a no-op on object stores
    for shard in sorted(set(index["shard"])):
        fs, path = storage.filesystem(storage.join(cache.cache_uri(origin, size), shard))
        if fs.exists(path) and not target_fs.exists(f"{target}/{shard}"):
            fs.mv(path, f"{target}/{shard}")
