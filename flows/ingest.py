"""`ingest-breakhis`: a source of BreakHis images -> manifest, quarantine and decoded cache.

By default one task ingests the whole source on this machine (reusing unchanged rows of the
previous manifest). With ``dask_address`` the per-file work runs on that Dask cluster: the flow
plans the partitions (one per image folder), submits one ``stage-partition`` task per partition
through prefect-dask (``flows/_dask.py``), then commits the manifest once, here, as the single
writer (``dala_model.data.ingest_distributed``). The manifest, quarantine and duplicate lists are
the default path's; a worker lost mid-run only reruns its partitions, and each attempt writes to
a folder of its own, so nothing is lost or counted twice. The staging folder is removed whether
the run succeeds or not.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from pydantic import Field

from dala_model import storage
from dala_model.data import ingest as ingest_lib
from dala_model.data import ingest_distributed as distributed_lib
from flows._common import IO_RETRIES
from flows._dask import DaskAddress, run_on_dask

# The ingest-summary artifact's columns: (heading, IngestResult field).
_SUMMARY = (
    ("manifest images", "images"),
    ("read", "read"),
    ("reused", "reused"),
    ("removed", "removed"),
    ("quarantined", "quarantined"),
    ("duplicates", "duplicates"),
    ("cached", "cached"),
    ("data version", "manifest_version"),
)


@task(name="ingest", **IO_RETRIES)
def ingest_task(source: str, root: str, cache_size: int) -> dict:
    """Manifest, quarantine and decoded cache; returns the small IngestResult record."""
    return asdict(ingest_lib.ingest(source, root, cache_size=cache_size))


@task(name="plan-ingest", **IO_RETRIES)
def plan_task(source: str, root: str, cache_size: int) -> distributed_lib.IngestPlan:
    """The source's partitions and a fresh staging folder; proves the root writable first."""
    return distributed_lib.plan_ingest(source, root, cache_size=cache_size)


@task(name="stage-partition", task_run_name="stage-partition-{index}", **IO_RETRIES)
def stage_task(plan: distributed_lib.IngestPlan, index: int) -> str:
    """Ingest one partition into its own attempt folder (on a Dask worker); returns the folder."""
    return distributed_lib.stage_partition(plan, index)


@task(name="commit-ingest", **IO_RETRIES)
def commit_task(plan: distributed_lib.IngestPlan, staged: list[str]) -> dict:
    """Merge the staged partitions and publish manifest, quarantine, duplicates and cache."""
    return asdict(distributed_lib.commit_ingest(plan, staged))


def ingest_on_dask(source: str, root: str, cache_size: int, dask_address: str) -> dict:
    """Plan here, stage every partition on the cluster, commit here; staging removed at the end."""
    plan = plan_task(source, root, cache_size)
    try:
        staged = run_on_dask(
            dask_address,
            stage_task,
            [{"plan": plan, "index": k} for k in range(len(plan.folders))],
            what="ingest partitions",
        )
        return commit_task(plan, staged)
    finally:
        distributed_lib.discard_staging(plan)


@flow(name="ingest-breakhis", log_prints=True)
def ingest_flow(
    source: Annotated[
        str, Field(description="folder or URL of BreakHis images (path, s3://bucket/prefix)")
    ],
    root: Annotated[
        str, Field(description="storage root URL for manifests/, cache/, splits/, runs/")
    ],
    cache_size: Annotated[
        int, Field(ge=0, description="decoded-cache size in pixels; 0 skips it")
    ] = 224,
    dask_address: DaskAddress = None,
) -> dict:
    """Read every image under ``source`` once, record good ones in the manifest, quarantine the rest."""
    if dask_address:
        result = ingest_on_dask(source, root, cache_size, dask_address)
    else:
        result = ingest_task(source, root, cache_size)
    # Imported here: Dask workers import this module for stage-partition alone, and the report
    # package (matplotlib, scikit-learn) would double their start-up.
    from dala_model.report.tables import markdown_table

    row = [result[key] for _, key in _SUMMARY]
    row[-1] = f"`{row[-1]}`"  # the data version, as code
    create_markdown_artifact(
        key="ingest-summary",
        markdown=f"## Ingest of {storage.redact(source)}\n\n"
        + markdown_table([label for label, _ in _SUMMARY], [row]),
        description="manifest, quarantine and cache counts",
    )
    return result
