"""Dask wiring the flows share: a started ``DaskTaskRunner`` on a scheduler address, tasks on it.

A flow that takes ``dask_address`` sends only its partition work to the cluster: each partition
is one Prefect task, submitted through prefect-dask's ``DaskTaskRunner(address=...)``, so the
task runs, retries and logs show in the Prefect UI as any other task's. Planning and the
single-writer commit stay in the flow's own process. The runner is entered inside the flow (as
``flows/train.py`` does with its process pool) rather than set with ``flow.with_options``,
because the address is a run-time parameter and only those tasks belong on the cluster.

What can go wrong, and what it looks like:

- prefect-dask missing (it is the ``scale`` extra): an ImportError naming the extra.
- No scheduler at the address: a ConnectionError naming the parameter and the address, after
  Dask's connect timeout (``distributed.comm.timeouts.connect``, 30 s unless configured, e.g.
  ``DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=5s``), before any work is submitted.
- A scheduler with no worker: the wait for one is bounded (``WORKER_WAIT_S``), then an error that
  says to start ``dask worker ADDRESS``; without it the flow would wait for ever.
- A worker lost mid-task: Dask reruns the task on another worker (up to
  ``distributed.scheduler.allowed-failures`` times, 3 by default; then ``KilledWorker``), and
  an exception inside a task takes the task's own Prefect retries on its worker. The tasks must be
  safe to run again, and to run twice at once (``dala_model.data.ingest_distributed`` writes
  each attempt into its own folder for that reason).

Every worker needs the package installed (the images include the ``scale`` extra), the storage
credentials, and a route to the Prefect API: prefect-dask sends the flow's settings with each task.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from dala_model import storage

if TYPE_CHECKING:
    from prefect import Task
    from prefect_dask import DaskTaskRunner

WORKER_WAIT_S = 60  # how long a reachable scheduler may take to have its first worker

# The flow parameter, the same wherever a flow can send work to a cluster.
DaskAddress = Annotated[
    str | None,
    Field(
        description="Dask scheduler to run the partitions on (tcp://dask-scheduler:8786 in "
        "infra/compose); empty: run on this machine"
    ),
]


@contextlib.contextmanager
def dask_runner(address: str, parameter: str = "dask_address") -> Iterator[DaskTaskRunner]:
    """A started ``DaskTaskRunner`` connected to the scheduler at ``address``, with a worker.

    ``parameter`` is the flow parameter the address came from, named in every error."""
    try:
        import dask
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise ImportError(
            f"{parameter}={address!r} needs prefect-dask: pip install '.[scale]' "
            f"(or leave {parameter} empty to run on this machine)"
        ) from exc
    shown = storage.redact(address)
    timeout = dask.config.get("distributed.comm.timeouts.connect")
    with DaskTaskRunner(address=address) as runner:
        try:
            client = runner.client  # connects now, not at the first submit
        except (OSError, ValueError) as exc:
            raise ConnectionError(
                f"{parameter}={shown}: no Dask scheduler answered (connect timeout {timeout}: "
                f"{exc}). Start one (`dask scheduler`, then `dask worker {shown}`), fix the "
                f"address (tcp://HOST:8786), or leave {parameter} empty to run on this machine"
            ) from exc
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT_S)
        except TimeoutError as exc:
            raise ConnectionError(
                f"{parameter}={shown}: the Dask scheduler has no worker after {WORKER_WAIT_S} s: "
                f"start one with `dask worker {shown}`"
            ) from exc
        yield runner


def run_on_dask(
    address: str,
    task: Task,
    parameter_sets: Sequence[dict[str, Any]],
    *,
    parameter: str = "dask_address",
    what: str = "tasks",
) -> list[Any]:
    """Run ``task`` once per parameter set on the cluster; their results, in order.

    Waits for every task before it raises, so nothing is still running when the caller cleans
    up; the error names each failed task run and its final message."""
    with dask_runner(address, parameter) as runner:
        futures = [runner.submit(task, parameters=dict(p)) for p in parameter_sets]
        for future in futures:
            future.wait()
        outcomes = [_outcome(future) for future in futures]
    failed = [
        f"{task.name} #{k} ({future.task_run_id}): {message}"
        for k, (future, (state, message)) in enumerate(zip(futures, outcomes, strict=True))
        if state is None
    ]
    if failed:
        raise RuntimeError(
            f"{len(failed)} of {len(futures)} {what} failed on the Dask cluster at "
            f"{storage.redact(address)}: {'; '.join(failed)}"
        )
    return [state.result() for state, _ in outcomes]


def _outcome(future: Any) -> tuple[Any, str]:
    """(the final Completed state, "") or (None, why): a Prefect failure or Dask's own error.

    A Dask-level error (``KilledWorker`` after too many lost workers) never reaches the task
    run's Prefect state, which the API still shows as Running: it is read from the Dask future."""
    wrapped = future.wrapped_future
    if wrapped.status == "error":
        return None, f"{type(wrapped.exception()).__name__}: {wrapped.exception()}"
    state = future.state
    return (state, "") if state.is_completed() else (None, state.message or state.name)
