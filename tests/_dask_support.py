"""What the Dask flow tests share: a SIGKILL at a chosen log line, and waiting for task runs.

The worker kill is keyed to a log record, not a timer, so a test loses a worker at a fixed point
of a task's work (its output written, its result not yet returned). The classes are defined
inside the factory so that Dask sends them by value (cloudpickle): a worker runs them without
importing any test module (and torch with it through ``flows``)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import distributed
import psutil
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId


def kill_worker_at_log(marker: str, logger_name: str, prefix: str) -> distributed.WorkerPlugin:
    """A worker plugin that SIGKILLs its own worker process at the first record of
    ``logger_name`` starting with ``prefix`` that any worker logs: once cluster-wide (the first
    to create ``marker`` wins, and writes its pid there)."""

    class KillAtRecord(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if not record.getMessage().startswith(prefix):
                return
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.write(fd, str(os.getpid()).encode())
            os.fsync(fd)
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)

    class KillOnce(distributed.WorkerPlugin):
        def setup(self, worker) -> None:
            self.handler = KillAtRecord(logging.INFO)
            logger = logging.getLogger(logger_name)
            logger.setLevel(logging.INFO)
            logger.addHandler(self.handler)

        def teardown(self, worker) -> None:
            logging.getLogger(logger_name).removeHandler(self.handler)

    return KillOnce()


@contextlib.contextmanager
def one_worker_killed_at_log(
    cluster, marker: Path, logger_name: str, prefix: str
) -> Iterator[None]:
    """Run the block with :func:`kill_worker_at_log` registered on ``cluster`` (two workers);
    afterwards wait for the nanny to restart the killed worker and check that one of the workers
    the block started with is gone (so the block really lost a worker mid-run)."""
    with distributed.Client(cluster, set_as_default=False) as client:
        client.wait_for_workers(2, timeout=60)
        pids = set(client.run(os.getpid).values())
        client.register_plugin(
            kill_worker_at_log(str(marker), logger_name, prefix), name="kill-one-worker"
        )
        try:
            yield
        finally:
            client.unregister_worker_plugin("kill-one-worker")
        client.wait_for_workers(2, timeout=60)  # the nanny restarted the killed one
    killed = int(marker.read_text())
    assert killed in pids and not psutil.pid_exists(killed)


def task_runs(state, name_prefix: str, expected: int) -> list:
    """The flow run's task runs named ``name_prefix...``, once ``expected`` of them have finished.

    Task-run states reach the API as events that the server records asynchronously, so a read
    right after the flow returns may lag; this waits (bounded) for the records, not the work."""
    deadline = time.monotonic() + 60
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
                )
            )
        runs = [run for run in runs if run.name.startswith(name_prefix)]
        finished = [run for run in runs if run.state is not None and run.state.is_final()]
        if len(finished) >= expected or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)
