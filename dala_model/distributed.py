"""Scale-out on existing engines: torch.distributed for training, any executor for ingest.

Training under ``torchrun --nproc-per-node N -m dala_model.cli train ...`` is data parallel
(DistributedDataParallel): torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` and every
process runs the same ``dala_model.train.train``. Each epoch's global order is already a pure
function of ``(seed, epoch)`` (``train.epoch_order``), so the sampler is a slice: every rank
builds the same global batches of ``batch_size`` images and takes its own contiguous share of
each. DDP averages the gradients, so one step sees the same global batch as a single-process run
with the same ``batch_size`` and seed; the run folder, checkpoint and resume semantics are the
single-process ones (rank 0 writes, every rank reads the checkpoint on resume), and a run may
resume with a different number of processes because the global batch does not change.

With one process (no torchrun) every function here is the identity, so single-process training
is exactly what it was.

Ingest of a big bucket spreads over a cluster through any ``concurrent.futures.Executor`` (a Dask
``Client.get_executor()``, a process pool): ``ingest_distributed`` runs the ordinary
``dala_model.ingest.ingest`` on each folder of the source in parallel, into a staging area under
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
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dala_model import cache, storage
from dala_model.breakhis import IMAGE_SUFFIXES
from dala_model.device import resolve_device
from dala_model.ingest import IngestResult, ingest
from dala_model.manifest import (
    MANIFEST_SCHEMA,
    SCHEMA_VERSION,
    duplicates_uri,
    manifest_uri,
    quarantine_uri,
)


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size``, ``local_rank`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes the run folder and logs: one writer keeps writes atomic and single."""
        return self.rank == 0


def world() -> World:
    """The job layout torchrun exported, or a single process when it did not run us."""
    try:
        found = World(
            rank=int(os.environ.get("RANK", "0")),
            size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )
    except ValueError as exc:
        raise ValueError(
            f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({exc}); launch with torchrun or unset them"
        ) from None
    if found.size < 1 or not 0 <= found.rank < found.size:
        raise ValueError(
            f"RANK={found.rank} is not within WORLD_SIZE={found.size}; launch with torchrun"
        )
    return found


def device_for(name: str, job: World) -> torch.device:
    """``resolve_device``, except that each rank of a CUDA job takes the GPU of its local rank."""
    device = resolve_device(name)
    if job.size > 1 and device.type == "cuda":
        if name not in ("auto", "cuda"):
            raise ValueError(
                f"device={name!r} pins one GPU, but torchrun runs {job.size} processes; "
                "use device='auto' or 'cuda' so each rank takes the GPU of its LOCAL_RANK"
            )
        device = torch.device("cuda", job.local_rank)
        torch.cuda.set_device(device)
    return device


def start(job: World, device: torch.device) -> bool:
    """Join the process group (NCCL on CUDA, gloo on CPU); True when this call created it."""
    if job.size == 1 or dist.is_initialized():
        return False
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", rank=job.rank, world_size=job.size
    )
    return True


def stop(started: bool) -> None:
    """Leave the process group together: a rank that tears gloo down while another is still
    sending aborts that one ("terminate called without an active exception")."""
    if started and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(job: World) -> None:
    if job.size > 1:
        dist.barrier()


def check_batch_size(batch_size: int, job: World) -> None:
    """Every rank needs at least two images per step: BatchNorm cannot train on one."""
    if batch_size < 2 * job.size:
        raise ValueError(
            f"batch_size={batch_size} is the global batch and must be at least 2 per process "
            f"({2 * job.size} for {job.size} processes); raise batch_size or use fewer processes"
        )


def shard(batch: np.ndarray, job: World) -> np.ndarray:
    """This rank's contiguous share of one global batch (sizes differ by at most one)."""
    return np.array_split(batch, job.size)[job.rank] if job.size > 1 else batch


def wrap(model: nn.Module, device: torch.device, job: World) -> nn.Module:
    """DDP around ``model`` for a multi-process job; the model itself otherwise."""
    if job.size == 1:
        return model
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def sum_over_ranks(tensor: torch.Tensor, job: World) -> torch.Tensor:
    """Element-wise sum over every rank (in place, returned), for epoch totals all ranks agree on."""
    if job.size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


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
