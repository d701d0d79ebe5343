"""Device slots: one training per GPU (or per share of the CPU cores), machine-wide.

The training fan-out runs in a process pool whose size is the number of slots. Each pool worker
claims one slot when it starts (an exclusive ``fcntl`` lock on a per-slot file) and keeps it for
its lifetime; the OS drops the lock when the process exits, crashed or not. Because the lock
files are machine-wide, two flow runs on one machine (a schedule and a manual run, two workers
sharing a box) still never put two trainings on one GPU: the second run's workers wait for a slot.

A GPU slot pins its worker to one physical device through ``CUDA_VISIBLE_DEVICES``, set before
the worker touches CUDA, so every training sees exactly one GPU as ``cuda:0``. A CPU slot gets an
equal share of the cores as torch threads, so parallel trainings do not oversubscribe the CPU.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel, Field

log = logging.getLogger(__name__)

_claimed: dict[
    str, object
] = {}  # this process's slot: {"plan": SlotPlan, "slot": str, "handle": file}


class SlotPlan(BaseModel):
    """How many trainings may run at once on this machine, and on what."""

    kind: str = Field(description="'gpu' or 'cpu'")
    slots: list[str] = Field(
        description="GPU ids (as CUDA_VISIBLE_DEVICES names them) or CPU slot names"
    )
    threads: int = Field(ge=1, description="torch threads per training")
    lock_dir: str


def plan_slots(jobs: int, max_parallel: int | None = None) -> SlotPlan:
    """One slot per visible GPU, else ``min(jobs, cores)`` CPU slots; ``max_parallel`` caps either."""
    import torch  # the parent only counts devices; it never creates a CUDA context

    if max_parallel is not None and max_parallel < 1:
        raise ValueError(f"max_parallel must be >= 1, got {max_parallel}")
    cores = os.cpu_count() or 1
    lock_dir = os.environ.get("DALA_SLOT_DIR") or str(
        Path(tempfile.gettempdir()) / "dala-device-slots"
    )
    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = (
            [i.strip() for i in visible.split(",") if i.strip()]
            if visible
            else [str(i) for i in range(torch.cuda.device_count())]
        )
        ids = ids[: max_parallel or len(ids)]
        return SlotPlan(kind="gpu", slots=ids, threads=max(1, cores // len(ids)), lock_dir=lock_dir)
    n = max(1, min(jobs, cores, max_parallel or cores))
    return SlotPlan(
        kind="cpu", slots=[str(i) for i in range(n)], threads=max(1, cores // n), lock_dir=lock_dir
    )


def claim_slot(plan: SlotPlan) -> None:
    """Process-pool initializer: block until one of the plan's slots is free, then hold it."""
    directory = Path(plan.lock_dir)
    directory.mkdir(parents=True, exist_ok=True)
    waited = 0.0
    while True:
        for slot in plan.slots:
            handle = open(directory / f"{plan.kind}-{slot}.lock", "a+")  # noqa: SIM115 - held for the process's life
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            _claimed.update(plan=plan, slot=slot, handle=handle)
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


def pin_process() -> str:
    """Apply the claimed slot to this process (call before any CUDA use); return a device name.

    Must run inside the task, not only in the initializer: Prefect's process pool re-applies the
    parent's environment to every task, which would undo a ``CUDA_VISIBLE_DEVICES`` set earlier.
    """
    import torch

    if not _claimed:
        raise RuntimeError("pin_process() called in a process that claimed no device slot")
    plan: SlotPlan = _claimed["plan"]  # type: ignore[assignment]
    torch.set_num_threads(plan.threads)
    if plan.kind == "gpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = str(_claimed["slot"])
        return f"gpu {_claimed['slot']}"
    return f"cpu slot {_claimed['slot']} ({plan.threads} threads)"
