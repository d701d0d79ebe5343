"""`ingest-breakhis`: a source of BreakHis images -> manifest, quarantine and decoded cache."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.tasks import exponential_backoff
from pydantic import Field

from dala_model import storage
from dala_model.data import ingest as ingest_lib

# Object-store reads and writes fail transiently (throttling, dropped connections); ingest is
# incremental and its writes atomic, so retrying the whole call is safe and cheap.
IO_RETRIES = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.5,
}


@task(name="ingest", **IO_RETRIES)
def ingest_task(source: str, root: str, cache_size: int) -> dict:
    """Manifest, quarantine and decoded cache; returns the small IngestResult record."""
    return asdict(ingest_lib.ingest(source, root, cache_size=cache_size))


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
) -> dict:
    """Read every image under ``source`` once, record good ones in the manifest, quarantine the rest."""
    result = ingest_task(source, root, cache_size)
    create_markdown_artifact(
        key="ingest-summary",
        markdown=(
            f"## Ingest of {storage.redact(source)}\n\n"
            f"| manifest images | read | reused | removed | quarantined | duplicates | cached | data version |\n"
            f"|---|---|---|---|---|---|---|---|\n"
            f"| {result['images']} | {result['read']} | {result['reused']} | {result['removed']} | "
            f"{result['quarantined']} | {result['duplicates']} | {result['cached']} | `{result['manifest_version']}` |\n"
        ),
        description="manifest, quarantine and cache counts",
    )
    return result
