"""Metrics of a labelled drop, only over images the model never trained or validated on.

A drop may carry labels (a sidecar ``label`` column, BreakHis names). Scoring the training
archive again would then "measure" a model on images it fitted: the number would be an
optimistic lie. So the batch report evaluates only labelled images whose content (sha256) is in
neither the train nor the validation split the model was trained with, and says how many it left
out and why:

- ``training`` / ``validation``: the image's sha256 is one of the model's train or validation
  images at its magnification (and fold), by content, so a renamed copy is still caught;
- ``membership_unknown``: the model's split cannot be read back as it was when the model
  trained (no split file or training manifest under the registry root or the run's recorded
  root; the split's recorded manifest version differs from the model's data version; or the
  split's content hash differs from the one the run recorded), so every labelled image is left
  out rather than guessed about.

Membership comes from ``dala_model.data.splits.read_split`` on the training root and the
model's run config (scheme, fold, magnification), mapped to sha256s by the training manifest.
The training root is the registry root (runs live under ``ROOT/runs``) or, failing that, the
``root`` its TrainConfig recorded. Metrics are ``dala_model.metrics.evaluate`` (image level,
bootstrap intervals, and case level with the case as the patient).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import pandas as pd

from dala_model import runs, storage
from dala_model.data.manifest import read_manifest
from dala_model.data.splits import read_split
from dala_model.metrics import evaluate
from dala_model.serving.outputs import ScoringLayout, read_image_predictions
from dala_model.serving.promotion import RegistryRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Membership:
    """sha256s the model trained and validated on, or why they cannot be known."""

    train: frozenset[str]
    val: frozenset[str]
    unknown: str | None = None  # the reason membership is unknown; None when known


def _recorded_split_hash(record: RegistryRecord) -> str | None:
    """The split hash the run recorded (config.json or run.json), when it recorded one."""
    for name in (runs.CONFIG, runs.SUMMARY):
        uri = storage.join(record.run_uri, name)
        if not storage.exists(uri):
            continue
        data = runs.read_json(uri)
        for key in ("split", "split_identity"):
            value = data.get(key) or data.get("config", {}).get(key)
            if isinstance(value, dict) and value.get("hash"):
                return str(value["hash"])
    return None


def membership(registry: str, record: RegistryRecord) -> Membership:
    """What the model behind ``record`` trained and validated on (see the module docstring)."""
    config = record.config
    scheme, fold = config.get("scheme"), config.get("fold")
    roots = [registry] + [r for r in [config.get("root")] if r and r != registry]
    reasons = []
    for root in roots:
        try:
            split = read_split(root, scheme)
            manifest = read_manifest(root)
        except (FileNotFoundError, ValueError) as exc:
            reasons.append(str(exc))
            continue
        made_from = split.attrs.get("dala.manifest_version")
        if made_from is not None and made_from != record.data_version:
            reasons.append(
                f"the {scheme} split under {storage.redact(root)} was made from data version "
                f"{made_from}, the model from {record.data_version}"
            )
            continue
        recorded = _recorded_split_hash(record)
        if recorded is not None and recorded != split.attrs.get("dala.split_hash"):
            reasons.append(f"the {scheme} split under {storage.redact(root)} was rewritten")
            continue
        split = split[split["magnification"] == record.magnification]
        if fold is not None and "fold" in split.columns:
            split = split[split["fold"] == fold]
        sha = split.merge(manifest[["image_id", "sha256"]], on="image_id", how="inner")
        return Membership(
            train=frozenset(sha.loc[sha["split"] == "train", "sha256"]),
            val=frozenset(sha.loc[sha["split"] == "val", "sha256"]),
        )
    return Membership(frozenset(), frozenset(), "; ".join(reasons) or "no training root")


def batch_report(
    registry: str,
    layout: ScoringLayout,
    record: RegistryRecord,
    rows: pd.DataFrame,
    flow_run_id: str,
    threshold: float,
    scored_with: dict | None = None,
) -> tuple[dict | None, str | None]:
    """Evaluate the drop's labelled images at one magnification; None when none is labelled.

    ``scored_with`` (the precision and tuning this run scored with) is recorded in the report."""
    labelled = rows[rows["label_id"].notna()]
    if labelled.empty:
        return None, None
    scored = read_image_predictions(layout.out, record.model, version=record.model_version)
    scored = scored[scored["magnification"] == record.magnification]
    frame = labelled[["sha256", "case_id", "label_id"]].merge(
        scored[["sha256", "prob_malignant"]], on="sha256", how="inner"
    )
    known = membership(registry, record)
    if known.unknown is not None:
        excluded = {"membership_unknown": len(frame)}
        keep = frame.iloc[:0]
    else:
        in_train = frame["sha256"].isin(known.train)
        in_val = frame["sha256"].isin(known.val) & ~in_train
        excluded = {"training": int(in_train.sum()), "validation": int(in_val.sum())}
        keep = frame[~in_train & ~in_val]
    report = {
        "model": record.model,
        "magnification": record.magnification,
        "model_version": record.model_version,
        "flow_run_id": flow_run_id,
        "labelled": len(frame),
        "evaluated": len(keep),
        "excluded": excluded,
        "excluded_why": (
            known.unknown
            or "images the model trained or validated on (by sha256) say nothing about new data"
        ),
        "threshold": float(threshold),
        "metrics": None,
    } | (scored_with or {})
    if len(keep):
        report["metrics"] = evaluate(
            keep["label_id"].astype(int).to_numpy(),
            keep["prob_malignant"].astype(float).to_numpy(),
            patient_ids=keep["case_id"].to_numpy(),
            threshold=report["threshold"],
        )
    uri = layout.report(record.model, flow_run_id, record.magnification)
    storage.write_bytes_atomic(
        uri, json.dumps(report, indent=2, sort_keys=True, default=float).encode()
    )
    log.info(
        "%dX: %d labelled, %d evaluated, excluded %s",
        record.magnification,
        len(frame),
        len(keep),
        excluded,
    )
    return report, uri
