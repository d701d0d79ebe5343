"""Data-parallel training on torch.distributed (DDP only; distributed ingest lives in
``dala_model.data.ingest_distributed``, so a training never imports ingest).

Training under ``torchrun --nproc-per-node N -m dala_model.cli train ...`` is data parallel
(DistributedDataParallel): torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` and every
process runs the same ``dala_model.engine.train.train``. Each epoch's global order is already a pure
function of ``(seed, epoch)`` (``engine.sampling.epoch_order``), so the sampler is a slice: every rank
builds the same global batches of ``batch_size`` images and takes its own contiguous share of
each. DDP averages the gradients, so one step sees the same global batch as a single-process run
with the same ``batch_size`` and seed; the run folder, checkpoint and resume semantics are the
single-process ones (rank 0 writes, every rank reads the checkpoint on resume), and a run may
resume with a different number of processes because the global batch does not change.

With one process (no torchrun) every function here is the identity, so single-process training
is exactly what it was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dala_model.device import resolve_device


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
    sending aborts that one ("terminate called without an active exception").

    Drop every DDP wrapper first (``train`` calls this after ``_train`` has returned, so its
    wrapper is gone): a wrapper that outlives the group is destroyed at interpreter exit with
    gloo work still referencing it, which can abort the rank the same way (seen once, in a
    clean-clone CI run of the one-step equivalence test, whose script kept its wrapper)."""
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
