"""Reports across training runs: the paper's tables with ours beside them, plus the honest numbers.

``build_report(root)`` reads every run folder under ``ROOT/runs/`` (layout in
docs/ARCHITECTURE.md) and writes, next to each other under ``ROOT/reports/``:

* ``metrics.json``: per split scheme x model x magnification, the mean and sample standard
  deviation (``ddof=1``; ``None`` for a single run) of every test metric across seeds/folds;
* ``report.md`` and ``report.html`` (self-contained: inline CSS, PNGs as base64 data URIs, so
  it opens offline and can be mailed as one file);
* the PNG figures both documents show.

The paper's Table 6 compares on an image-level split that leaks patients between train and
test; the report therefore names the split scheme of every table and warns under ``paper``.
Only runs whose ``run.json`` says ``complete`` enter the tables; the others are listed.
Figures use ``matplotlib.figure.Figure`` directly (Agg canvas), so no global pyplot state or
display backend is touched.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay, roc_curve

from dala_model import storage
from dala_model.data.breakhis import LABELS as CLASS_NAMES
from dala_model.paper import (
    MAGNIFICATIONS,
    PAPER_CITATION,
    PAPER_CONVERGENCE_SECONDS,
    PAPER_EPOCHS,
    PAPER_HARDWARE,
    PAPER_MEAN_CONVERGENCE_SECONDS,
    PAPER_NAMES,
    PAPER_PARAMS,
    PAPER_RESULTS,
    paper_name,
)
from dala_model.runs import SUMMARY, list_runs, runs_uri

log = logging.getLogger(__name__)

# The bootstrap intervals every run records (dala_model.metrics.evaluate's defaults).
CI_METRICS = (("accuracy", "Accuracy"), ("gmean", "G-mean"), ("iba_unsquared", "IBA"))
LEAKY_SCHEME = "paper"
_REQUIRED = ("model", "magnification", "scheme", "metrics")


@dataclass
class Run:
    """One complete run: its summary (``run.json``) and, when present, history and predictions."""

    run_id: str
    summary: dict[str, Any]
    history: pd.DataFrame | None
    predictions: pd.DataFrame | None

    @property
    def key(self) -> tuple[str, str, int]:
        s = self.summary
        return str(s["scheme"]), str(s["model"]), _magnification(s["magnification"])

    @property
    def test(self) -> dict[str, Any]:
        return self.summary["metrics"]["test"]


def build_report(root: str, out: str | None = None) -> dict[str, str]:
    """Write the report for every run under ``root``; return ``{file name: URL}`` of what was written."""
    out = out or storage.join(root, "reports")
    runs, incomplete, problems = _collect(root)
    groups = _aggregate(runs)
    figures: dict[str, bytes] = {}
    blocks = _document(root, runs, incomplete, problems, groups, figures)
    files = {
        "metrics.json": json.dumps(
            {
                "root": storage.redact(root),
                "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "schemes": sorted({g["scheme"] for g in groups}),
                "groups": groups,
                "runs": [_run_row(run) for run in runs],
                "incomplete": incomplete,
                "problems": problems,
            },
            indent=2,
        ).encode(),
        "report.md": _markdown(blocks).encode(),
        "report.html": _html(blocks, figures).encode(),
        **figures,
    }
    written = {}
    for name, data in files.items():
        url = storage.join(out, name)
        storage.write_bytes_atomic(url, data)
        written[name] = url
    log.info("report for %d complete runs written to %s", len(runs), storage.redact(out))
    return written


# ---------------------------------------------------------------- reading run folders


def _collect(root: str) -> tuple[list[Run], list[dict[str, Any]], list[str]]:
    """Complete runs, incomplete ones (status rows), and problems worth showing in the report."""
    try:
        folders = list_runs(root)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no runs under {storage.redact(runs_uri(root))}: train one with `dala train` first"
        ) from None
    if not folders:
        raise FileNotFoundError(
            f"{storage.redact(runs_uri(root))} holds no run folders "
            "(runs/<run_id>/run.json or config.json)"
        )
    complete, incomplete, problems = [], [], []
    for folder in folders:
        if not folder.complete:
            incomplete.append(
                _status_row(folder.run_id, folder.status, folder.summary or folder.config or {})
            )
            continue
        summary = folder.summary
        _check_summary(summary, storage.join(folder.uri, SUMMARY))
        tables = {}
        for name in ("history.parquet", "test_predictions.parquet"):
            url = storage.join(folder.uri, name)
            if storage.exists(url):
                tables[name] = storage.read_parquet(url)
            else:
                tables[name] = None
                problems.append(f"`{folder.run_id}` has no {name}; its curves or ROC are left out")
        complete.append(
            Run(
                str(summary.get("run_id", folder.run_id)),
                summary,
                tables["history.parquet"],
                tables["test_predictions.parquet"],
            )
        )
    for problem in problems:
        log.warning("report: %s", problem)
    return complete, incomplete, problems


def _check_summary(summary: dict[str, Any], url: str) -> None:
    missing = [key for key in _REQUIRED if key not in summary]
    if not missing and not isinstance(summary["metrics"].get("test", {}).get("image"), dict):
        missing = ["metrics.test.image"]
    if missing:
        raise ValueError(
            f"{storage.redact(url)} says complete but lacks {missing}; re-run that training run"
        )
    _magnification(summary["magnification"])


def _magnification(value: Any) -> int:
    """40, "40" and "40X" all name the 40X magnification."""
    try:
        return int(str(value).upper().removesuffix("X"))
    except ValueError:
        raise ValueError(
            f"unknown magnification {value!r}; expected one of {MAGNIFICATIONS}"
        ) from None


def _status_row(run_id: str, status: str, fields: dict[str, Any]) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "status": status,
        **{key: fields.get(key) for key in ("model", "magnification", "scheme", "fold", "seed")},
    }


def _run_row(run: Run) -> dict[str, Any]:
    s = run.summary
    return {
        "run_id": run.run_id,
        **{
            key: s.get(key)
            for key in (
                "model",
                "magnification",
                "scheme",
                "fold",
                "seed",
                "parameters",
                "train_seconds",
                "best_epoch",
                "epochs",
            )
        },
        "test": run.test["image"],
        "ci": run.test.get("ci"),
        "patient": run.test.get("patient"),
    }


# ---------------------------------------------------------------- aggregation


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)


def _stat(values: list[Any]) -> dict[str, Any] | None:
    """Mean and sample standard deviation of the numeric values; None when there are none."""
    numbers = [float(v) for v in values if _is_number(v)]
    if not numbers:
        return None
    std = float(np.std(numbers, ddof=1)) if len(numbers) > 1 else None
    return {"mean": float(np.mean(numbers)), "std": std, "n": len(numbers)}


def _stats(dicts: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    keys = sorted({key for d in dicts for key, value in d.items() if _is_number(value)})
    return {key: _stat([d.get(key) for d in dicts]) for key in keys}


def _model_order(model: str) -> tuple[int, str]:
    order = list(PAPER_NAMES)
    return (order.index(model) if model in order else len(order), model)


def _aggregate(runs: list[Run]) -> list[dict[str, Any]]:
    """One record per (scheme, model, magnification), ordered as the paper's tables are."""
    by_key: dict[tuple[str, str, int], list[Run]] = {}
    for run in runs:
        by_key.setdefault(run.key, []).append(run)
    groups = []
    for (scheme, model, mag), members in sorted(
        by_key.items(), key=lambda item: (item[0][0], _model_order(item[0][1]), item[0][2])
    ):
        patients = [r.test["patient"] for r in members if r.test.get("patient")]
        matrices = [
            r.test["image"]["confusion_matrix"]
            for r in members
            if "confusion_matrix" in r.test["image"]
        ]
        paper = PAPER_RESULTS.get(model, {}).get(mag)
        groups.append(
            {
                "scheme": scheme,
                "model": model,
                "magnification": mag,
                "n_runs": len(members),
                "run_ids": [r.run_id for r in members],
                "seeds": sorted({r.summary.get("seed") for r in members}, key=str),
                "folds": sorted({r.summary.get("fold") for r in members}, key=str),
                "test": _stats([r.test["image"] for r in members]),
                "patient": _stats(patients),
                "confusion_matrix": np.sum(matrices, axis=0).tolist() if matrices else None,
                "train_seconds": _stat([r.summary.get("train_seconds") for r in members]),
                "parameters": _stat([r.summary.get("parameters") for r in members]),
                "best_epoch": _stat([r.summary.get("best_epoch") for r in members]),
                "epochs": sorted({r.summary.get("epochs") for r in members}, key=str),
                "paper": {
                    **(
                        {}
                        if paper is None
                        else {k: v for k, v in vars(paper).items() if v is not None}
                    ),
                    "parameters": PAPER_PARAMS.get(model),
                    "convergence_seconds": PAPER_CONVERGENCE_SECONDS.get(model, {}).get(mag),
                },
            }
        )
    return groups


# ---------------------------------------------------------------- document model


@dataclass(frozen=True)
class _Heading:
    level: int
    text: str


@dataclass(frozen=True)
class _Text:
    text: str
    warning: bool = False


@dataclass(frozen=True)
class _Table:
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class _Image:
    name: str
    caption: str


@dataclass(frozen=True)
class _List:
    items: list[str]


_Block = _Heading | _Text | _Table | _Image | _List


def _fmt(stat: dict[str, Any] | None, digits: int = 3) -> str:
    if stat is None:
        return "—"
    if stat["std"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _plain(value: Any) -> str:
    return "—" if value is None else str(value)


def _with_paper(ours: str, paper: str | None) -> str:
    return ours if paper is None else f"{ours} (paper {paper})"


def _mag_label(mag: int) -> str:
    return f"{mag}X"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text)


def _document(
    root: str,
    runs: list[Run],
    incomplete: list[dict[str, Any]],
    problems: list[str],
    groups: list[dict[str, Any]],
    figures: dict[str, bytes],
) -> list[_Block]:
    """The report as blocks; figures are rendered into ``figures`` as their blocks are added."""
    schemes = sorted({g["scheme"] for g in groups})
    blocks: list[_Block] = [
        _Heading(1, "DALAResNet50 on BreakHis: run report"),
        _Text(
            f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} from `{storage.redact(root)}`: "
            f"{len(runs)} complete runs, {len(incomplete)} incomplete. Split schemes: "
            + (", ".join(f"`{s}`" for s in schemes) or "none")
            + f". Published numbers are from {PAPER_CITATION}."
        ),
    ]
    if not groups:
        blocks.append(
            _Text("No complete runs yet, so there are no tables or figures.", warning=True)
        )
    for scheme in schemes:
        members = [g for g in groups if g["scheme"] == scheme]
        scheme_runs = [r for r in runs if r.key[0] == scheme]
        blocks += _scheme_section(scheme, members, scheme_runs, figures)
    blocks += _runs_section(runs, incomplete, problems)
    blocks += _notes()
    return blocks


def _scheme_section(
    scheme: str, groups: list[dict[str, Any]], runs: list[Run], figures: dict[str, bytes]
) -> list[_Block]:
    slug = _slug(scheme)
    blocks: list[_Block] = [_Heading(2, f"Split scheme `{scheme}`")]
    if scheme == LEAKY_SCHEME:
        blocks.append(
            _Text(
                "The `paper` scheme splits images, not patients, as the paper did: images of one "
                "patient fall into both training and test sets, which inflates test accuracy "
                "(Bussola et al., arXiv:1909.06539). Use it only to compare with the paper; "
                "patient-disjoint studies report roughly 0.85-0.93 accuracy.",
                warning=True,
            )
        )
    else:
        blocks.append(
            _Text(
                f"The `{scheme}` scheme keeps every patient's images in one split, so the test set "
                "holds only unseen patients. The paper's numbers come from an image-level split "
                "(patients leak between train and test) and are not directly comparable."
            )
        )
    models = sorted({g["model"] for g in groups}, key=_model_order)
    mags = sorted({g["magnification"] for g in groups})
    cell = {(g["model"], g["magnification"]): g for g in groups}

    header, rows = _table6(models, mags, cell)
    figures[f"table6_{slug}.png"] = _png(
        _table_figure(
            f"Table 6 layout, scheme {scheme}: ours mean ± std over runs (paper)", header, rows
        )
    )
    blocks += [
        _Heading(3, "Test metrics in the paper's Table 6 layout"),
        _Text(
            "Each cell: our mean ± standard deviation across seeds/folds, the paper's "
            "published value in parentheses. F1 is minority-class / weighted; IBA is "
            "imbalanced-learn's, alpha 0.1, unsquared (the paper's reading)."
        ),
        _Table(header, rows),
        _Image(f"table6_{slug}.png", f"Table 6 layout ({scheme})"),
    ]

    header, rows = _table7(models, mags, cell)
    figures[f"table7_{slug}.png"] = _png(
        _table_figure(
            f"Table 7 layout, scheme {scheme}: parameters and training time, ours (paper)",
            header,
            rows,
        )
    )
    blocks += [
        _Heading(3, "Parameters and convergence time (Table 7 layout)"),
        _Text(
            f"Paper: {PAPER_EPOCHS} epochs on one {PAPER_HARDWARE}. Ours: total training "
            "seconds of each run (mean ± std), for the epochs shown, on this project's hardware."
        ),
        _Table(header, rows),
        _Image(f"table7_{slug}.png", f"Table 7 layout ({scheme})"),
    ]

    patient_groups = [g for g in groups if g["patient"]]
    if patient_groups:
        figures[f"patient_{slug}.png"] = _png(_patient_figure(patient_groups))
        blocks += [
            _Heading(3, "Patient-level metrics"),
            _Text(
                "A patient's images vote through their mean malignant probability "
                "(threshold 0.5). Patients, not images, are the independent unit."
            ),
            _Table(*_patient_table(patient_groups)),
            _Image(f"patient_{slug}.png", f"Image vs patient level ({scheme})"),
        ]

    figures[f"confusion_{slug}.png"] = _png(_confusion_figure(models, cell))
    blocks += [
        _Heading(3, "Confusion matrices (summed over runs)"),
        _Image(f"confusion_{slug}.png", f"Confusion matrices ({scheme})"),
    ]

    with_predictions = [r for r in runs if r.predictions is not None]
    if with_predictions:
        figures[f"roc_{slug}.png"] = _png(_roc_figure(models, with_predictions, cell))
        blocks += [
            _Heading(3, "ROC curves (one line per run)"),
            _Image(f"roc_{slug}.png", f"ROC curves ({scheme})"),
        ]

    curve_blocks: list[_Block] = []
    for mag in sorted({g["magnification"] for g in groups}):
        mag_runs = [r for r in runs if r.key[2] == mag and r.history is not None and len(r.history)]
        if mag_runs:
            name = f"curves_{slug}_{_mag_label(mag)}.png"
            figures[name] = _png(_curves_figure(mag, models, mag_runs))
            curve_blocks.append(_Image(name, f"Training curves {_mag_label(mag)} ({scheme})"))
    if curve_blocks:
        blocks += [
            _Heading(3, "Training and validation curves (mean ± std across runs)"),
            *curve_blocks,
        ]

    ci_runs = [r for r in runs if r.test.get("ci")]
    if ci_runs:
        figures[f"ci_{slug}.png"] = _png(_ci_figure(models, ci_runs))
        blocks += [
            _Heading(3, "95% bootstrap confidence intervals per run"),
            _Text(
                "Image-level percentile bootstrap (1000 resamples); images of one patient "
                "are correlated, so these intervals are optimistic. Crosses mark the "
                "paper's value."
            ),
            _Image(f"ci_{slug}.png", f"Bootstrap CIs ({scheme})"),
        ]
    return blocks


def _paper_value(model: str, mag: int, field: str) -> float | None:
    """A Table 6 number, or None where the paper does not publish it."""
    return getattr(PAPER_RESULTS.get(model, {}).get(mag), field, None)


def _published(value: float | None, digits: int = 3) -> str | None:
    return None if value is None else f"{value:.{digits}f}"


def _table6(models: list[str], mags: list[int], cell: dict) -> tuple[list[str], list[list[str]]]:
    header = ["Model"] + [
        f"{_mag_label(mag)} {name}"
        for mag in mags
        for name in ("Accuracy", "F1 (minority/weighted)", "IBA", "G-mean")
    ]
    rows = []
    for model in models:
        row = [paper_name(model)]
        for mag in mags:
            test = cell[(model, mag)]["test"] if (model, mag) in cell else {}
            minority, weighted = (
                _paper_value(model, mag, k) for k in ("f1_minority", "f1_weighted")
            )
            f1_paper = None if minority is None else f"{minority:.3f}/{weighted:.3f}"
            row += [
                _with_paper(
                    _fmt(test.get("accuracy")), _published(_paper_value(model, mag, "accuracy"))
                ),
                _with_paper(
                    f"{_fmt(test.get('f1_minority'))} / {_fmt(test.get('f1_weighted'))}", f1_paper
                ),
                _with_paper(
                    _fmt(test.get("iba_unsquared")), _published(_paper_value(model, mag, "iba"))
                ),
                _with_paper(_fmt(test.get("gmean")), _published(_paper_value(model, mag, "gmean"))),
            ]
        rows.append(row)
    return header, rows


def _table7(models: list[str], mags: list[int], cell: dict) -> tuple[list[str], list[list[str]]]:
    header = (
        ["Model", "Parameters", "Epochs"]
        + [f"{_mag_label(mag)} seconds" for mag in mags]
        + ["Mean seconds"]
    )
    rows = []
    for model in models:
        groups = [cell[(model, mag)] for mag in mags if (model, mag) in cell]
        params = [g["parameters"]["mean"] for g in groups if g["parameters"]]
        paper_params = PAPER_PARAMS.get(model)
        epochs = sorted({e for g in groups for e in g["epochs"] if e is not None})
        row = [
            paper_name(model),
            _with_paper(
                f"{int(round(params[0])):,}" if params else "—",
                None if paper_params is None else f"{paper_params:,}",
            ),
            ", ".join(str(e) for e in epochs) or "—",
        ]
        for mag in mags:
            ours = cell[(model, mag)]["train_seconds"] if (model, mag) in cell else None
            row.append(
                _with_paper(
                    _fmt(ours, 1), _published(PAPER_CONVERGENCE_SECONDS.get(model, {}).get(mag), 1)
                )
            )
        means = [g["train_seconds"]["mean"] for g in groups if g["train_seconds"]]
        row.append(
            _with_paper(
                f"{np.mean(means):.1f}" if means else "—",
                _published(PAPER_MEAN_CONVERGENCE_SECONDS.get(model), 1),
            )
        )
        rows.append(row)
    return header, rows


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
                paper_name(g["model"]),
                _mag_label(g["magnification"]),
                str(g["n_runs"]),
                _fmt(p.get("n_patients"), 0),
                _fmt(t.get("accuracy")),
                _fmt(p.get("accuracy")),
                _fmt(t.get("gmean")),
                _fmt(p.get("gmean")),
                _fmt(p.get("sensitivity")),
                _fmt(p.get("specificity")),
                _fmt(p.get("roc_auc")),
            ]
        )
    return header, rows


def _runs_section(
    runs: list[Run], incomplete: list[dict[str, Any]], problems: list[str]
) -> list[_Block]:
    blocks: list[_Block] = [_Heading(2, "Runs")]
    if runs:
        header = (
            ["Run", "Model", "Mag.", "Scheme", "Fold", "Seed", "Best epoch", "Train s"]
            + [f"{label} [95% CI]" for _, label in CI_METRICS]
            + ["Patient accuracy"]
        )
        rows = []
        for run in sorted(
            runs, key=lambda r: (r.key[0], _model_order(r.key[1]), r.key[2], r.run_id)
        ):
            s, image, ci = run.summary, run.test["image"], run.test.get("ci") or {}
            row = [
                f"`{run.run_id}`",
                paper_name(run.key[1]),
                _mag_label(run.key[2]),
                run.key[0],
                _plain(s.get("fold")),
                _plain(s.get("seed")),
                _plain(s.get("best_epoch")),
                f"{s['train_seconds']:.1f}" if _is_number(s.get("train_seconds")) else "—",
            ]
            for key, _ in CI_METRICS:
                value = f"{image[key]:.3f}" if _is_number(image.get(key)) else "—"
                bounds = ci.get(key)
                row.append(f"{value} [{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else value)
            patient = run.test.get("patient") or {}
            row.append(f"{patient['accuracy']:.3f}" if _is_number(patient.get("accuracy")) else "—")
            rows.append(row)
        blocks.append(_Table(header, rows))
    if incomplete:
        blocks += [
            _Heading(3, "Incomplete runs (not in the tables)"),
            _Table(
                ["Run", "Status", "Model", "Mag.", "Scheme", "Fold", "Seed"],
                [
                    [f"`{r['run_id']}`", r["status"]]
                    + [_plain(r[k]) for k in ("model", "magnification", "scheme", "fold", "seed")]
                    for r in incomplete
                ],
            ),
        ]
    if problems:
        blocks += [_Heading(3, "Problems"), _List(problems)]
    return blocks


def _notes() -> list[_Block]:
    return [
        _Heading(2, "Definitions"),
        _List(
            [
                "Labels: 0 = benign, 1 = malignant; malignant is the positive class (sensitivity = "
                "malignant recall, specificity = benign recall).",
                "F1 minority: F1 of the class with fewer test images (benign in BreakHis).",
                "G-mean: imbalanced-learn `geometric_mean_score`, sqrt(sensitivity x specificity).",
                "IBA: imbalanced-learn `make_index_balanced_accuracy(alpha=0.1)` applied to "
                "G-mean, (1 + 0.1 (sensitivity - specificity)) x G-mean^k. The tables show k = 1 "
                "(`iba_unsquared`, which matches the paper's numbers); metrics.json also holds "
                "`iba` (k = 2, the library default).",
                "Mean ± std: sample standard deviation (ddof=1) across the seeds/folds of one model and "
                "magnification; a single run shows no std.",
            ]
        ),
    ]


# ---------------------------------------------------------------- figures


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def _colors(models: list[str]) -> dict[str, Any]:
    cmap = colormaps["tab10"]
    return {model: cmap(i % 10) for i, model in enumerate(models)}


def _table_figure(title: str, header: list[str], rows: list[list[str]]) -> Figure:
    """A report table as an image; long cells break before the paper's value and at '/'."""

    def wrap(text: str) -> str:
        return text.replace(" (paper ", "\n(paper ").replace(" / ", " /\n")

    cells = [[wrap(c) for c in row] for row in rows]
    head = [h.replace(" ", "\n", 1) for h in header]
    lines = max(c.count("\n") + 1 for row in [head, *cells] for c in row)
    widths = [
        3 + max(len(part) for c in column for part in c.split("\n"))
        for column in zip(head, *cells, strict=True)
    ]
    fig = Figure(
        figsize=(
            0.4 + 0.075 * sum(widths) + 0.15 * len(widths),
            0.8 + 0.2 * lines * (len(rows) + 1),
        )
    )
    ax = fig.subplots()
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    table = ax.table(
        cellText=cells,
        colLabels=head,
        loc="center",
        cellLoc="center",
        colWidths=[w / sum(widths) for w in widths],
        bbox=[0, 0, 1, 1],
    )
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    for (row, _), cell_ in table.get_celld().items():
        if row == 0:
            cell_.set_facecolor("#e8eef6")
            cell_.set_text_props(weight="bold")
    return fig


def _confusion_figure(models: list[str], cell: dict) -> Figure:
    mags = sorted({mag for _, mag in cell})
    fig = Figure(figsize=(3.2 * len(mags), 3.0 * len(models)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(models), len(mags), squeeze=False))
    for i, model in enumerate(models):
        for j, mag in enumerate(mags):
            ax = axes[i, j]
            group = cell.get((model, mag))
            if group is None or group["confusion_matrix"] is None:
                ax.axis("off")
                continue
            ConfusionMatrixDisplay(
                np.asarray(group["confusion_matrix"]), display_labels=list(CLASS_NAMES)
            ).plot(ax=ax, colorbar=False, values_format="d", cmap="Blues")
            ax.set_title(
                f"{paper_name(model)} {_mag_label(mag)} ({group['n_runs']} runs)", fontsize=9
            )
    return fig


def _roc_figure(models: list[str], runs: list[Run], cell: dict) -> Figure:
    mags = sorted({r.key[2] for r in runs})
    colors = _colors(models)
    fig = Figure(figsize=(4.2 * len(mags), 4.2), layout="constrained")
    axes = fig.subplots(1, len(mags), squeeze=False)[0]
    for ax, mag in zip(axes, mags, strict=True):
        labelled: set[str] = set()
        for run in (r for r in runs if r.key[2] == mag):
            frame = run.predictions
            if frame["y_true"].nunique() < 2:
                continue
            fpr, tpr, _ = roc_curve(frame["y_true"], frame["prob_malignant"])
            model = run.key[1]
            label = None
            if model not in labelled:
                auc = cell[(model, mag)]["test"].get("roc_auc")
                label = f"{paper_name(model)} (AUC {_fmt(auc)})"
                labelled.add(model)
            ax.plot(fpr, tpr, color=colors[model], lw=1.2, alpha=0.8, label=label)
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
        ax.set(
            title=f"{_mag_label(mag)}",
            xlabel="False positive rate (1 - specificity)",
            ylabel="True positive rate (sensitivity)",
            xlim=(0, 1),
            ylim=(0, 1.01),
        )
        if labelled:
            ax.legend(fontsize=7, loc="lower right")
    return fig


def _curves_figure(mag: int, models: list[str], runs: list[Run]) -> Figure:
    colors = _colors(models)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    fig.suptitle(
        f"{_mag_label(mag)}: training (dashed) and validation (solid), mean ± std across runs"
    )
    for model in models:
        histories = [r.history for r in runs if r.key[1] == model]
        if not histories:
            continue
        per_epoch = pd.concat(histories, ignore_index=True).groupby("epoch")
        for ax, metric in zip(axes, ("loss", "acc"), strict=True):
            for split, style in (("train", "--"), ("val", "-")):
                column = f"{split}_{metric}"
                mean = per_epoch[column].mean()
                std = per_epoch[column].std(ddof=1).fillna(0.0)
                epochs = mean.index.to_numpy() + 1
                ax.plot(
                    epochs,
                    mean.to_numpy(),
                    style,
                    color=colors[model],
                    label=f"{paper_name(model)} {split} (n={len(histories)})",
                )
                ax.fill_between(
                    epochs,
                    (mean - std).to_numpy(),
                    (mean + std).to_numpy(),
                    color=colors[model],
                    alpha=0.15,
                    lw=0,
                )
    axes[0].set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    axes[1].set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    axes[1].legend(fontsize=7, loc="lower right")
    return fig


def _patient_figure(groups: list[dict[str, Any]]) -> Figure:
    labels = [f"{paper_name(g['model'])}\n{_mag_label(g['magnification'])}" for g in groups]
    x = np.arange(len(groups))
    fig = Figure(figsize=(max(7.0, 1.5 * len(groups) + 1), 7.0), layout="constrained")
    axes = fig.subplots(2, 1)
    for ax, (key, title) in zip(axes, (("accuracy", "Accuracy"), ("gmean", "G-mean")), strict=True):
        for offset, (level, name) in ((-0.2, ("test", "images")), (0.2, ("patient", "patients"))):
            stats = [g[level].get(key) for g in groups]
            ax.bar(
                x + offset,
                [s["mean"] if s else np.nan for s in stats],
                width=0.4,
                yerr=[(s["std"] or 0.0) if s else 0.0 for s in stats],
                capsize=3,
                label=name,
            )
        ax.set_xticks(x, labels, fontsize=8)
        ax.set(title=f"{title}: per image vs per patient", ylim=(0, 1.05))
        ax.legend(fontsize=8, loc="lower right")
    return fig


def _ci_figure(models: list[str], runs: list[Run]) -> Figure:
    keys = sorted({(r.key[1], r.key[2]) for r in runs}, key=lambda k: (_model_order(k[0]), k[1]))
    colors = _colors(models)
    fig = Figure(figsize=(12, 1.2 + 0.45 * len(keys)), layout="constrained")
    axes = fig.subplots(1, len(CI_METRICS), sharey=True)
    for ax, (metric, title) in zip(axes, CI_METRICS, strict=True):
        for row, (model, mag) in enumerate(keys):
            members = [r for r in runs if (r.key[1], r.key[2]) == (model, mag)]
            for k, run in enumerate(members):
                bounds = run.test["ci"].get(metric)
                value = run.test["image"].get(metric)
                if not bounds or not _is_number(value):
                    continue
                y = row + (k - (len(members) - 1) / 2) * 0.5 / max(len(members), 1)
                ax.errorbar(
                    value,
                    y,
                    xerr=[[value - bounds[0]], [bounds[1] - value]],
                    fmt="o",
                    ms=3,
                    color=colors[model],
                    capsize=2,
                )
            published = _paper_value(model, mag, metric.removesuffix("_unsquared"))
            if published is not None:
                ax.plot(published, row, "x", color="black", ms=6)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(keys)), [f"{paper_name(m)} {_mag_label(g)}" for m, g in keys])
    axes[0].invert_yaxis()
    return fig


# ---------------------------------------------------------------- rendering


def _markdown(blocks: list[_Block]) -> str:
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, _Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, _Text):
            lines += [("> **Warning:** " if block.warning else "") + block.text, ""]
        elif isinstance(block, _Table):

            def row(cells: list[str]) -> str:
                return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

            lines += [row(block.header), "|" + "---|" * len(block.header)]
            lines += [row(r) for r in block.rows] + [""]
        elif isinstance(block, _Image):
            lines += [f"![{block.caption}]({block.name})", ""]
        else:
            lines += [f"- {item}" for item in block.items] + [""]
    return "\n".join(lines)


def _inline(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1400px; color: #222; }
h1, h2, h3 { color: #1f3b63; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccd; padding: 0.25rem 0.5rem; text-align: center; }
th { background: #e8eef6; }
tr:nth-child(even) td { background: #f7f9fc; }
.scroll { overflow-x: auto; }
.warning { background: #fff4e5; border-left: 4px solid #e69500; padding: 0.5rem 1rem; }
figure { margin: 1rem 0; } figure img { max-width: 100%; }
figcaption { font-size: 0.85rem; color: #555; }
code { background: #f0f0f0; padding: 0 0.2rem; }
"""


def _html(blocks: list[_Block], figures: dict[str, bytes]) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>DALAResNet50 on BreakHis: run report</title>",
        f"<style>{_CSS}</style>",
        "</head><body>",
    ]
    for block in blocks:
        if isinstance(block, _Heading):
            parts.append(f"<h{block.level}>{_inline(block.text)}</h{block.level}>")
        elif isinstance(block, _Text):
            css = ' class="warning"' if block.warning else ""
            prefix = "<strong>Warning:</strong> " if block.warning else ""
            parts.append(f"<p{css}>{prefix}{_inline(block.text)}</p>")
        elif isinstance(block, _Table):
            head = "".join(f"<th>{_inline(c)}</th>" for c in block.header)
            body = "".join(
                "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>"
                for row in block.rows
            )
            parts.append(
                f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
                f"<tbody>{body}</tbody></table></div>"
            )
        elif isinstance(block, _Image):
            data = base64.b64encode(figures[block.name]).decode()
            parts.append(
                f'<figure><img alt="{html.escape(block.caption)}" '
                f'src="data:image/png;base64,{data}"><figcaption>'
                f"{html.escape(block.caption)}</figcaption></figure>"
            )
        else:
            parts.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block.items) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)
