"""The manifest: one row per good image, the table every later step trusts.

The schema is declared here (not inferred from whatever pandas produced) so a reader can rely on
column types, and its version travels in the Parquet metadata (``dala.schema_version``) together
with the source URL and the ingest counts. ``manifest_version`` hashes the image ids and content
hashes: two manifests with the same images give the same data version, whatever their order or
ingest time, which is what runs record to say which data they saw.
"""

from __future__ import annotations

import hashlib

import pandas as pd
import pyarrow as pa

from dala_model import storage
from dala_model.layout import RootLayout

SCHEMA_VERSION = "2"  # 2: patient_id is the case, slide_id added

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),  # sha256[:16]: content-derived, stable
        pa.field("uri", pa.string(), nullable=False),
        pa.field("relpath", pa.string(), nullable=False),  # below the ingested source URL
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("format", pa.string(), nullable=False),  # decoded format: PNG, JPEG, TIFF
        pa.field("mode", pa.string(), nullable=False),  # Pillow mode before conversion to RGB
        pa.field("label", pa.string(), nullable=False),  # benign | malignant
        pa.field("label_id", pa.int8(), nullable=False),  # 0 benign, 1 malignant
        pa.field("subtype", pa.string(), nullable=False),
        pa.field("subtype_code", pa.string(), nullable=False),
        pa.field("patient_id", pa.string(), nullable=False),  # the case (14-22549): split unit
        pa.field("slide_id", pa.string(), nullable=False),  # the slide folder (14-22549AB)
        pa.field("magnification", pa.int16(), nullable=False),
        pa.field("seq", pa.int32(), nullable=False),
        pa.field("procedure", pa.string(), nullable=False),
        pa.field("source_version", pa.string(), nullable=False),  # ETag/mtime seen at ingest
        pa.field("ingested_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
    ]
)
DUPLICATES_SCHEMA = pa.schema(
    [
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("kept_uri", pa.string(), nullable=False),
    ]
)


def manifest_uri(root: str) -> str:
    return RootLayout(root).manifest()


def quarantine_uri(root: str) -> str:
    return RootLayout(root).quarantine()


def duplicates_uri(root: str) -> str:
    return RootLayout(root).duplicates()


def read_manifest(root: str) -> pd.DataFrame:
    """The manifest under ``root``; its metadata (schema version, source, counts) is in ``.attrs``."""
    uri = manifest_uri(root)
    if not storage.exists(uri):
        raise FileNotFoundError(
            f"no manifest at {storage.redact(uri)}: run `dala ingest SOURCE --out {storage.redact(root)}` first"
        )
    frame = storage.read_parquet(uri)
    found = frame.attrs.get("dala.schema_version")
    if found != SCHEMA_VERSION:
        raise ValueError(
            f"{storage.redact(uri)} has manifest schema version {found!r}, this code reads "
            f"{SCHEMA_VERSION!r}: re-run `dala ingest` to rebuild it"
        )
    return frame


def data_version(frame: pd.DataFrame) -> str:
    """Hash of the (image_id, sha256) pairs, independent of row order."""
    digest = hashlib.sha256()
    for image_id, sha in sorted(zip(frame["image_id"], frame["sha256"], strict=True)):
        digest.update(f"{image_id}:{sha}\n".encode())
    return digest.hexdigest()[:16]


def manifest_version(root: str) -> str:
    """The data version of the manifest under ``root`` (see :func:`data_version`)."""
    return data_version(read_manifest(root))
