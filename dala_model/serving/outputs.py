"""What scoring writes under OUT, and how consumers read it: the layout and the fixed schemas.

Layout of a scoring root (``dala predict SOURCE --out OUT``; docs/SCORING.md mirrors this)::

    OUT/manifests/manifest.parquet     one row per image content seen in any drop (drop.py)
    OUT/manifests/quarantine.parquet   uri, reason, detail, case_id, magnification, quarantined_at
    OUT/manifests/duplicates.parquet   sha256, uri, kept_uri
    OUT/predictions/images/model=<m>/version=<v>/mag=<x>/part-<key>.parquet   IMAGE_SCHEMA
    OUT/predictions/cases/model=<m>/cases.parquet                            CASE_SCHEMA
    OUT/predictions/reports/model=<m>/<flow_run_id>/<x>x.json   metrics of a labelled drop

The partition folder is ``mag=``, not ``magnification=``: a Hive key with a column's name and
another type (int32 inferred from the folder, int16 in the file) makes
``pyarrow.dataset(..., partitioning="hive")`` refuse to merge the schemas, so consumers could
not read the table with the most common reader.

Readers get one row per ``(sha256, model_version)``: two runs racing over different pending
sets may both store an image, and :func:`read_image_predictions` keeps the earliest row.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import pyarrow as pa

from dala_model import storage

IMAGE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),  # sha256[:16]
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),  # the file scored (first name of its content)
        pa.field("case_id", pa.string(), nullable=False),
        pa.field("magnification", pa.int16(), nullable=False),
        pa.field("prob_malignant", pa.float32(), nullable=False),
        pa.field("pred_label", pa.int8(), nullable=False),  # 1 malignant, 0 benign
        pa.field("threshold", pa.float32(), nullable=False),
        pa.field("model_name", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),  # sha256 of the weights
        pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("flow_run_id", pa.string(), nullable=False),
    ]
)
CASE_SCHEMA = pa.schema(
    [
        pa.field("case_id", pa.string(), nullable=False),
        pa.field("magnification", pa.int16(), nullable=True),  # null: across magnifications
        pa.field("n_images", pa.int32(), nullable=False),
        pa.field("prob_malignant", pa.float32(), nullable=False),
        pa.field("pred_label", pa.int8(), nullable=False),
        pa.field("threshold", pa.float32(), nullable=False),
        pa.field("model_name", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),  # comma-joined when several
        pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)


@dataclass(frozen=True)
class ScoringLayout:
    """The URLs of everything under one scoring root OUT (a local path or fsspec URL)."""

    out: str

    def _join(self, *parts: str) -> str:
        return storage.join(self.out, *parts)

    def manifest(self) -> str:
        return self._join("manifests", "manifest.parquet")

    def quarantine(self) -> str:
        return self._join("manifests", "quarantine.parquet")

    def duplicates(self) -> str:
        return self._join("manifests", "duplicates.parquet")

    def images(
        self, model: str | None = None, version: str | None = None, magnification: int | None = None
    ) -> str:
        """Hive-style ``model=/version=/mag=`` folders; stops at the first one not given."""
        parts = []
        if model is not None:
            parts.append(f"model={model}")
            if version is not None:
                parts.append(f"version={version}")
                if magnification is not None:
                    parts.append(f"mag={int(magnification)}")
        return self._join("predictions", "images", *parts)

    def cases(self, model: str) -> str:
        return self._join("predictions", "cases", f"model={model}", "cases.parquet")

    def report(self, model: str, flow_run_id: str, magnification: int) -> str:
        return self._join(
            "predictions", "reports", f"model={model}", flow_run_id, f"{int(magnification)}x.json"
        )


def _parts(url: str) -> list[str]:
    try:
        return storage.list_files(url, suffixes=(".parquet",))
    except FileNotFoundError:
        return []


def read_image_predictions(
    out: str, model: str | None = None, *, version: str | None = None, dedupe: bool = True
) -> pd.DataFrame:
    """Image predictions under ``out`` (of ``model``, one ``version``), one row per (sha256, version)."""
    layout = ScoringLayout(out)
    frames = [storage.read_parquet(u) for u in _parts(layout.images(model, version))]
    if not frames:
        return IMAGE_SCHEMA.empty_table().to_pandas()
    table = pd.concat(frames, ignore_index=True)[IMAGE_SCHEMA.names]
    if dedupe:
        table = table.sort_values(["scored_at", "flow_run_id"], kind="stable").drop_duplicates(
            ["sha256", "model_version"], keep="first"
        )
    return table.reset_index(drop=True)


def scored_hashes(out: str, model: str, version: str) -> set[str]:
    """sha256s that already have a prediction from exactly these weights (any magnification)."""
    layout = ScoringLayout(out)
    return {
        sha
        for u in _parts(layout.images(model, version))
        for sha in storage.read_parquet(u)["sha256"]
    }


def read_case_predictions(out: str, model: str) -> pd.DataFrame:
    """The case table of ``model`` under ``out`` (empty when nothing was scored yet)."""
    uri = ScoringLayout(out).cases(model)
    if not storage.exists(uri):
        return CASE_SCHEMA.empty_table().to_pandas()
    return storage.read_parquet(uri)
