"""Device slots: one training per GPU group (or per share of the CPU cores), machine-wide.

The training fan-out runs in a process pool whose size is the number of slots. Each pool worker
claims one slot when it starts (an exclusive ``fcntl`` lock on the file of every GPU in the slot,
all or none) and keeps it for its lifetime; the OS drops the locks when the process exits,
crashed or not. Because the locks are per physical GPU and machine-wide, two flow runs on one
machine (a schedule and a manual run, two workers sharing a box, even with different
``gpus_per_training``) never put two trainings on one GPU: the second run's workers wait.

A slot pins its worker to its GPUs through ``CUDA_VISIBLE_DEVICES``, set before the worker
touches CUDA. With one GPU per training the training runs in the worker and sees its GPU as
``cuda:0``; with several, the worker launches a ``torchrun`` job whose ranks take one GPU each
(``dala_model.engine.launcher``). A CPU slot gets an equal share of the cores as torch threads, split
among its processes, so parallel trainings do not oversubscribe the CPU.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field

log = logging.getLogger(__name__)

_claimed: dict[
    str, object
] = {}  # this process's slot: {"plan": SlotPlan, "slot": [...], "handles": [...]}


class SlotPlan(BaseModel):
    """How many trainings may run at once on this machine, and on what."""

    kind: str = Field(description="'gpu' or 'cpu'")
    slots: list[list[str]] = Field(
        description="per slot: its GPU ids (as CUDA_VISIBLE_DEVICES names them) or one CPU slot name"
    )
    processes: int = Field(ge=1, description="processes per training (DDP ranks when > 1)")
    threads: int = Field(ge=1, description="torch threads per process")
    lock_dir: str
    idle: list[str] = Field(
        default_factory=list, description="visible GPUs left out of every group (the remainder)"
    )


@dataclass(frozen=True)
class PinnedSlot:
    """What the training task needs to know about the slot its process holds."""

    label: str
    processes: int
    threads: int


def plan_slots(jobs: int, max_parallel: int | None = None, gpus_per_training: int = 1) -> SlotPlan:
    """Groups of ``gpus_per_training`` visible GPUs, else ``min(jobs, cores // processes)`` CPU
    slots of ``gpus_per_training`` processes each (gloo ranks: the CPU twin of the GPU path);
    ``max_parallel`` caps the number of slots either way."""
    import torch  # the parent only counts devices; it never creates a CUDA context

    if max_parallel is not None and max_parallel < 1:
        raise ValueError(f"max_parallel must be >= 1, got {max_parallel}")
    if gpus_per_training < 1:
        raise ValueError(f"gpus_per_training must be >= 1, got {gpus_per_training}")
    cores = os.cpu_count() or 1
    lock_dir = os.environ.get("DALA_SLOT_DIR") or str(
        Path(tempfile.gettempdir()) / "dala-device-slots"
    )
    per = gpus_per_training
    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = (
            [i.strip() for i in visible.split(",") if i.strip()]
            if visible
            else [str(i) for i in range(torch.cuda.device_count())]
        )
        if per > len(ids):
            raise ValueError(
                f"gpus_per_training={per}, but this machine has {len(ids)} visible GPU(s) "
                f"({', '.join(ids)}); lower gpus_per_training or run on a bigger node"
            )
        groups = [ids[i : i + per] for i in range(0, len(ids) - per + 1, per)]
        groups = groups[: max_parallel or len(groups)]
        return SlotPlan(
            kind="gpu",
            slots=groups,
            processes=per,
            threads=max(1, cores // (len(groups) * per)),
            lock_dir=lock_dir,
            idle=ids[len(ids) - len(ids) % per :] if len(ids) % per else [],
        )
    n = max(1, min(jobs, cores // per, max_parallel or cores))
    return SlotPlan(
        kind="cpu",
        slots=[[str(i)] for i in range(n)],
        processes=per,
        threads=max(1, cores // (n * per)),
        lock_dir=lock_dir,
    )


def claim_slot(plan: SlotPlan) -> None:
    """Process-pool initializer: block until one of the plan's slots is free, then hold it."""
    directory = Path(plan.lock_dir)
    directory.mkdir(parents=True, exist_ok=True)
    waited = 0.0
    while True:
        for slot in plan.slots:
            handles = _lock_all(directory, plan.kind, slot)
            if handles is not None:
                _claimed.update(plan=plan, slot=slot, handles=handles)
                return
        if waited % 60 == 0:
            log.warning(
                "all %d %s slots are busy (locks in %s); waiting",
                len(plan.slots),
                plan.kind,
                directory,
            )
        time.sleep(1.0)
        waited += 1.0


def _lock_all(directory: Path, kind: str, slot: list[str]) -> list | None:
    """Exclusive locks on every device of ``slot``, or none at all (None) if any is busy."""
    handles = []
    for device in slot:
        handle = open(directory / f"{kind}-{device}.lock", "a+")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            for held in handles:
                held.close()  # closing the file releases its lock
            return None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        handles.append(handle)
    return handles


def pin_process() -> PinnedSlot:
    """Apply the claimed slot to this process (call before any CUDA use).

    Must run inside the task, not only in the initializer: Prefect's process pool re-applies the
    parent's environment to every task, which would undo a ``CUDA_VISIBLE_DEVICES`` set earlier.
    A torchrun job launched from the task inherits the variable, so its ranks see the slot's GPUs.
    """
    import torch

    if not _claimed:
        raise RuntimeError("pin_process() called in a process that claimed no device slot")
    plan: SlotPlan = _claimed["plan"]  # type: ignore[assignment]
    slot: list[str] = _claimed["slot"]  # type: ignore[assignment]
    torch.set_num_threads(plan.threads)
    if plan.kind == "gpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(slot)
        label = f"gpu {','.join(slot)}"
    else:
        label = f"cpu slot {slot[0]} ({plan.threads} threads"
        label += f" x {plan.processes} processes)" if plan.processes > 1 else ")"
    return PinnedSlot(label=label, processes=plan.processes, threads=plan.threads)
