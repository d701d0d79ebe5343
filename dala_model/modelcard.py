"""Model cards as data: the ``metadata`` block of ``best/config.json`` and its ``MODEL_CARD.md``.

A histopathology classifier handed on without saying what it is for, what it eats and what it
was trained and tested on invites misuse; MONAI bundles answer that with a ``metadata.json``
(schema, version, changelog, intended use - "not to be used for diagnostic purposes" - and
``network_data_format`` with the inputs and outputs). This module is that block for our
checkpoints, as a typed record rather than free text, so a deployment script or ``dala models
current`` reads fields instead of parsing prose:

- ``schema_version`` (``dala-model-card/1``) and ``changelog``, as MONAI's ``schema``/``changelog``;
- ``intended_use``: research use, not for diagnosis;
- ``network_data_format``: the input (3 RGB channels, size, the value range the network sees,
  the normalisation preset and its mean/std) and the output (2 softmax probabilities, benign=0,
  malignant=1) in MONAI's field names;
- ``training_data``: the manifest's data version, the split's content hash and identity, and
  patients and images per class in each split at this model's magnification (and fold);
- ``metrics``: the test evaluation at the served threshold, every interval naming what it
  resamples; ``threshold``: the value serving uses and where it came from;
- ``limitations``: single centre, magnification-specific, the split protocol (the paper's
  image-level split leaks patients and says so), small test sets, synthetic data when known.

The engine builds the block when a run finishes (``engine.records.summarise``) and writes it
into ``best/config.json`` in the same atomic write that stores the validation-chosen threshold,
so a checkpoint never carries a card from another training. Checkpoints saved before cards
existed have no block: :func:`read_card` returns ``None`` and every view says "not recorded".
Promotion writes :func:`to_markdown` beside the serving pointer (:func:`write_model_card`).

No torch at import: ``dala models current`` and the registry import this module; the checkpoint
reader (which needs torch) is imported where a checkpoint is read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pandas as pd
from pydantic import field_validator

from dala_model import storage
from dala_model.runs import Record

SCHEMA_VERSION = "dala-model-card/1"
CHANGELOG = {
    SCHEMA_VERSION: (
        "first card: intended use, network_data_format (input/output spec), training data "
        "(manifest version, split hash, patients and images per class and split), test metrics "
        "with intervals, decision threshold, limitations"
    ),
}
METADATA_KEY = "metadata"  # the block's key in best/config.json (models.checkpoint.METADATA_KEY)
MODEL_CARD_FILE = "MODEL_CARD.md"
NOT_RECORDED = "not recorded"
CLASSES = ("benign", "malignant")  # label_id 0 and 1, as data.breakhis.LABELS
SPLITS = ("train", "val", "test")

INTENDED_USE = (
    "Research use; not for diagnosis: not to be used for diagnostic purposes, for patient care "
    "or to triage cases. For benchmarking and method development on BreakHis-style H&E breast "
    "tumour histopathology images."
)
OUT_OF_SCOPE = (
    "diagnosis, patient care or clinical decision support: the model is not a medical device "
    "and has not been validated clinically",
    "images at another magnification than the one the model was trained on",
    "whole-slide images, other organs, other stains or other centres without re-validation",
    "subtyping tumours: the model outputs benign vs malignant only",
)
# The public BreakHis archive (Spanhol et al. 2016): one laboratory, 82 patients, 7,909 images.
BREAKHIS_IMAGES, BREAKHIS_PATIENTS = 7909, 82
REFERENCES = (
    "Spanhol et al., A Dataset for Breast Cancer Histopathological Image Classification, "
    "IEEE TBME 63(7), 2016 (BreakHis)",
    "Bussola et al., AI slipping on tiles: data leakage in digital pathology, arXiv:1909.06539",
    "MONAI bundle metadata.json: https://docs.monai.io/en/stable/mb_specification.html",
)
# Image-level metrics the card keeps (the full set is in run.json).
CARD_METRICS = (
    "n",
    "n_benign",
    "n_malignant",
    "accuracy",
    "balanced_accuracy",
    "sensitivity",
    "specificity",
    "gmean",
    "iba_unsquared",
    "f1_macro",
    "roc_auc",
    "average_precision",
)
CARD_PATIENT_METRICS = ("n_patients", "accuracy", "sensitivity", "specificity", "gmean", "roc_auc")


class InputSpec(Record):
    """``network_data_format.inputs.image``: MONAI's fields plus how to get there from a PNG."""

    type: str = "image"
    format: str = "RGB"
    modality: str = "light microscopy, H&E-stained breast tissue (histopathology)"
    num_channels: int = 3
    spatial_shape: list[int]  # [height, width] the network is fed
    dtype: str = "float32"
    value_range: list[float]  # [min, max] after normalisation, over the three channels
    is_patch_data: bool = False
    channel_def: dict[str, str] = {"0": "R", "1": "G", "2": "B"}
    layout: str = "NCHW"
    channel_order: str = "RGB"
    source_dtype: str = "uint8"
    source_value_range: list[float] = [0.0, 255.0]
    preprocessing: str  # the steps from an RGB image to the tensor
    preset: str  # models.transforms.PRESETS name
    preset_description: str | None = None
    mean: list[float]
    std: list[float]
    magnification: int  # the only magnification the model was trained on


class OutputSpec(Record):
    """``network_data_format.outputs.pred``: two logits; serving takes their softmax."""

    type: str = "probabilities"
    format: str = "classes"
    num_channels: int = 2
    spatial_shape: list[int] = [2]
    dtype: str = "float32"
    value_range: list[float] = [0.0, 1.0]
    is_patch_data: bool = False
    channel_def: dict[str, str] = {"0": "benign", "1": "malignant"}
    activation: str = "softmax over the two logits (dim 1)"
    decision: str  # how a probability becomes a label


class NetworkDataFormat(Record):
    inputs: dict[str, InputSpec]
    outputs: dict[str, OutputSpec]


class ClassCount(Record):
    patients: int
    images: int


class SplitCount(Record):
    """One split at the model's magnification (and fold): in all and per class."""

    patients: int
    images: int
    benign: ClassCount
    malignant: ClassCount


class TrainingData(Record):
    dataset: str = "BreakHis"
    manifest_version: str | None  # data.manifest.data_version: hash of (image_id, sha256)
    manifest_source: str | None  # where ingest read the images (credentials redacted)
    manifest_images: int | None  # all magnifications
    manifest_patients: int | None
    synthetic: bool | None  # None: the manifest does not record it
    split_scheme: str
    split_hash: str | None  # data.splits.split_hash, as the run recorded it
    group_by: str | None
    split_seed: int | None
    fractions: list[float] | None
    folds: int | None
    fold: int | None
    magnification: int
    counts: dict[str, SplitCount]  # train, val, test


class Interval(Record):
    """One bootstrap interval (evaluation.interval_records) and what it resampled."""

    metric: str
    scope: str  # image: metric of image predictions; patient: of per-patient predictions
    unit: str  # what was resampled: image or patient
    n_units: int
    level: float
    n_boot: int
    optimistic: bool  # True when correlated images were resampled as independent
    stratified_by: str | None = None
    low: float
    high: float


class TestMetrics(Record):
    split: str = "test"
    threshold: float  # the decision threshold these metrics were computed at
    image: dict[str, Any]
    patient: dict[str, Any] | None
    intervals: list[Interval]
    note: str


class DecisionThreshold(Record):
    value: float
    source: str  # where it came from
    chosen_on: str | None  # the split it was chosen on
    n: int | None = None
    gmean: float | None = None
    gmean_at_default: float | None = None


class ModelCard(Record):
    """The ``metadata`` block of ``best/config.json``."""

    schema_version: str = SCHEMA_VERSION
    changelog: dict[str, str] = CHANGELOG
    name: str  # "<model> <magnification>X"
    model: str
    magnification: int
    model_version: str  # sha256 of the weights file (what the registry calls model_version)
    task: str = "binary classification of breast tumour histopathology images: benign vs malignant"
    description: str
    intended_use: str = INTENDED_USE
    out_of_scope: list[str] = list(OUT_OF_SCOPE)
    network_data_format: NetworkDataFormat
    training_data: TrainingData
    metrics: TestMetrics | None
    threshold: DecisionThreshold
    limitations: list[str]
    references: list[str] = list(REFERENCES)
    run_id: str | None
    best_epoch: int | None
    monitor: str | None
    parameters: int | None
    created_at: str | None
    code_version: str | None
    dala_version: str | None
    torch_version: str | None

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, version: str) -> str:
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"model card schema {version!r} is not one this code reads ({SCHEMA_VERSION}); "
                "a newer card needs a newer dala_model"
            )
        return version


# -- building ---------------------------------------------------------------------------------


def split_counts(frames: Mapping[str, pd.DataFrame]) -> dict[str, SplitCount]:
    """Patients and images per class of each split frame (rows with ``label_id``, ``patient_id``)."""
    counts = {}
    for name, frame in frames.items():
        per_class = {}
        for label_id, label in enumerate(CLASSES):
            rows = frame[frame["label_id"] == label_id]
            per_class[label] = ClassCount(
                patients=int(rows["patient_id"].nunique()), images=len(rows)
            )
        counts[name] = SplitCount(
            patients=int(frame["patient_id"].nunique()), images=len(frame), **per_class
        )
    return counts


def manifest_facts(root: str) -> dict[str, Any]:
    """What the card says about the manifest under ``root``: source, size, synthetic (if recorded).

    ``synthetic`` comes from the manifest's ``dala.synthetic`` metadata when ingest recorded it
    (``"true"``/``"false"``); without it the card says it is not known.
    """
    from dala_model.data.manifest import read_manifest

    manifest = read_manifest(root)
    flag = manifest.attrs.get("dala.synthetic")
    return {
        "source": manifest.attrs.get("dala.source"),
        "images": len(manifest),
        "patients": int(manifest["patient_id"].nunique()),
        "synthetic": None if flag is None else str(flag).lower() == "true",
    }


def build_card(
    checkpoint: Mapping[str, Any],
    summary: Mapping[str, Any],
    counts: Mapping[str, SplitCount],
    manifest: Mapping[str, Any] | None = None,
) -> ModelCard:
    """The card of a finished run: ``checkpoint`` is ``best/config.json``, ``summary`` ``run.json``.

    ``counts`` are the run's own splits (:func:`split_counts` of the frames it trained, validated
    and tested on), ``manifest`` :func:`manifest_facts` (None: not recorded).
    """
    manifest = dict(manifest or {})
    config = dict(summary.get("config") or {})
    split = dict(summary.get("split") or {})
    magnification = int(summary["magnification"])
    model = str(summary.get("model") or checkpoint["model"])
    size = int(checkpoint.get("input_size") or config.get("image_size"))
    mean = [float(v) for v in checkpoint["mean"]]
    std = [float(v) for v in checkpoint["std"]]
    chosen = dict(summary.get("threshold") or {})
    threshold = float(chosen.get("threshold", 0.5))
    preset = str(checkpoint["preset"])
    data = TrainingData(
        manifest_version=summary.get("data_version") or split.get("manifest_version"),
        manifest_source=_redacted(manifest.get("source")),
        manifest_images=manifest.get("images"),
        manifest_patients=manifest.get("patients"),
        synthetic=manifest.get("synthetic"),
        split_scheme=str(summary.get("scheme") or split.get("scheme")),
        split_hash=split.get("hash"),
        group_by=split.get("group_by"),
        split_seed=split.get("seed"),
        fractions=split.get("fractions"),
        folds=split.get("folds"),
        fold=summary.get("fold"),
        magnification=magnification,
        counts=dict(counts),
    )
    metrics = _test_metrics(summary.get("metrics") or {}, threshold)
    return ModelCard(
        name=f"{model} {magnification}X",
        model=model,
        magnification=magnification,
        model_version=str(checkpoint["weights_sha256"]),
        description=(
            f"{model} trained on the {magnification}X images of a {data.dataset} manifest "
            f"({data.split_scheme} split{_fold_text(data)}) to call an image benign or "
            "malignant; the best epoch on validation is kept."
        ),
        network_data_format=NetworkDataFormat(
            inputs={
                "image": InputSpec(
                    spatial_shape=[size, size],
                    value_range=_value_range(mean, std),
                    preprocessing=(
                        f"RGB image -> resize to {size}x{size} (antialiased) -> float32 / 255 -> "
                        f"(x - mean) / std per channel with preset {preset!r}"
                    ),
                    preset=preset,
                    preset_description=_preset_description(preset),
                    mean=mean,
                    std=std,
                    magnification=magnification,
                )
            },
            outputs={
                "pred": OutputSpec(
                    decision=(
                        f"malignant when softmax(logits)[1] >= {threshold:.4g} (the decision "
                        "threshold below), else benign"
                    )
                )
            },
        ),
        training_data=data,
        metrics=metrics,
        threshold=DecisionThreshold(
            value=threshold,
            source=str(chosen.get("reason") or "default 0.5 (no threshold was chosen)"),
            chosen_on="val" if chosen else None,
            n=chosen.get("n"),
            gmean=chosen.get("gmean"),
            gmean_at_default=chosen.get("gmean_at_0.5"),
        ),
        limitations=limitations(data, metrics, chosen),
        run_id=summary.get("run_id"),
        best_epoch=summary.get("best_epoch"),
        monitor=config.get("monitor"),
        parameters=checkpoint.get("parameters") or summary.get("parameters"),
        created_at=summary.get("finished_at"),
        code_version=summary.get("code_version"),
        dala_version=checkpoint.get("dala_version"),
        torch_version=checkpoint.get("torch_version"),
    )


def limitations(
    data: TrainingData, metrics: TestMetrics | None, chosen: Mapping[str, Any]
) -> list[str]:
    """What the card warns about, from what the run recorded."""
    mag = data.magnification
    notes = [
        "Single centre: BreakHis comes from one laboratory (P&D Laboratory, Brazil; 82 patients, "
        "one staining and acquisition protocol). Performance on other centres, stains, scanners "
        "or populations is unknown.",
        f"Magnification-specific: trained, validated and tested on {mag}X images only; images at "
        "another magnification are out of distribution for this model.",
        _protocol_note(data),
    ]
    test = data.counts.get("test")
    if test is not None:
        notes.append(
            f"Test set: {test.patients} patients ({test.benign.patients} benign, "
            f"{test.malignant.patients} malignant), {test.images} images at {mag}X. Intervals "
            "resampled by patient are the ones to trust, and with few patients they are wide; "
            "intervals resampled by image are optimistic (tiles of one patient are not "
            "independent)."
        )
    if data.synthetic is True:
        notes.append(
            "Synthetic data: the manifest records synthetic images (dala synth); these metrics "
            "say nothing about real tissue."
        )
    elif data.synthetic is None:
        size = (
            f"{data.manifest_images:,} images of {data.manifest_patients} patients"
            if data.manifest_images is not None
            else "an unknown number of images"
        )
        notes.append(
            f"Data origin: the manifest does not record whether its images are synthetic "
            f"(source {data.manifest_source or NOT_RECORDED}; {size}, while the public BreakHis "
            f"archive has {BREAKHIS_IMAGES:,} images of {BREAKHIS_PATIENTS} patients). "
            "Synthetic BreakHis from `dala synth` has the same names and layout: check the "
            "source before reading these metrics as results on real tissue."
        )
    if chosen and str(chosen.get("reason", "")).startswith("validation holds one class"):
        notes.append("Threshold not tuned: validation held one class, so 0.5 was kept.")
    if metrics is None:
        notes.append("No test metrics were recorded for this model.")
    return notes


def _protocol_note(data: TrainingData) -> str:
    if data.split_scheme == "paper":
        return (
            "Protocol: the paper's image-level split (scheme 'paper'). Images of one patient fall "
            "in train and test, so patients leak across splits and near-duplicate tiles of one "
            "slide inflate the test metrics (Bussola et al., arXiv:1909.06539); they do not "
            "estimate performance on new patients."
        )
    fold = (
        f" This is fold {data.fold} of {data.folds}: the card describes one fold's model."
        if data.split_scheme == "patient-kfold"
        else ""
    )
    if data.group_by == "slide":
        return (
            f"Protocol: {data.split_scheme} split grouped by slide folder: two slides of one "
            "case (patient) can fall in different splits, a small, known patient leak." + fold
        )
    return (
        f"Protocol: patient-disjoint split (scheme {data.split_scheme!r}, grouped by "
        f"{data.group_by or 'patient'}): no patient is in two splits, at any magnification." + fold
    )


def _test_metrics(metrics: Mapping[str, Any], threshold: float) -> TestMetrics | None:
    test = metrics.get("test_at_threshold") or metrics.get("test")
    if not test or not isinstance(test.get("image"), dict):
        return None
    patient = test.get("patient")
    fields = set(Interval.model_fields)
    return TestMetrics(
        threshold=float(test.get("threshold", threshold)),
        image={k: test["image"].get(k) for k in CARD_METRICS if k in test["image"]},
        patient={k: patient.get(k) for k in CARD_PATIENT_METRICS if k in patient}
        if isinstance(patient, dict)
        else None,
        intervals=[
            Interval(**{k: v for k, v in row.items() if k in fields})
            for row in test.get("intervals") or []
        ],
        note=(
            "Test split of this run, at the decision threshold. Intervals are percentile "
            "bootstraps: unit 'image' resamples images (optimistic), unit 'patient' resamples "
            "patients stratified by class (the interval to trust); scope 'patient' is the metric "
            "of per-patient predictions (mean probability of a patient's images)."
        ),
    )


def _value_range(mean: list[float], std: list[float]) -> list[float]:
    lows = [(0.0 - m) / s for m, s in zip(mean, std, strict=True)]
    highs = [(1.0 - m) / s for m, s in zip(mean, std, strict=True)]
    return [round(min(lows), 6), round(max(highs), 6)]


def _preset_description(preset: str) -> str | None:
    from dala_model.models.transforms import PRESETS  # torch: only when building a card

    known = PRESETS.get(preset)
    return known.description if known else None


def _fold_text(data: TrainingData) -> str:
    return f", fold {data.fold}" if data.fold is not None else ""


def _redacted(source: Any) -> str | None:
    return None if source is None else storage.redact(str(source))


# -- reading and writing ----------------------------------------------------------------------


def card_from_config(config: Mapping[str, Any], where: str = "config.json") -> ModelCard | None:
    """The card in a checkpoint config dict; ``None`` when it has none (saved before cards)."""
    block = config.get(METADATA_KEY)
    if block is None:
        return None
    return ModelCard.parse(block, where)


def read_card(best_uri: str) -> ModelCard | None:
    """The card of the checkpoint at ``best_uri``; ``None`` for one saved before cards."""
    from dala_model.models.checkpoint import CONFIG_FILE, read_model_config

    return card_from_config(read_model_config(best_uri), storage.join(best_uri, CONFIG_FILE))


def write_model_card(best_uri: str, dest_folder: str) -> str:
    """Write ``dest_folder/MODEL_CARD.md`` for the checkpoint at ``best_uri``, atomically; return it.

    A checkpoint without a card still gets a file: what its config says, and "not recorded".
    """
    from dala_model.models.checkpoint import CONFIG_FILE, read_model_config

    config = read_model_config(best_uri)
    card = card_from_config(config, storage.join(best_uri, CONFIG_FILE))
    uri = storage.join(dest_folder, MODEL_CARD_FILE)
    storage.write_bytes_atomic(uri, to_markdown(card, checkpoint=config).encode())
    return uri


# -- views ------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    """A value as Markdown text: no HTML tag can start (``&``/``<`` escaped, as run ids and source
    URLs are user text), pipes escaped (table cells), None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, float):
        value = f"{value:.4g}"
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace("|", "\\|")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_e(cell) for cell in row) + " |" for row in rows]
    return lines


def to_markdown(card: ModelCard | None, *, checkpoint: Mapping[str, Any] | None = None) -> str:
    """``MODEL_CARD.md``: the card as a document; ``card=None`` says it was not recorded."""
    if card is None:
        return _markdown_not_recorded(checkpoint or {})
    spec = card.network_data_format.inputs["image"]
    out = card.network_data_format.outputs["pred"]
    data = card.training_data
    lines = [
        f"# Model card: {_e(card.name)}",
        "",
        f"Schema `{card.schema_version}`. Model version (weights SHA-256) `{card.model_version}`.",
        "",
        _e(card.description),
        "",
        "## Intended use",
        "",
        _e(card.intended_use),
        "",
        "Out of scope:",
        "",
        *[f"- {_e(item)}" for item in card.out_of_scope],
        "",
        "## Input",
        "",
        *_table(
            ["field", "value"],
            [
                ["channels", f"{spec.num_channels} ({spec.channel_order})"],
                ["size", "x".join(str(n) for n in spec.spatial_shape)],
                ["layout / dtype", f"{spec.layout} {spec.dtype}"],
                ["source values", f"{spec.source_dtype} {_range(spec.source_value_range)}"],
                ["network value range", _range(spec.value_range)],
                ["normalisation preset", spec.preset],
                ["mean", spec.mean],
                ["std", spec.std],
                ["magnification", f"{spec.magnification}X"],
                ["preprocessing", spec.preprocessing],
            ],
        ),
        "",
        "## Output",
        "",
        f"{out.num_channels} classes ({', '.join(f'{k}={v}' for k, v in out.channel_def.items())}),"
        f" {out.activation}; {out.decision}.",
        "",
        "## Decision threshold",
        "",
        _threshold_text(card.threshold),
        "",
        "## Training data",
        "",
        f"Manifest (data version) `{data.manifest_version or NOT_RECORDED}` from "
        f"{_e(data.manifest_source or NOT_RECORDED)}; synthetic: "
        f"{NOT_RECORDED if data.synthetic is None else ('yes' if data.synthetic else 'no')}.",
        f"Split `{data.split_scheme}` (grouped by {_e(data.group_by)}, seed {_e(data.split_seed)}"
        f", fractions {_e(data.fractions)}{_fold_text(data)}), hash `{data.split_hash or NOT_RECORDED}`.",
        "",
        *_table(
            [
                "split",
                "patients",
                "images",
                "benign patients",
                "benign images",
                "malignant patients",
                "malignant images",
            ],
            [
                [
                    name,
                    c.patients,
                    c.images,
                    c.benign.patients,
                    c.benign.images,
                    c.malignant.patients,
                    c.malignant.images,
                ]
                for name, c in _ordered(data.counts)
            ],
        ),
        "",
        "## Test metrics",
        "",
        *_markdown_metrics(card.metrics),
        "## Limitations",
        "",
        *[f"- {_e(item)}" for item in card.limitations],
        "",
        "## Provenance",
        "",
        *_table(
            ["field", "value"],
            [
                ["run", card.run_id],
                ["best epoch", card.best_epoch],
                ["monitor", card.monitor],
                ["parameters", f"{card.parameters:,}" if card.parameters else None],
                ["finished", card.created_at],
                ["code version", card.code_version],
                ["dala / torch", f"{card.dala_version} / {card.torch_version}"],
            ],
        ),
        "",
        "## References",
        "",
        *[f"- {_e(ref)}" for ref in card.references],
        "",
        "## Changelog",
        "",
        *[f"- `{_e(version)}`: {_e(text)}" for version, text in card.changelog.items()],
        "",
    ]
    return "\n".join(lines)


def _ordered(counts: Mapping[str, SplitCount]) -> list[tuple[str, SplitCount]]:
    """Train, val, test (the JSON file keeps keys sorted), then any other split."""
    names = [n for n in SPLITS if n in counts] + sorted(set(counts) - set(SPLITS))
    return [(name, counts[name]) for name in names]


def _range(bounds: list[float]) -> str:
    return f"{bounds[0]:g} to {bounds[1]:g}"


def _threshold_text(threshold: DecisionThreshold) -> str:
    text = f"{threshold.value:.4g}, chosen on {threshold.chosen_on or NOT_RECORDED}: "
    text += _e(threshold.source)
    if threshold.gmean is not None and threshold.gmean_at_default is not None:
        text += (
            f" (validation G-mean {threshold.gmean:.3f}, {threshold.gmean_at_default:.3f} at 0.5)"
        )
    return text + ". Serving calls an image malignant at this threshold unless told otherwise."


def _markdown_metrics(metrics: TestMetrics | None) -> list[str]:
    if metrics is None:
        return [NOT_RECORDED, ""]
    lines = [f"At threshold {metrics.threshold:.4g}. {metrics.note}", ""]
    image = [[k, metrics.image[k]] for k in CARD_METRICS if k in metrics.image]
    lines += _table(["metric", "images"], image)
    if metrics.patient:
        patient = [[k, metrics.patient[k]] for k in CARD_PATIENT_METRICS if k in metrics.patient]
        lines += ["", *_table(["metric", "patients"], patient)]
    if metrics.intervals:
        lines += [
            "",
            *_table(
                ["metric", "scope", "resampled", "units", "level", "low", "high", "optimistic"],
                [
                    [r.metric, r.scope, r.unit, r.n_units, r.level, r.low, r.high, r.optimistic]
                    for r in metrics.intervals
                ],
            ),
        ]
    return [*lines, ""]


def _markdown_not_recorded(checkpoint: Mapping[str, Any]) -> str:
    card = checkpoint.get("card") or {}
    rows = [
        ["model", checkpoint.get("model")],
        ["magnification", card.get("magnification")],
        ["model version (weights SHA-256)", checkpoint.get("weights_sha256")],
        ["input size", checkpoint.get("input_size")],
        ["normalisation preset", checkpoint.get("preset")],
        ["decision threshold", card.get("threshold")],
        ["run", card.get("run_id")],
        ["data version", card.get("data_version")],
    ]
    return "\n".join(
        [
            f"# Model card: {_e(checkpoint.get('model') or 'model')}",
            "",
            f"Model card: {NOT_RECORDED}. This checkpoint was saved before model cards "
            f"({SCHEMA_VERSION}); retrain it to record intended use, training data, metrics "
            "and limitations. What its config says:",
            "",
            *_table(["field", "value"], rows),
            "",
            "## Intended use",
            "",
            INTENDED_USE,
            "",
        ]
    )


def summary_lines(card: ModelCard | None) -> list[str]:
    """The card in a few lines, for ``dala models current``."""
    if card is None:
        return [f"model card: {NOT_RECORDED} (checkpoint saved before {SCHEMA_VERSION})"]
    spec = card.network_data_format.inputs["image"]
    data = card.training_data
    split_text = ", ".join(
        f"{name} {c.patients}p/{c.images}i (benign {c.benign.patients}p/{c.benign.images}i, "
        f"malignant {c.malignant.patients}p/{c.malignant.images}i)"
        for name, c in _ordered(data.counts)
    )
    lines = [
        f"model card ({card.schema_version}): {card.intended_use.split('.')[0]}",
        f"  input: {spec.num_channels}x{'x'.join(str(n) for n in spec.spatial_shape)} "
        f"{spec.channel_order}, {spec.source_dtype} {spec.source_value_range[0]:g}-"
        f"{spec.source_value_range[1]:g} -> preset {spec.preset} (mean {spec.mean}, std {spec.std}) "
        f"at {spec.magnification}X",
        "  output: softmax over benign=0, malignant=1; malignant when p >= "
        f"{card.threshold.value:.4g} (chosen on {card.threshold.chosen_on or NOT_RECORDED}: "
        f"{card.threshold.source})",
        f"  data: manifest {data.manifest_version or NOT_RECORDED}, split {data.split_scheme} "
        f"{data.split_hash or NOT_RECORDED}{_fold_text(data)}: {split_text}",
    ]
    if card.metrics is None:
        lines.append(f"  test: {NOT_RECORDED}")
    else:
        lines.append("  test: " + _metric_text(card.metrics))
    lines.append("  limitations:")
    lines += [f"    - {item}" for item in card.limitations]
    return lines


def _metric_text(metrics: TestMetrics) -> str:
    by_patient = {
        r.metric: r for r in metrics.intervals if r.scope == "image" and r.unit == "patient"
    }
    parts = []
    for name in ("accuracy", "gmean", "sensitivity", "specificity", "roc_auc"):
        value = metrics.image.get(name)
        if value is None:
            continue
        ci = by_patient.get(name)
        interval = f" [{ci.low:.3f}, {ci.high:.3f}]" if ci else ""
        parts.append(f"{name} {value:.3f}{interval}")
    level = next(iter(by_patient.values())).level if by_patient else None
    tail = f" ({level:.0%} intervals resampled by patient)" if level is not None else ""
    n = metrics.image.get("n")
    return f"at {metrics.threshold:.4g}, n={n}: " + ", ".join(parts) + tail


def card_json(card: ModelCard | None) -> dict[str, Any] | None:
    """The raw block, as JSON-ready data (None when not recorded)."""
    return None if card is None else json.loads(card.model_dump_json())
