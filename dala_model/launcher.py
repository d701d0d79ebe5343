"""Run one training as a multi-process ``torchrun`` job from Python, and wait for its result.

The Prefect flow uses this when a training gets several GPUs (``gpus_per_training``): the task
launches exactly what an operator would type, ``torchrun --standalone --nproc-per-node N -m
dala_model.cli train --config FILE``, so the flow path and the documented CLI path are one path.
A subprocess rather than an in-process launcher, because torchrun's agent must own the ranks'
signals and lifetimes: when the launching process dies (a killed Prefect worker), Linux sends the
agent SIGTERM (``PR_SET_PDEATHSIG``) and the agent stops its ranks, so no orphaned rank keeps a
GPU. ``--standalone`` picks a free rendezvous port, so several jobs share one machine.

Progress: rank 0 writes ``history.parquet`` after every epoch; the launcher reads it while the
job runs and hands each new epoch to ``progress`` (the flow's progress artifact).
"""

from __future__ import annotations

import collections
import contextvars
import ctypes
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping

from dala_model import storage
from dala_model.config import TrainConfig
from dala_model.train import ProgressCallback, TrainResult, completed_result, run_uri

log = logging.getLogger(__name__)

POLL_SECONDS = 2.0
_PR_SET_PDEATHSIG = 1


class DistributedTrainingFailed(RuntimeError):
    """The torchrun job exited without completing its run; the message holds its last output."""


def launch_training(
    config: TrainConfig,
    processes: int,
    *,
    threads_per_process: int = 1,
    env: Mapping[str, str] | None = None,
    progress: ProgressCallback | None = None,
) -> TrainResult:
    """Train ``config`` with ``processes`` DDP ranks on this machine; return rank 0's result.

    GPUs: the ranks take the visible GPUs in order (``CUDA_VISIBLE_DEVICES`` from ``env`` or this
    process). CPU: ``processes`` gloo ranks with ``threads_per_process`` torch threads each
    (torchrun would otherwise give each rank one thread). A failure leaves the checkpoint of
    the last finished epoch; launching again with ``config.resume`` continues from it.
    """
    if processes < 2:
        raise ValueError(f"processes must be >= 2 for a torchrun job, got {processes}")
    child_env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": str(threads_per_process)}
    with tempfile.TemporaryDirectory(prefix="dala-launch-") as tmp:
        config_file = os.path.join(tmp, "train-config.json")
        with open(config_file, "w") as handle:  # the config only: credentials stay in the env
            json.dump(config.model_dump(mode="json"), handle)
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={processes}",
            "-m",
            "dala_model.cli",
            "train",
            "--config",
            config_file,
        ]
        log.info("%s: launching %d ranks with torchrun", config.resolved_run_id, processes)
        output = _run(command, child_env, config, progress)
    result = completed_result(config)
    if result is None:
        raise DistributedTrainingFailed(
            f"{config.resolved_run_id}: the torchrun job ended without completing its run; run "
            f"again with resume to continue from the last checkpoint.\n{output.summary()}"
        )
    return result


def _run(
    command: list[str],
    env: dict[str, str],
    config: TrainConfig,
    progress: ProgressCallback | None,
) -> _Output:
    """Run the job; forward its output to the log and new epochs to ``progress``.

    Raises :class:`DistributedTrainingFailed` on a non-zero exit."""
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_die_with_parent,  # only a prctl flag: safe between fork and exec
    )
    output = _Output()
    # The reader runs in this thread's context, so a caller's logging context (a Prefect task
    # run's, say) applies to the forwarded lines too.
    context = contextvars.copy_context()
    reader = threading.Thread(target=context.run, args=(output.forward, proc), daemon=True)
    reader.start()
    reported = 0
    try:
        while proc.poll() is None:
            time.sleep(POLL_SECONDS)
            reported = _report_epochs(config, progress, reported)
    except BaseException:
        proc.terminate()  # the agent stops its ranks on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    reader.join(timeout=10)
    _report_epochs(config, progress, reported)
    if proc.returncode != 0:
        raise DistributedTrainingFailed(
            f"{config.resolved_run_id}: torchrun exited with {proc.returncode}; the checkpoint of "
            "the last finished epoch is kept, so running again with resume continues from it.\n"
            f"{output.summary()}"
        )
    return output


class _Output:
    """The job's output as the log sees it, plus what an error message needs: the ranks' error
    lines (every rank prints the same one, so each is kept once) and the last lines."""

    _ERROR = re.compile(r"(^dala \w+: error: |^\w[\w.]*(Error|Exception|Conflict|Loss)\b)")

    def __init__(self) -> None:
        self.errors: dict[str, None] = {}  # an ordered set
        self.tail: collections.deque[str] = collections.deque(maxlen=15)

    def forward(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            log.info("torchrun: %s", line)
            self.tail.append(line)
            if self._ERROR.search(line) and len(self.errors) < 10:
                self.errors[line] = None

    def summary(self) -> str:
        errors = "\n".join(self.errors) or "(none recognised)"
        tail = "\n".join(self.tail)
        return f"Errors the ranks printed:\n{errors}\nLast output:\n{tail}"


def _report_epochs(config: TrainConfig, progress: ProgressCallback | None, reported: int) -> int:
    """Hand the epochs rank 0 has recorded since the last call to ``progress``."""
    uri = storage.join(run_uri(config), "history.parquet")
    if progress is None or not storage.exists(uri):
        return reported
    try:
        history = storage.read_parquet(uri)
    except (OSError, ValueError):  # replaced mid-read on a store without atomic rename
        return reported
    for record in history.iloc[reported:].to_dict("records"):
        progress({**record, "epochs": config.epochs, "run_id": config.resolved_run_id})
    return max(reported, len(history))


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM this process when its parent dies (Linux only)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
