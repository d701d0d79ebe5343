"""Ingest of a big bucket spread over a cluster: plan the partitions, stage each, commit once.

The expensive per-file work of ingest (read, hash, verify, decode, resize) spreads over a cluster
in three library steps, so any scheduler can drive them: a ``concurrent.futures.Executor``
(``ingest_distributed``: a Dask ``Client.get_executor()``, a process pool) or one Prefect task
per partition on a Dask cluster (``flows/ingest.py`` with ``dask_address``; this package never
imports Prefect):

1. ``plan_ingest`` (where the flow runs): the source's image folders, none inside another (for
   BreakHis one per patient and magnification, 328 similar-sized tasks), and a fresh staging
   folder ``ROOT/staging/ingest-<id>/``.
2. ``stage_partition`` (on a worker, any number of times): the ordinary
   ``dala_model.data.ingest.ingest`` of one folder into a staging root of its own, with ingest's
   own rules. Each call writes into a new attempt folder and returns it, so a partition rerun
   after a lost worker, or run twice at once by a scheduler that presumed a worker dead, never
   shares a folder with another attempt: the commit reads only the attempt whose result came
   back, one per partition, and what a lost attempt left is removed with the staging folder.
   Cache shards are named by the hash of their bytes, so a rerun's shards are the same files.
3. ``commit_ingest`` (where the flow runs, the single writer): the staged rows become the
   previous manifest of one ordinary ingest of the whole source, which reuses every staged row
   (rows are keyed by uri there, so none can be counted twice) and re-reads only what the folders
   rejected. The manifest, quarantine and duplicate lists are therefore by construction what the
   default path writes, and they are published in ingest's commit order (cache, quarantine,
   duplicates, manifest last), each write atomic: a commit killed at any point leaves the
   previous manifest.

``discard_staging`` removes the staging folder; callers run it whatever happened.
"""

from __future__ import annotations

import dataclasses
import posixpath
import uuid
from collections.abc import Sequence
from concurrent.futures import Executor

import pandas as pd

from dala_model import storage
from dala_model.data import cache
from dala_model.data.breakhis import IMAGE_SUFFIXES
from dala_model.data.ingest import IngestResult, canonical_source, ingest
from dala_model.data.manifest import (
    MANIFEST_SCHEMA,
    SCHEMA_VERSION,
    duplicates_uri,
    manifest_uri,
    quarantine_uri,
)
from dala_model.layout import RootLayout


@dataclasses.dataclass(frozen=True)
class IngestPlan:
    """What every step of one distributed ingest needs: small, picklable, sent to each worker."""

    source: str  # canonical: URLs as given, local paths absolute (workers share the file system)
    root: str
    staging: str  # ROOT/staging/ingest-<id>
    folders: tuple[str, ...]  # relative to source; "" is the whole source
    cache_size: int | None

    def __len__(self) -> int:
        return len(self.folders)


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


def plan_ingest(source: str, root: str, cache_size: int | None = 224) -> IngestPlan:
    """List ``source``'s partitions and prove ``root`` writable, before any worker starts."""
    if cache_size is not None and cache_size < 0:
        raise ValueError(f"cache_size must be >= 0 (0 skips the cache), got {cache_size}")
    source = canonical_source(source)
    folders = ingest_partitions(source)
    storage.check_writable(root)
    staging = RootLayout(root).staging(f"ingest-{uuid.uuid4().hex[:12]}")
    return IngestPlan(source, root, staging, tuple(folders), cache_size)


def stage_partition(plan: IngestPlan, index: int) -> str:
    """Ingest partition ``index`` of ``plan`` into a new attempt folder; return that folder.

    Runs on a cluster worker; safe to run again, or twice at once (see the module docstring)."""
    if not 0 <= index < len(plan.folders):
        raise IndexError(f"partition {index} of a plan with {len(plan.folders)} partitions")
    folder = plan.folders[index]
    attempt = storage.join(plan.staging, "parts", str(index), uuid.uuid4().hex[:12])
    ingest(
        storage.join(plan.source, folder) if folder else plan.source,
        attempt,
        cache_size=plan.cache_size,
    )
    return attempt


def commit_ingest(plan: IngestPlan, staged: Sequence[str]) -> IngestResult:
    """Merge the staged partitions (``staged[k]`` from ``stage_partition(plan, k)``) into ``root``.

    The single writer of ``root``'s manifests and cache index; run it once, after every partition
    returned. Running it again after a failure is safe (shards already moved are skipped)."""
    if len(staged) != len(plan.folders):
        raise ValueError(
            f"commit_ingest needs one staged folder per partition: got {len(staged)} for "
            f"{len(plan.folders)} partitions"
        )
    prefix = storage.join(plan.staging, "parts")
    for k, part in enumerate(staged):
        if not part.startswith(storage.join(prefix, str(k)) + "/"):
            raise ValueError(
                f"staged[{k}] = {storage.redact(part)} is not an attempt of partition {k} of "
                f"{storage.redact(plan.staging)}: pass stage_partition(plan, {k})'s result"
            )
    final = storage.join(plan.staging, "final")
    _seed_from_parts(plan.source, plan.folders, staged, final, plan.root, plan.cache_size)
    result = ingest(plan.source, final, cache_size=plan.cache_size)
    _publish(final, plan.root, plan.cache_size)
    return dataclasses.replace(result, root=storage.redact(plan.root))


def discard_staging(plan: IngestPlan) -> None:
    """Remove ``plan``'s staging folder (every attempt's output); nothing if it is already gone."""
    fs, path = storage.filesystem(plan.staging)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def ingest_distributed(
    source: str, root: str, executor: Executor, cache_size: int | None = 224
) -> IngestResult:
    """``ingest(source, root, cache_size=...)`` with the per-file work spread over ``executor``.

    Every worker must reach ``source`` and ``root`` (object storage, or a shared file system for
    a local cluster). The staged folders live under ``ROOT/staging/`` and are removed at the end.
    Each call reads every source file on the workers: for a re-ingest of a mostly unchanged
    source, the default ``ingest`` (which reuses unchanged rows) is cheaper.
    """
    plan = plan_ingest(source, root, cache_size)
    try:
        staged = list(executor.map(stage_partition, [plan] * len(plan), range(len(plan))))
        return commit_ingest(plan, staged)
    finally:
        discard_staging(plan)


def _seed_from_parts(
    source: str,
    folders: Sequence[str],
    parts: Sequence[str],
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
        RootLayout(final).cache_index(cache_size),
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
            RootLayout(root).cache_index(cache_size),
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
