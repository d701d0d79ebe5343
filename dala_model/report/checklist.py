"""A reporting checklist after TRIPOD+AI and CLAIM: what a reader needs to judge the numbers.

TRIPOD+AI (Collins et al., BMJ 2024) and CLAIM (Mongan et al., Radiology: AI 2020, updated 2024)
ask a prediction-model report to state its data source and setting, the participants per split
and outcome, how the split was made, the operating threshold, calibration, how uncertainty was
estimated and the intended use. This section answers those items from what the run folders and
the storage root hold: the manifest (``ROOT/manifests``), the split files (``ROOT/splits``, via
``dala_model.data.splits.split_report`` and ``split_identity``) and the runs' summaries. What
the root cannot tell (no manifest, no split file, runs from before a key was recorded) is said,
not guessed. BreakHis comes from one centre, so no number here says how a model fares on
another laboratory's slides: the checklist says that too.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from dala_model import storage
from dala_model.data.manifest import read_manifest
from dala_model.data.splits import SPLITS, split_identity, split_report
from dala_model.report.blocks import Block, Heading, Table, Text
from dala_model.report.collect import Run
from dala_model.report.tables import mag_label

log = logging.getLogger(__name__)

INTENDED_USE = "Research use, not for diagnosis."
DATA_SOURCE = (
    "BreakHis v1 (Spanhol et al., IEEE TBME 2016): 7,909 H&E images at 40X, 100X, 200X and "
    "400X from 82 slide folders (the archive's 'patients'; fewer cases), all from one centre, the P&D Laboratory (Pathological Anatomy and "
    "Cytopathology), Brazil. Single centre: one laboratory's staining, scanner and patients, "
    "and no external validation here, so nothing in this report says how a model performs on "
    "another centre's slides."
)
_GROUPING = {
    "patient": "patient = BreakHis case (lettered slides of one case, e.g. 14-22549AB/CD/G, "
    "are one patient); every patient is in one split at every magnification",
    "slide": "slide folder (reproduces folder-level splits; two slides of one case may "
    "straddle splits)",
    "image": "image (the paper's protocol: patients leak between train and test)",
}
_NOT_RECORDED = "not recorded by these runs"


def checklist_blocks(root: str, runs: list[Run], groups: list[dict[str, Any]]) -> list[Block]:
    """The checklist table, then per split scheme its patients and images per split and class."""
    if not runs:
        return []
    schemes = sorted({r.key[0] for r in runs})
    files = {scheme: _split_file(root, scheme) for scheme in schemes}
    rows = [
        ["Intended use", INTENDED_USE],
        ["Data source", DATA_SOURCE + _manifest_source(root)],
        ["Data version (manifest hash)", _codes({r.summary.get("data_version") for r in runs})],
        *[["Grouping unit, " + f"`{s}`", _grouping(s, runs, files[s])] for s in schemes],
        *[["Split, " + f"`{s}`", _split_text(s, runs, files[s])] for s in schemes],
        ["Operating threshold", _thresholds(runs)],
        ["Calibration", _calibration(runs)],
        [
            "Uncertainty",
            "95% percentile bootstrap intervals resampling patients (class-stratified cluster "
            "bootstrap; the number of patients is named) beside image-resampled ones, labelled "
            "optimistic; k-fold sweeps add a patient-pooled interval.",
        ],
        [
            "Comparison with the paper",
            "The paper's Table 6 comes from an image-level split (patients leak); its numbers "
            "are shown beside ours for scale, not as a like-for-like comparison.",
        ],
    ]
    blocks: list[Block] = [
        Heading(2, "Reporting checklist (after TRIPOD+AI and CLAIM)"),
        Text(
            "The items of TRIPOD+AI and CLAIM a run report can answer, from the manifest, the "
            "split files and the runs under this root."
        ),
        Table(["Item", "This report"], rows),
    ]
    for scheme in schemes:
        blocks += _counts_blocks(root, scheme, files[scheme])
    return blocks


def _codes(values: set[Any]) -> str:
    known = sorted(str(v) for v in values if v)
    return ", ".join(f"`{v}`" for v in known) or _NOT_RECORDED


def _manifest_source(root: str) -> str:
    try:
        attrs = read_manifest(root).attrs
    except FileNotFoundError:
        return " No manifest under this root, so where it was ingested from is not known here."
    except ValueError as exc:
        return f" The manifest under this root cannot be read: {exc}"
    source = attrs.get("dala.source")
    return f" Ingested from `{source}`." if source else ""


def _split_file(root: str, scheme: str) -> dict[str, Any] | None:
    """The identity of the split file now under ``root``, or None when there is none."""
    try:
        return split_identity(root, scheme)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        log.info("report checklist: no split identity for %s: %s", scheme, exc)
        return None


def _grouping(scheme: str, runs: list[Run], file: dict[str, Any] | None) -> str:
    recorded = {r.group_by for r in runs if r.key[0] == scheme} - {None}
    if not recorded and file:
        recorded = {file["group_by"]}
    if not recorded:
        return _NOT_RECORDED
    return "; ".join(_GROUPING.get(str(g), str(g)) for g in sorted(recorded))


def _split_text(scheme: str, runs: list[Run], file: dict[str, Any] | None) -> str:
    recorded = {r.split.get("hash") for r in runs if r.key[0] == scheme} - {None}
    parts = [
        f"runs trained on split hash {_codes(recorded)}"
        if recorded
        else "the runs did not record their split's hash"
    ]
    if file is None:
        parts.append("no split file under this root")
    else:
        parts.append(
            f"split file now: hash `{file['hash']}`, seed {file['seed']}, fractions "
            f"{file['fractions']}, folds {file['folds']}"
        )
        if recorded and file["hash"] not in recorded:
            parts.append(
                "the split file has changed since these runs trained: its counts below are not "
                "the runs' split"
            )
    return "; ".join(parts)


def _thresholds(runs: list[Run]) -> str:
    values = [(r.summary.get("threshold") or {}).get("threshold") for r in runs]
    chosen = [float(v) for v in values if v is not None]
    if not chosen:
        return "0.5 (these runs predate the validation-chosen threshold)"
    return (
        f"chosen on validation per run (max G-mean, ties to 0.5): {len(chosen)} of {len(runs)} "
        f"runs, {min(chosen):.3f} to {max(chosen):.3f}; test metrics shown at 0.5 and at it"
    )


def _calibration(runs: list[Run]) -> str:
    n = sum(1 for r in runs if r.metrics.get("calibration"))
    if not n:
        return _NOT_RECORDED
    return (
        f"Brier score, ECE (10 bins) and reliability diagrams on the test set for {n} of "
        f"{len(runs)} runs (section 'Operating threshold and calibration')"
    )


def _counts_blocks(root: str, scheme: str, file: dict[str, Any] | None) -> list[Block]:
    """Patients (cases), slides and images per split, magnification and class of one scheme."""
    heading = Heading(3, f"Patients and images per split and class, scheme `{scheme}`")
    if file is None:
        return [heading, Text(f"No `{scheme}` split file under this root: counts not available.")]
    try:
        table = split_report(root, scheme)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        return [heading, Text(f"Counts not available: {storage.redact(str(exc))}")]
    return [
        heading,
        Text(
            "Each cell: patients (cases) / slides / images, from the split file and manifest "
            "now under this root."
        ),
        Table(*_counts_table(table)),
    ]


def _counts_table(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    names = list(table.index.names)
    header = [{"fold": "Fold", "magnification": "Mag.", "label": "Class"}[n] for n in names]
    header += [f"{split}: patients / slides / images" for split in SPLITS]
    rows = []
    for index, row in table.iterrows():
        keys = dict(zip(names, index if isinstance(index, tuple) else (index,), strict=True))
        cells = [
            mag_label(int(value)) if name == "magnification" else str(value)
            for name, value in keys.items()
        ]
        cells += [
            f"{row[('patients', s)]} / {row[('slides', s)]} / {row[('images', s)]}" for s in SPLITS
        ]
        rows.append(cells)
    return header, rows
