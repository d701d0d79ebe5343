"""The report sections the paper has no counterpart for: what was held fixed, and what it hides.

* ``setting_blocks``: the setting that defines a section (epochs, lr, batch, image size,
  pretrained weights, imbalance handling, monitor, BatchNorm recalibration, preset, the split's
  grouping and hash), so a reader knows what its rows share and what was never averaged.
* ``kfold_blocks``: a ``patient-kfold`` sweep as mean ± std across folds beside the folds'
  pooled test set (every patient once) and its patient-resampled interval (``pooled``).
* ``threshold_blocks``: the validation-chosen operating threshold, test metrics at 0.5 and at
  it, Brier score, ECE and a reliability diagram. A model can rank well and still call one
  class at 0.5; the threshold answers that, calibration says whether its probabilities mean
  what they say (``dala_model.calibration``).
* ``subtype_blocks``: recall per histological subtype and magnification, since errors
  concentrate in a few subtypes (fibroadenoma vs phyllodes, lobular carcinoma) that a class
  recall averages away.

Runs written before these keys existed have none of them: their rows show a dash, and a section
none of whose runs has the data is left out.
"""

from __future__ import annotations

from typing import Any

from dala_model.data.breakhis import SUBTYPES
from dala_model.report import figures as fig
from dala_model.report.blocks import Block, Heading, Section, Table, Text
from dala_model.report.tables import (
    MISSING,
    find_interval,
    fmt,
    fmt_interval,
    fmt_stat,
    mag_label,
    row_label,
)

# The setting fields as the section's table names them (keys of aggregate.setting_of).
_SETTING_LABELS = (
    ("epochs", "Epochs"),
    ("lr", "Learning rate"),
    ("batch_size", "Batch size"),
    ("image_size", "Image size (px)"),
    ("pretrained", "Pretrained weights"),
    ("imbalance", "Imbalance handling"),
    ("monitor", "Best-epoch monitor"),
    ("recalibrate_bn", "BatchNorm recalibration"),
    ("preset", "Normalisation preset"),
    ("weight_decay", "Weight decay"),
    ("rotation_degrees", "Rotation (degrees)"),
    ("split_group_by", "Split grouping"),
)
_NOT_RECORDED = "not recorded"
# The eight BreakHis subtypes, benign first, as the manifest names them.
SUBTYPE_ORDER = tuple((name, label) for label, name in SUBTYPES.values())


def _value(value: Any) -> str:
    return _NOT_RECORDED if value is None else f"`{value}`"


def setting_blocks(s: Section) -> list[Block]:
    """The setting this section's rows share, its split hash(es), and how many runs it holds."""
    setting = s.groups[0]["setting"]
    hashes = sorted({h for g in s.groups for h in g["split_hashes"]})
    rows = [[label, _value(setting.get(key))] for key, label in _SETTING_LABELS]
    rows += [
        ["Split hash", ", ".join(f"`{h}`" for h in hashes) or _NOT_RECORDED],
        ["Setting hash", f"`{s.setting_hash}`"],
        ["Runs (configs)", f"{len(s.runs)} ({len(s.groups)})"],
    ]
    blocks: list[Block] = [
        Heading(3, "Setting"),
        Text(
            "Every run in this section was trained with these values (the setting hash covers "
            "the whole training config except model, model options, magnification, seed and "
            "fold, plus the split's grouping); 'not recorded' marks a field older runs did not "
            "store. Each row of the tables below averages only runs of one config."
        ),
        Table(["Field", "Value"], rows),
    ]
    if len(hashes) > 1:
        blocks.append(
            Text(
                f"The runs of this section were trained on {len(hashes)} different splits "
                "(split hashes above): their spread includes the split's, not only the seed's.",
                warning=True,
            )
        )
    return blocks


def _stat_interval(pooled: dict[str, Any], metric: str) -> str:
    value = fmt(pooled["image"].get(metric))
    return f"{value} {fmt_interval(find_interval(pooled, metric, 'patient'))}"


def kfold_blocks(s: Section) -> list[Block]:
    """Mean ± std across folds beside the folds' pooled test set and its patient interval."""
    groups = [g for g in s.groups if g["pooled"]]
    if not groups:
        return []
    header = ["Model", "Mag.", "Seed", "Folds", "Patients", "Images"]
    for label in ("Accuracy", "G-mean"):
        header += [f"{label} mean ± std across folds", f"{label} pooled [95% CI by patient]"]
    header += ["Sensitivity pooled", "Specificity pooled"]
    rows, warnings = [], []
    for g in groups:
        for p in g["pooled"]:
            rows.append(
                [
                    row_label((g["model"], g["model_options"])),
                    mag_label(g["magnification"]),
                    str(p["seed"]),
                    ", ".join(str(f) for f in p["folds"]),
                    str(p["n_patients"]),
                    str(p["n_images"]),
                    fmt_stat(g["test"].get("accuracy")),
                    _stat_interval(p, "accuracy"),
                    fmt_stat(g["test"].get("gmean")),
                    _stat_interval(p, "gmean"),
                    fmt(p["image"].get("sensitivity")),
                    fmt(p["image"].get("specificity")),
                ]
            )
            where = f"{row_label((g['model'], g['model_options']))} {mag_label(g['magnification'])}"
            if p["patients_tested_more_than_once"]:
                warnings.append(
                    f"{where}, seed {p['seed']}: {p['patients_tested_more_than_once']} patients "
                    "are in the test folds of two runs, so these folds come from different "
                    "splits and the pooled set is not one patient-disjoint test set."
                )
            if p["folds_expected"] and len(p["folds"]) < p["folds_expected"]:
                warnings.append(
                    f"{where}, seed {p['seed']}: {len(p['folds'])} of {p['folds_expected']} "
                    "folds are complete; the pooled set covers only their patients."
                )
    return [
        Heading(3, "k-fold sweep: across folds and pooled"),
        Text(
            "Mean ± std across folds says how much folds differ. Each patient is tested in "
            "exactly one fold, so the folds' test predictions pooled (threshold 0.5) are one "
            "test set of every patient; its interval resamples patients (class-stratified "
            "cluster bootstrap, 1000 resamples) and names how many there are."
        ),
        Table(header, rows),
        *(Text(w, warning=True) for w in warnings),
    ]


def threshold_blocks(s: Section) -> list[Block]:
    """The operating threshold, metrics at 0.5 and at it, calibration and a reliability diagram."""
    groups = [g for g in s.groups if g["threshold"] or g["at_threshold"] or g["brier"]]
    if not groups:
        return []
    header = ["Model", "Mag.", "Runs", "Threshold (validation)"]
    metrics = (
        ("accuracy", "Accuracy"),
        ("gmean", "G-mean"),
        ("sensitivity", "Sensitivity"),
        ("specificity", "Specificity"),
    )
    for _, label in metrics:
        header += [f"{label} @0.5", f"{label} @threshold"]
    header += ["Brier", "ECE"]
    rows = []
    for g in groups:
        row = [
            row_label((g["model"], g["model_options"])),
            mag_label(g["magnification"]),
            str(g["n_runs"]),
            fmt_stat(g["threshold"]),
        ]
        for key, _ in metrics:
            row += [fmt_stat(g["test"].get(key)), fmt_stat(g["at_threshold"].get(key))]
        rows.append(row + [fmt_stat(g["brier"]), fmt_stat(g["ece"])])
    blocks: list[Block] = [
        Heading(3, "Operating threshold and calibration"),
        Text(
            "Threshold: chosen on the validation images to maximise G-mean (ties to 0.5), never "
            "on test; test metrics at 0.5 and at that threshold, mean ± std across runs. Brier "
            "score and expected calibration error (10 equal-width bins) on the test images: "
            "lower is better, 0 is perfectly calibrated."
        ),
        Table(header, rows),
    ]
    if any(g["reliability"] for g in groups):
        figure = fig.reliability_figure(s.rows, s.mags, s.cell)
        blocks.append(s.image("reliability", figure, "Reliability diagrams"))
    return blocks


def _subtype_columns(groups: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The eight BreakHis subtypes, then any other name the runs report."""
    known = {name for name, _ in SUBTYPE_ORDER}
    extra = sorted({name for g in groups for name in g["subtypes"]} - known)
    return [*SUBTYPE_ORDER, *((name, "") for name in extra)]


def _subtype_cell(row: dict[str, Any] | None) -> str:
    if row is None or not row["n"]:
        return MISSING
    return f"{fmt(row['recall'])} ({row['correct']}/{row['n']})"


def subtype_blocks(s: Section) -> list[Block]:
    """Per magnification, recall per subtype and model, pooled over the runs of each config."""
    groups = [g for g in s.groups if g["subtypes"]]
    if not groups:
        return []
    columns = _subtype_columns(groups)
    header = ["Model"] + [
        name.replace("_", " ") + (f" ({label[0].upper()})" if label else "")
        for name, label in columns
    ]
    blocks: list[Block] = [
        Heading(3, "Errors by subtype"),
        Text(
            "Recall of each histological subtype (B benign, M malignant) at the operating "
            "threshold: correct calls / test images, summed over the runs of each config. "
            "A dash: no test image of that subtype."
        ),
    ]
    for mag in s.mags:
        at_mag = [g for g in groups if g["magnification"] == mag]
        if not at_mag:
            continue
        rows = [
            [row_label((g["model"], g["model_options"]))]
            + [_subtype_cell(g["subtypes"].get(name)) for name, _ in columns]
            for g in at_mag
        ]
        blocks += [Text(f"{mag_label(mag)}:"), Table(header, rows)]
    return blocks
