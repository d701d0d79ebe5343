"""The report as a list of blocks, built per section: one per (split scheme, setting).

Blocks and ``Section`` live in ``blocks``; this module lays out the document and builds the
sections that restate the paper (Tables 6 and 7, patient level, confusion matrices, ROC and
training curves, intervals) and the runs table. The sections the paper does not have (the
setting, k-fold pooling, threshold and calibration, subtypes) come from ``evaluation``, the
reporting checklist from ``checklist``.

The paper's Table 6 compares on an image-level split that leaks patients between train and
test; the report therefore names the split scheme of every table and warns under ``paper``.
Only runs with one ``config_hash`` are averaged (see ``aggregate``); a scheme with several
settings gets one section per setting, so unlike runs never share a mean or a table.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from dala_model import storage
from dala_model.layout import RootLayout
from dala_model.paper import (
    PAPER_ASSUMPTIONS,
    PAPER_CITATION,
    PAPER_EPOCHS,
    PAPER_HARDWARE,
)
from dala_model.report import evaluation
from dala_model.report import figures as fig
from dala_model.report.aggregate import model_order, sections
from dala_model.report.blocks import (
    Block,
    Bullets,
    Heading,
    Image,
    Section,
    Table,
    Text,
    figure_files,
)
from dala_model.report.checklist import checklist_blocks
from dala_model.report.collect import CI_METRICS, Run
from dala_model.report.gallery import gallery_blocks
from dala_model.report.tables import (
    MISSING,
    find_interval,
    fmt,
    fmt_interval,
    fmt_stat,
    mag_label,
    row_label,
    table6,
    table7,
)

__all__ = ["Block", "Bullets", "Heading", "Image", "Table", "Text", "document", "figure_files"]
LEAKY_SCHEME = "paper"


def document(
    root: str,
    runs: list[Run],
    incomplete: list[dict[str, Any]],
    problems: list[str],
    groups: list[dict[str, Any]],
) -> list[Block]:
    """The whole report: a header, one section per split scheme, the runs, the definitions."""
    schemes = sorted({g["scheme"] for g in groups})
    blocks: list[Block] = [
        Heading(1, "DALAResNet50 on BreakHis: run report"),
        Text(
            f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} from `{storage.redact(root)}`: "
            f"{len(runs)} complete runs, {len(incomplete)} incomplete. Split schemes: "
            + (", ".join(f"`{s}`" for s in schemes) or "none")
            + f". Published numbers are from {PAPER_CITATION}."
        ),
    ]
    blocks += _profile(root)
    if not groups:
        blocks.append(
            Text("No complete runs yet, so there are no tables or figures.", warning=True)
        )
    blocks += [block for section in _sections(groups, runs) for block in _section(section)]
    blocks += gallery_blocks(root, runs)
    blocks += _runs_section(runs, incomplete, problems)
    blocks += checklist_blocks(root, runs, groups)
    blocks += _notes(runs)
    if groups:  # what the paper leaves unsaid matters where its numbers are shown
        blocks += [
            Heading(2, "Notes: what the paper does not say, and what we assume"),
            Bullets(list(PAPER_ASSUMPTIONS)),
        ]
    return blocks


def _profile(root: str) -> list[Block]:
    """The header line naming the profile that made the root (``flows.main``), when one did.

    A quick demo's numbers come from minutes of CPU training on small synthetic images; saying
    so where the numbers start keeps them from being read as the model's."""
    uri = RootLayout(root).profile()
    if not storage.exists(uri):
        return []
    try:
        record = json.loads(storage.read_bytes(uri))
        text = (
            f"Profile `{record['profile']}`: {record['description']}. Data: {record['data']}; "
            f"{record['image_size']} px, {record['epochs']} epochs, batch {record['batch_size']}, "
            f"lr {record['lr']:g}, protocol `{record['protocol']}`."
        )
    except (ValueError, KeyError, TypeError) as exc:
        return [Text(f"{storage.redact(uri)} is unreadable ({exc}): the profile is not known.")]
    return [Text(text, warning=record["profile"] != "paper")]


def _sections(groups: list[dict[str, Any]], runs: list[Run]) -> list[Section]:
    """One Section per (scheme, setting); tagged with the setting hash where a scheme has two."""
    keys = sections(groups)
    settings_per_scheme = {scheme: sum(1 for k in keys if k[0] == scheme) for scheme, _ in keys}
    return [
        Section.of(
            scheme,
            setting,
            setting if settings_per_scheme[scheme] > 1 else "",
            [g for g in groups if (g["scheme"], g["setting_hash"]) == (scheme, setting)],
            [r for r in runs if (r.key[0], r.setting_hash) == (scheme, setting)],
        )
        for scheme, setting in keys
    ]


# ---------------------------------------------------------------- one (scheme, setting)


def _section(s: Section) -> list[Block]:
    setting = f", setting `{s.setting_hash}`" if s.tag else ""
    return [
        Heading(2, f"Split scheme `{s.name}`{setting}"),
        _caveat(s.name),
        *evaluation.setting_blocks(s),
        *_table6_blocks(s),
        *_table7_blocks(s),
        *evaluation.kfold_blocks(s),
        *_patient_blocks(s),
        *evaluation.threshold_blocks(s),
        *evaluation.subtype_blocks(s),
        *_confusion_blocks(s),
        *_roc_blocks(s),
        *_curve_blocks(s),
        *_ci_blocks(s),
    ]


def _caveat(scheme: str) -> Text:
    if scheme == LEAKY_SCHEME:
        return Text(
            "The `paper` scheme splits images, not patients, as the paper did: images of one "
            "patient fall into both training and test sets, which inflates test accuracy "
            "(Bussola et al., arXiv:1909.06539). Use it only to compare with the paper; "
            "patient-disjoint studies report roughly 0.85-0.93 accuracy.",
            warning=True,
        )
    return Text(
        f"The `{scheme}` scheme keeps every patient's images in one split, so the test set "
        "holds only unseen patients. The paper's numbers come from an image-level split "
        "(patients leak between train and test) and are not directly comparable."
    )


def _table6_blocks(s: Section) -> list[Block]:
    header, rows = table6(s.rows, s.mags, s.cell)
    title = f"Table 6 layout, scheme {s.title}: ours mean ± std over runs (paper)"
    return [
        Heading(3, "Test metrics in the paper's Table 6 layout"),
        Text(
            "Each cell: our mean ± standard deviation across the seeds/folds named in the last "
            "column (runs of one config only), at threshold 0.5, the paper's published value in "
            "parentheses. F1 is minority-class / weighted; IBA is imbalanced-learn's default "
            "(macro) form, alpha 0.1, which equals G-mean on two classes, as the paper's does."
        ),
        Table(header, rows),
        s.image("table6", fig.table_figure(title, header, rows), "Table 6 layout"),
    ]


def _table7_blocks(s: Section) -> list[Block]:
    header, rows = table7(s.rows, s.mags, s.cell)
    title = f"Table 7 layout, scheme {s.title}: parameters and training time, ours (paper)"
    return [
        Heading(3, "Parameters and convergence time (Table 7 layout)"),
        Text(
            f"Paper: {PAPER_EPOCHS} epochs on one {PAPER_HARDWARE}. Ours: total training "
            "seconds of each run (mean ± std), for the epochs shown, on this project's hardware."
        ),
        Table(header, rows),
        s.image("table7", fig.table_figure(title, header, rows), "Table 7 layout"),
    ]


def _patient_blocks(s: Section) -> list[Block]:
    groups = [g for g in s.groups if g["patient"]]
    if not groups:
        return []
    return [
        Heading(3, "Patient-level metrics"),
        Text(
            "A patient's images vote through their mean malignant probability "
            "(threshold 0.5). Patients, not images, are the independent unit."
        ),
        Table(*_patient_table(groups)),
        s.image("patient", fig.patient_figure(groups), "Image vs patient level"),
    ]


def _confusion_blocks(s: Section) -> list[Block]:
    return [
        Heading(3, "Confusion matrices (summed over runs)"),
        s.image("confusion", fig.confusion_figure(s.rows, s.cell), "Confusion matrices"),
    ]


def _roc_blocks(s: Section) -> list[Block]:
    runs = [r for r in s.runs if r.predictions is not None]
    if not runs:
        return []
    return [
        Heading(3, "ROC curves (one line per run)"),
        s.image("roc", fig.roc_figure(s.rows, runs, s.cell), "ROC curves"),
    ]


def _curve_blocks(s: Section) -> list[Block]:
    images: list[Block] = []
    for mag in s.mags:
        runs = [r for r in s.runs if r.key[2] == mag and r.history is not None and len(r.history)]
        if runs:
            label = mag_label(mag)
            figure = fig.curves_figure(mag, s.rows, runs)
            images.append(s.image("curves", figure, f"Training curves {label}", f"_{label}"))
    if not images:
        return []
    return [Heading(3, "Training and validation curves (mean ± std across runs)"), *images]


def _ci_blocks(s: Section) -> list[Block]:
    runs = [r for r in s.runs if r.test.get("ci") or r.test.get("intervals")]
    if not runs:
        return []
    return [
        Heading(3, "95% bootstrap confidence intervals per run"),
        Text(
            "Percentile bootstrap (1000 resamples) of the image-level metrics, two ways. Filled: "
            "resampling patients (a cluster bootstrap stratified by class, each patient with all "
            "of their images): the interval to trust. Hollow: resampling images, which counts "
            "correlated images of one patient as independent draws, so it is optimistic (too "
            "narrow). The runs table names the number of patients and images. Crosses mark the "
            "paper's value."
        ),
        s.image("ci", fig.ci_figure(s.rows, runs), "Bootstrap CIs"),
    ]


def _patient_table(groups: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = [
        "Model",
        "Magnification",
        "Runs",
        "Patients",
        "Image accuracy",
        "Patient accuracy",
        "Image G-mean",
        "Patient G-mean",
        "Patient sensitivity",
        "Patient specificity",
        "Patient ROC-AUC",
    ]
    rows = []
    for g in groups:
        p, t = g["patient"], g["test"]
        rows.append(
            [
                row_label((g["model"], g["model_options"])),
                mag_label(g["magnification"]),
                str(g["n_runs"]),
                fmt_stat(p.get("n_patients"), 0),
                fmt_stat(t.get("accuracy")),
                fmt_stat(p.get("accuracy")),
                fmt_stat(t.get("gmean")),
                fmt_stat(p.get("gmean")),
                fmt_stat(p.get("sensitivity")),
                fmt_stat(p.get("specificity")),
                fmt_stat(p.get("roc_auc")),
            ]
        )
    return header, rows


# ---------------------------------------------------------------- runs and definitions


def _plain(value: Any) -> str:
    return MISSING if value is None else str(value)


def _runs_section(
    runs: list[Run], incomplete: list[dict[str, Any]], problems: list[str]
) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Runs")]
    if runs:
        header = [
            "Run",
            "Model",
            "Mag.",
            "Scheme",
            "Config",
            "Fold",
            "Seed",
            "Best epoch",
            "Train s",
            "Threshold",
        ]
        for _, label in CI_METRICS:
            header += [label, f"{label} 95% CI by patient", f"{label} 95% CI by image"]
        header += ["Patient accuracy", "Patient accuracy 95% CI"]
        ordered = sorted(runs, key=lambda r: (r.key[0], model_order(r.key[1]), r.key[2], r.run_id))
        blocks += [
            Text(
                "Every interval names what it resamples and how many: by patient (class-"
                "stratified cluster bootstrap, the one to trust) or by image (optimistic: "
                "correlated images of one patient counted as independent). Config is the run's "
                "`config_hash`; only runs with one config are averaged. Threshold is the "
                "validation-chosen operating threshold (a dash: chosen before runs recorded it, "
                "0.5 used)."
            ),
            Table(header, [_run_cells(run) for run in ordered]),
        ]
    if incomplete:
        blocks += [
            Heading(3, "Incomplete runs (not in the tables)"),
            Table(
                ["Run", "Status", "Model", "Mag.", "Scheme", "Fold", "Seed"],
                [
                    [f"`{r['run_id']}`", r["status"]]
                    + [_plain(r[k]) for k in ("model", "magnification", "scheme", "fold", "seed")]
                    for r in incomplete
                ],
            ),
        ]
    if problems:
        blocks += [Heading(3, "Problems"), Bullets(problems)]
    return blocks


def _run_cells(run: Run) -> list[str]:
    """One run's row: identity, config, best epoch, seconds, threshold, metrics with intervals."""
    s, image = run.summary, run.test["image"]
    row = [
        f"`{run.run_id}`",
        row_label(run.row),
        mag_label(run.key[2]),
        run.key[0],
        f"`{run.config_hash}`",
        _plain(s.get("fold")),
        _plain(s.get("seed")),
        _plain(s.get("best_epoch")),
        fmt(s.get("train_seconds"), 1),
        fmt((s.get("threshold") or {}).get("threshold")),
    ]
    for key, _ in CI_METRICS:
        row += [
            fmt(image.get(key)),
            fmt_interval(find_interval(run.test, key, "patient")),
            fmt_interval(find_interval(run.test, key, "image")),
        ]
    patient = run.test.get("patient") or {}
    row += [
        fmt(patient.get("accuracy")),
        fmt_interval(find_interval(run.test, "accuracy", "patient", scope="patient")),
    ]
    return row


def _notes(runs: list[Run]) -> list[Block]:
    filled = sum(1 for r in runs if "iba_macro" in r.filled)
    old = (
        f" {filled} of these runs predate `iba_macro`: their IBA cells show their G-mean, "
        "identical by definition for two classes."
        if filled
        else ""
    )
    return [
        Heading(2, "Definitions"),
        Bullets(
            [
                "Labels: 0 = benign, 1 = malignant; malignant is the positive class (sensitivity = "
                "malignant recall, specificity = benign recall).",
                "F1 minority: F1 of the class with fewer test images (benign in BreakHis).",
                "G-mean: imbalanced-learn `geometric_mean_score`, sqrt(sensitivity x specificity).",
                "IBA: imbalanced-learn `make_index_balanced_accuracy(alpha=0.1)` applied to "
                "G-mean. The tables show `iba_macro`, the library's default (macro) averaging: "
                "on two classes the dominance term averages to 0, so it equals G-mean, and the "
                "paper's IBA equals its G-mean within 0.002 in all 36 published cells, so this "
                "is the form the paper reports. metrics.json also holds the binary forms, "
                "(1 + 0.1 (sensitivity - specificity)) x G-mean^k: `iba` (k = 2, García's "
                "definition) and `iba_unsquared` (k = 1)." + old,
                "Mean ± std: sample standard deviation (ddof=1) across the seeds/folds of one "
                "config (`config_hash`: the full training config minus seed and fold, plus the "
                "split grouping); a single run shows no std. Runs of different configs are never "
                "averaged; each (scheme, setting) has its own section.",
                "95% intervals: percentile bootstrap, 1000 resamples. 'By patient': patients "
                "resampled with replacement within each class, with all their images (a cluster "
                "bootstrap); 'by image': images resampled, optimistic because images of one "
                "patient are correlated.",
                "Operating threshold: chosen on the validation images to maximise G-mean, ties "
                "to the threshold closest to 0.5; test metrics are shown at 0.5 and at it.",
                "Brier score: mean squared difference between P(malignant) and the label. ECE: "
                "expected calibration error over 10 equal-width probability bins, weighted by "
                "the share of images in each bin.",
            ]
        ),
    ]
