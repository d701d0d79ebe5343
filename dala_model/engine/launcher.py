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
import contextlib
import contextvars
import ctypes
import dataclasses
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
from dala_model.engine.config import TrainConfig
from dala_model.engine.train import ProgressCallback, TrainResult, completed_result, run_uri

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
    done = completed_result(config)
    if done is not None:  # as train() does: a finished run is not trained again
        return dataclasses.replace(done, status="skipped")
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
    output = _Output()
    with subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        encoding="utf-8",
        errors="replace",  # a stray byte from a rank must not stop the pipe being drained
        start_new_session=True,  # the agent and its ranks form one group, to kill as one
        preexec_fn=_die_with_parent,
    ) as proc:
        # The reader runs in this thread's context, so a caller's logging context (a Prefect
        # task run's, say) applies to the forwarded lines too.
        context = contextvars.copy_context()
        reader = threading.Thread(target=context.run, args=(output.forward, proc), daemon=True)
        reader.start()
        reported = 0
        try:
            while proc.poll() is None:
                time.sleep(POLL_SECONDS)
                reported = _report_epochs(config, progress, reported)
        except BaseException:
            _stop(proc)
            raise
        reader.join(timeout=30)
    _report_epochs(config, progress, reported)
    if proc.returncode != 0:
        raise DistributedTrainingFailed(
            f"{config.resolved_run_id}: torchrun exited with {proc.returncode}; the checkpoint of "
            "the last finished epoch is kept, so running again with resume continues from it.\n"
            f"{output.summary()}"
        )
    return output


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the agent, which stops its ranks within its own grace period (30 s); past ours,
    SIGKILL the whole group, so no rank is left holding a GPU whose slot lock is released."""
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class _Output:
    """The job's output as the log sees it, plus what an error message needs: the ranks' error
    lines (every rank prints the same one, so each is kept once) and the last lines."""

    _ERROR = re.compile(r"(^dala \w+: error: |^\w[\w.]*(Error|Exception|Conflict|Loss)\b)")

    def __init__(self) -> None:
        self.errors: dict[str, None] = {}  # an ordered set
        self.tail: collections.deque[str] = collections.deque(maxlen=15)

    def forward(self, proc: subprocess.Popen) -> None:
        """Drain the pipe to its end whatever happens to a line (a full pipe would block the ranks)."""
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            self.tail.append(line)
            if self._ERROR.search(line) and len(self.errors) < 10:
                self.errors[line] = None
            with contextlib.suppress(Exception):  # a failing log handler must not stop the drain
                log.info("torchrun: %s", line)

    def summary(self) -> str:
        errors = "\n".join(list(self.errors)) or "(none recognised)"
        tail = "\n".join(list(self.tail))
        return f"Errors the ranks printed:\n{errors}\nLast output:\n{tail}"


def _report_epochs(config: TrainConfig, progress: ProgressCallback | None, reported: int) -> int:
    """Hand the epochs rank 0 has recorded since the last call to ``progress``.

    Progress is a side channel: a store hiccup or a failing callback is logged and retried at
    the next poll, never allowed to stop a healthy training."""
    if progress is None:
        return reported
    uri = storage.join(run_uri(config), "history.parquet")
    try:
        if not storage.exists(uri):
            return reported
        history = storage.read_parquet(uri)
        for record in history.iloc[reported:].to_dict("records"):
            progress({**record, "epochs": config.epochs, "run_id": config.resolved_run_id})
            reported += 1
    except Exception as exc:  # see the docstring
        log.warning("%s: progress not reported this time (%s)", config.resolved_run_id, exc)
    return reported


# Looked up here, not in the child: between fork and exec a child of a threaded process may only
# make async-signal-safe calls, and prctl(2) is one while dlopen/dlsym are not.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM this process when its parent dies (Linux only)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
