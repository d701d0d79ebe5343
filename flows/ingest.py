"""`ingest-breakhis`: a source of BreakHis images -> manifest, quarantine and decoded cache."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from pydantic import Field

from dala_model import storage
from dala_model.data import ingest as ingest_lib
from dala_model.report.tables import markdown_table
from flows._common import IO_RETRIES

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
    row = [result[key] for _, key in _SUMMARY]
    row[-1] = f"`{row[-1]}`"  # the data version, as code
    create_markdown_artifact(
        key="ingest-summary",
        markdown=f"## Ingest of {storage.redact(source)}\n\n"
        + markdown_table([label for label, _ in _SUMMARY], [row]),
        description="manifest, quarantine and cache counts",
    )
    return result
