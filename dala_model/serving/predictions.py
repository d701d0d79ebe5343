"""Batch inference: score manifest images with the registry's current model, incrementally.

Output layout (Hive-style folders, so query engines can prune by model and version)::

    ROOT/predictions/model=<name>/version=<model_version>/magnification=<m>/part-<key>.parquet
    ROOT/predictions/reports/model=<name>/<flow_run_id>/<m>x.json   metrics of a labelled batch

Columns: ``image_id, uri, magnification, patient_id, prob_malignant, pred_label (1 malignant,
0 benign), threshold, model_name, model_version, flow_run_id, scored_at``.

Why no row is ever written twice:

- Incremental: images that already have a row for the same ``model_version`` are skipped, so a
  rerun (or a retried flow run) scores only what is missing.
- Deterministic parts: the pending ids are sorted and cut into fixed-size chunks, and a part's key
  is a hash of the model version and its image ids. Two runs that score the same pending set
  (the common race: a schedule firing while a manual run is going) write the same keys, and an
  atomic overwrite of a key replaces rows instead of adding them.
- Dedupe on read: runs racing over *different* pending sets (new images ingested in between) may
  chunk differently and both score an image; :func:`read_predictions` keeps one row per
  ``(image_id, model_version)``, the earliest. Raw part files may then hold a benign duplicate, the
  table that readers get never does.

The model runs as ``dala_model.serving.scorer`` loads it, the path ``dala predict`` takes:
``precision="auto"`` with the precision, memory format and CPU batch size measured once per
machine, or ``precision="int8"`` on the CPU (the checkpoint's int8 sibling, calibrated on the
model's validation images). :class:`ScoreResult` and the batch report record ``precision`` and
``tuning``, each part file's Parquet metadata ``dala.precision``; ``model_version`` stays the
float weights' sha256, so an image scored once is not scored again at another precision.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow as pa

from dala_model import storage
from dala_model.data import cache
from dala_model.data.dataset import decode_pngs
from dala_model.data.manifest import read_manifest
from dala_model.layout import RootLayout
from dala_model.metrics import classification_metrics
from dala_model.models.checkpoint import read_model_config
from dala_model.serving.promotion import RegistryRecord, current_record
from dala_model.serving.scorer import load_scorer, scoring_device

log = logging.getLogger(__name__)

PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("magnification", pa.int16(), nullable=False),
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("prob_malignant", pa.float32(), nullable=False),
        pa.field("pred_label", pa.int8(), nullable=False),
        pa.field("threshold", pa.float32(), nullable=False),
        pa.field("model_name", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("flow_run_id", pa.string(), nullable=False),
        pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)


@dataclass
class ScoreResult:
    """What one magnification's scoring did; small enough to pass between Prefect tasks."""

    model: str
    magnification: int
    model_version: str
    scored: int
    skipped: int
    parts: list[str] = field(default_factory=list)
    metrics: dict | None = None
    report_uri: str | None = None
    precision: str | None = None  # what scored this call's rows (fp32, bf16, fp16, int8)
    tuning: dict | None = None  # the measured choice or the int8 model used (serving.scorer)


def predictions_uri(
    root: str, model: str, model_version: str | None = None, magnification: int | None = None
) -> str:
    return RootLayout(root).predictions(model, model_version, magnification)


def read_predictions(root: str, model: str, *, dedupe: bool = True) -> pd.DataFrame:
    """Every stored prediction of ``model`` (all versions), one row per (image_id, model_version)."""
    try:
        uris = storage.list_files(predictions_uri(root, model), suffixes=(".parquet",))
    except FileNotFoundError:
        uris = []
    frames = [storage.read_parquet(u) for u in uris]
    if not frames:
        return PREDICTION_SCHEMA.empty_table().to_pandas()
    table = pd.concat(frames, ignore_index=True)
    if dedupe:
        table = table.sort_values(["scored_at", "flow_run_id"], kind="stable").drop_duplicates(
            ["image_id", "model_version"], keep="first"
        )
    return table.reset_index(drop=True)


def scored_ids(root: str, model: str, model_version: str, magnification: int) -> set[str]:
    """Image ids that already have a prediction from exactly these weights."""
    try:
        uris = storage.list_files(
            predictions_uri(root, model, model_version, magnification), suffixes=(".parquet",)
        )
    except FileNotFoundError:
        return set()
    return {i for u in uris for i in storage.read_parquet(u)["image_id"]}


def score_magnification(
    root: str,
    model: str,
    magnification: int,
    *,
    flow_run_id: str,
    threshold: float = 0.5,
    batch_size: int | None = None,
    chunk_size: int = 512,
    device: str = "auto",
    precision: str = "auto",
    image_ids: list[str] | None = None,
) -> ScoreResult:
    """Score the not-yet-scored manifest images of one magnification with its current model.

    ``image_ids`` restricts scoring to a subset of the manifest (default: all of it). Images are
    read from the decoded cache at the model's training size when cached there, else decoded from
    their PNGs; chunks of ``chunk_size`` bound memory and each becomes one part file.
    ``precision``: auto, fp32, bf16, fp16 (CUDA) or int8 (CPU); ``batch_size`` None lets the CPU
    measure it.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold}")
    scoring_device(device, precision)  # an impossible request fails before any work
    record = current_record(root, model, magnification)
    if record is None:
        raise LookupError(
            f"no current {model} model for {magnification}X under {storage.redact(root)}: train one "
            f"(train-breakhis) or pin one with `dala promote {storage.redact(root)} --model {model} "
            f"--magnification {magnification} --run RUN_ID`"
        )
    version = record.model_version
    manifest = read_manifest(root)
    rows = manifest[manifest["magnification"] == magnification]
    if image_ids is not None:
        rows = rows[rows["image_id"].isin(set(image_ids))]
    done = scored_ids(root, model, version, magnification)
    pending = rows[~rows["image_id"].isin(done)].sort_values("image_id").reset_index(drop=True)
    result = ScoreResult(
        model, int(magnification), version, scored=0, skipped=len(rows) - len(pending)
    )
    if not pending.empty:
        _score(
            root,
            record,
            pending,
            result,
            flow_run_id=flow_run_id,
            threshold=threshold,
            batch_size=batch_size,
            chunk_size=chunk_size,
            device=device,
            precision=precision,
        )
    result.metrics, result.report_uri = _batch_report(root, record, manifest, flow_run_id, result)
    return result


def _score(
    root: str,
    record: RegistryRecord,
    pending: pd.DataFrame,
    result: ScoreResult,
    *,
    flow_run_id: str,
    threshold: float,
    batch_size: int | None,
    chunk_size: int,
    device: str,
    precision: str,
) -> None:
    size, preset = int(record.config["image_size"]), record.config["preset"]
    checkpoint = record.checkpoint_uri
    if read_model_config(checkpoint)["weights_sha256"] != result.model_version:
        raise ValueError(
            f"{storage.redact(checkpoint)} no longer holds model_version {result.model_version[:12]}: "
            "the run folder was overwritten; promote the run again (`dala promote`)"
        )
    scorer = load_scorer(
        root,
        record,
        device=device,
        precision=precision,
        batch_size=batch_size,
        image_size=size,
        preset=preset,
    )
    result.precision, result.tuning = scorer.precision, scorer.tuning
    metadata = {"dala.precision": scorer.precision, "dala.tuning": scorer.tuning.get("label", "")}
    cached = set(cache.read_index(root, size)["image_id"])
    base = predictions_uri(root, result.model, result.model_version, result.magnification)
    for start in range(0, len(pending), chunk_size):
        chunk = pending.iloc[start : start + chunk_size]
        ids = chunk["image_id"].tolist()
        pixels = _pixels(root, chunk, size, cached)
        prob = scorer.proba(pixels)
        frame = pd.DataFrame(
            {
                "image_id": ids,
                "uri": chunk["uri"].to_numpy(),
                "magnification": chunk["magnification"].to_numpy(),
                "patient_id": chunk["patient_id"].to_numpy(),
                "prob_malignant": prob,
                "pred_label": (prob >= threshold).astype(np.int8),
                "threshold": threshold,
                "model_name": result.model,
                "model_version": result.model_version,
                "flow_run_id": flow_run_id,
                "scored_at": pd.Timestamp(datetime.now(UTC)),
            }
        )
        key = hashlib.sha256("\n".join([result.model_version, *ids]).encode()).hexdigest()[:20]
        uri = storage.join(base, f"part-{key}.parquet")
        storage.write_parquet_atomic(frame, uri, schema=PREDICTION_SCHEMA, metadata=metadata)
        result.parts.append(uri)
        result.scored += len(ids)
        log.info(
            "scored %d images at %dX with %s@%s -> %s",
            len(ids),
            result.magnification,
            result.model,
            result.model_version[:12],
            storage.redact(uri),
        )


def _pixels(root: str, chunk: pd.DataFrame, size: int, cached: set[str]) -> np.ndarray:
    """uint8 NHWC pixels of ``chunk``: cache rows where present, decoded PNGs for the rest."""
    ids = chunk["image_id"].tolist()
    in_cache = np.array([i in cached for i in ids], dtype=bool)
    out = np.empty((len(ids), size, size, 3), dtype=np.uint8)
    if in_cache.any():
        out[in_cache] = cache.load_images(
            root, [i for i, c in zip(ids, in_cache, strict=True) if c], size
        )
    if not in_cache.all():
        out[~in_cache] = decode_pngs(chunk[~in_cache], size)
    return out


def _batch_report(
    root: str, record: RegistryRecord, manifest: pd.DataFrame, flow_run_id: str, result: ScoreResult
) -> tuple[dict | None, str | None]:
    """IBA/G-mean and the rest for the images this flow run scored, retries included.

    Those are the rows still attributed to the run (earlier attempts of the same flow run) and
    every row of the parts this call wrote (``result.parts``): a racing run scoring the same pending set
    rewrites the same part keys with its own ``flow_run_id`` (same images, same model, same
    probabilities), which must not shrink this run's report.
    """
    model, magnification, version = record.model, record.magnification, record.model_version
    frames = []
    try:
        uris = storage.list_files(
            predictions_uri(root, model, version, magnification), suffixes=(".parquet",)
        )
    except FileNotFoundError:
        uris = []
    ours = set(result.parts)
    for uri in uris:
        frame = storage.read_parquet(uri)
        frames.append(frame if uri in ours else frame[frame["flow_run_id"] == flow_run_id])
    scored = (
        pd.concat(frames, ignore_index=True).drop_duplicates("image_id")
        if frames
        else pd.DataFrame()
    )
    if scored.empty or "label_id" not in manifest.columns:
        return None, None
    labelled = scored.merge(manifest[["image_id", "label_id"]], on="image_id", how="inner")
    labelled = labelled[labelled["label_id"].notna()]
    if labelled.empty:
        return None, None
    metrics = classification_metrics(
        labelled["label_id"].astype(int).to_numpy(),
        labelled["pred_label"].astype(int).to_numpy(),
        labelled["prob_malignant"].astype(float).to_numpy(),
    )
    report = {
        "model": model,
        "magnification": magnification,
        "model_version": version,
        "flow_run_id": flow_run_id,
        "threshold": float(labelled["threshold"].iloc[0]),
        "metrics": metrics,
        "precision": result.precision,  # of this call's rows; None when it scored none
        "tuning": result.tuning,
    }
    uri = RootLayout(root).batch_report(model, flow_run_id, magnification)
    storage.write_bytes_atomic(
        uri, json.dumps(report, indent=2, sort_keys=True, default=float).encode()
    )
    return metrics, uri
