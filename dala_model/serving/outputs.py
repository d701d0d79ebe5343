"""What scoring writes under OUT, and how consumers read it: the layout and the fixed schemas.

Layout of a scoring root (``dala predict SOURCE --out OUT``; docs/SCORING.md mirrors this)::

    OUT/manifests/manifest.parquet     one row per image content seen in any drop (drop.py)
    OUT/manifests/quarantine.parquet   uri, reason, detail, case_id, magnification, quarantined_at
    OUT/manifests/duplicates.parquet   sha256, uri, kept_uri
    OUT/predictions/images/model=<m>/version=<v>/mag=<x>/part-<key>.parquet   IMAGE_SCHEMA
    OUT/predictions/cases/model=<m>/cases.parquet                            CASE_SCHEMA
    OUT/predictions/reports/model=<m>/<flow_run_id>/<x>x.json   metrics of a labelled drop
    OUT/explain/model=<m>/version=<v>/mag=<x>/<sha256>.<method>.png   heatmaps (explain=True)

The partition folder is ``mag=``, not ``magnification=``: a Hive key with a column's name and
another type (int32 inferred from the folder, int16 in the file) makes
``pyarrow.dataset(..., partitioning="hive")`` refuse to merge the schemas, so consumers could
not read the table with the most common reader.

Readers get one row per ``(sha256, model_version)``: two runs racing over different pending
sets may both store an image, and :func:`read_image_predictions` keeps the earliest row.

Columns are only ever added, nullable, at the end (:data:`ADDED_COLUMNS`), so parts written
before a column existed stay valid: :func:`read_image_predictions` fills it with nulls, and a
``pyarrow.dataset`` reader gets the same by passing ``schema=IMAGE_SCHEMA`` (without it the
dataset takes the schema of whichever file it opens first).
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
        # The Grad-CAM overlay of an image scoring explained (explain=True: a malignant call or
        # one within the uncertain band of the threshold); null when not explained.
        pa.field("heatmap_uri", pa.string(), nullable=True),
    ]
)
# Columns added after parts were first written, each nullable: older parts read back as null.
ADDED_COLUMNS = ("heatmap_uri",)
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

    def heatmap(
        self, model: str, version: str, magnification: int, sha256: str, method: str
    ) -> str:
        """The overlay of one image content by one model version: the same key on every rerun."""
        tag = method.replace("+", "p")  # gradcam++ -> gradcampp: no '+' in object keys
        folder = storage.join(self.heatmaps(model), f"version={version}")
        return storage.join(folder, f"mag={int(magnification)}", f"{sha256}.{tag}.png")

    def heatmaps(self, model: str) -> str:
        """The folder of ``model``'s heatmaps (``explain=True``)."""
        return self._join("explain", f"model={model}")

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
    frames = [_with_added(storage.read_parquet(u)) for u in _parts(layout.images(model, version))]
    if not frames:
        return IMAGE_SCHEMA.empty_table().to_pandas()
    table = pd.concat(frames, ignore_index=True)[IMAGE_SCHEMA.names]
    if dedupe:
        table = table.sort_values(["scored_at", "flow_run_id"], kind="stable").drop_duplicates(
            ["sha256", "model_version"], keep="first"
        )
    return table.reset_index(drop=True)


def _with_added(frame: pd.DataFrame) -> pd.DataFrame:
    """A part written before an :data:`ADDED_COLUMNS` column existed, with it as nulls.

    The nulls come through pyarrow, so they have the dtype a part holding the column reads
    back with (pandas' ``str`` with NaN for a string), and the parts concatenate as one."""
    for name in ADDED_COLUMNS:
        if name not in frame.columns:
            nulls = pa.nulls(len(frame), IMAGE_SCHEMA.field(name).type).to_pandas()
            frame[name] = nulls.set_axis(frame.index)
    return frame


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
