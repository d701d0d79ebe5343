"""The report's figures, each returned as a ``matplotlib.figure.Figure`` and saved by ``png``.

Figures use ``matplotlib.figure.Figure`` directly (Agg canvas), so no global pyplot state or
display backend is touched. PNGs are written without a "Software" metadata entry, so the same
runs give the same bytes.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay, roc_curve

from dala_model.data.breakhis import LABELS as CLASS_NAMES
from dala_model.report.aggregate import is_number, model_order
from dala_model.report.collect import CI_METRICS, Run
from dala_model.report.tables import (
    RowKey,
    find_interval,
    fmt_stat,
    mag_label,
    paper_metrics,
    row_label,
)


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes (120 dpi, tight bounding box, no software metadata)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def _colors(rows: list[RowKey]) -> dict[RowKey, Any]:
    cmap = colormaps["tab10"]
    return {row: cmap(i % 10) for i, row in enumerate(rows)}


def table_figure(title: str, header: list[str], rows: list[list[str]]) -> Figure:
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


def confusion_figure(rows: list[RowKey], cell: dict) -> Figure:
    """One summed confusion matrix per model (rows) and magnification (columns)."""
    mags = sorted({mag for _, mag in cell})
    fig = Figure(figsize=(3.2 * len(mags), 3.0 * len(rows)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(rows), len(mags), squeeze=False))
    for i, row in enumerate(rows):
        for j, mag in enumerate(mags):
            ax = axes[i, j]
            group = cell.get((row, mag))
            if group is None or group["confusion_matrix"] is None:
                ax.axis("off")
                continue
            ConfusionMatrixDisplay(
                np.asarray(group["confusion_matrix"]), display_labels=list(CLASS_NAMES)
            ).plot(ax=ax, colorbar=False, values_format="d", cmap="Blues")
            ax.set_title(f"{row_label(row)} {mag_label(mag)} ({group['n_runs']} runs)", fontsize=9)
    return fig


def roc_figure(rows: list[RowKey], runs: list[Run], cell: dict) -> Figure:
    """ROC curves, one panel per magnification and one line per run with predictions."""
    mags = sorted({r.key[2] for r in runs})
    colors = _colors(rows)
    fig = Figure(figsize=(4.2 * len(mags), 4.2), layout="constrained")
    axes = fig.subplots(1, len(mags), squeeze=False)[0]
    for ax, mag in zip(axes, mags, strict=True):
        labelled: set[RowKey] = set()
        for run in (r for r in runs if r.key[2] == mag):
            frame = run.predictions
            if frame["y_true"].nunique() < 2:
                continue
            fpr, tpr, _ = roc_curve(frame["y_true"], frame["prob_malignant"])
            row = run.row
            label = None
            if row not in labelled:
                auc = cell[(row, mag)]["test"].get("roc_auc")
                label = f"{row_label(row)} (AUC {fmt_stat(auc)})"
                labelled.add(row)
            ax.plot(fpr, tpr, color=colors[row], lw=1.2, alpha=0.8, label=label)
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
        ax.set(
            title=f"{mag_label(mag)}",
            xlabel="False positive rate (1 - specificity)",
            ylabel="True positive rate (sensitivity)",
            xlim=(0, 1),
            ylim=(0, 1.01),
        )
        if labelled:
            ax.legend(fontsize=7, loc="lower right")
    return fig


def curves_figure(mag: int, rows: list[RowKey], runs: list[Run]) -> Figure:
    """Loss and accuracy per epoch at one magnification: mean ± std across each model's runs."""
    colors = _colors(rows)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    fig.suptitle(
        f"{mag_label(mag)}: training (dashed) and validation (solid), mean ± std across runs"
    )
    for row in rows:
        histories = [r.history for r in runs if r.row == row]
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
                    color=colors[row],
                    label=f"{row_label(row)} {split} (n={len(histories)})",
                )
                ax.fill_between(
                    epochs,
                    (mean - std).to_numpy(),
                    (mean + std).to_numpy(),
                    color=colors[row],
                    alpha=0.15,
                    lw=0,
                )
    axes[0].set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    axes[1].set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    axes[1].legend(fontsize=7, loc="lower right")
    return fig


def patient_figure(groups: list[dict[str, Any]]) -> Figure:
    """Accuracy and G-mean per image beside per patient, one bar pair per group."""
    labels = [
        f"{row_label((g['model'], g['model_options']))}\n{mag_label(g['magnification'])}"
        for g in groups
    ]
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


def ci_figure(rows: list[RowKey], runs: list[Run]) -> Figure:
    """Each run's 95% intervals, resampled by patient (solid) and by image (hollow, optimistic);
    crosses mark the paper's values."""
    keys = sorted({(r.row, r.key[2]) for r in runs}, key=lambda k: (model_order(k[0][0]), k))
    colors = _colors(rows)
    fig = Figure(figsize=(12, 1.6 + 0.5 * len(keys)), layout="constrained")
    axes = fig.subplots(1, len(CI_METRICS), sharey=True)
    for ax, (metric, title) in zip(axes, CI_METRICS, strict=True):
        for y0, (row, mag) in enumerate(keys):
            members = [r for r in runs if (r.row, r.key[2]) == (row, mag)]
            for k, run in enumerate(members):
                value = run.test["image"].get(metric)
                if not is_number(value):
                    continue
                y = y0 + (k - (len(members) - 1) / 2) * 0.6 / max(len(members), 1)
                for unit, dy, face in (("patient", -0.05, colors[row]), ("image", 0.05, "white")):
                    bounds = find_interval(run.test, metric, unit)
                    if bounds is None:
                        continue
                    ax.errorbar(
                        value,
                        y + dy,
                        xerr=[[value - bounds["low"]], [bounds["high"] - value]],
                        fmt="o",
                        ms=4,
                        color=colors[row],
                        mfc=face,
                        capsize=2,
                    )
            published = paper_metrics(row[0], mag).get(metric)
            if published is not None:
                ax.plot(published, y0, "x", color="black", ms=6)
        ax.set_title(f"{title}: filled = by patient, hollow = by image (optimistic)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(keys)), [_ci_label(row, mag, runs) for row, mag in keys])
    axes[0].invert_yaxis()
    return fig


def _ci_label(row: RowKey, mag: int, runs: list[Run]) -> str:
    """The row's name, magnification and how many test patients its intervals resample."""
    counts = set()
    for run in runs:
        if (run.row, run.key[2]) == (row, mag):
            record = find_interval(run.test, CI_METRICS[0][0], "patient")
            if record is not None and record.get("n_units") is not None:
                counts.add(int(record["n_units"]))
    patients = "/".join(str(n) for n in sorted(counts))
    return f"{row_label(row)} {mag_label(mag)}" + (f"\n({patients} patients)" if patients else "")


def reliability_figure(rows: list[RowKey], mags: list[int], cell: dict) -> Figure:
    """Reliability diagrams, one panel per magnification: per model, the share of malignant
    images against the mean predicted probability in each bin (pooled over its runs), with the
    diagonal of perfect calibration; marker area grows with the bin's image count."""
    colors = _colors(rows)
    fig = Figure(figsize=(4.2 * len(mags), 4.4), layout="constrained")
    axes = fig.subplots(1, len(mags), squeeze=False)[0]
    for ax, mag in zip(axes, mags, strict=True):
        drawn = False
        for row in rows:
            group = cell.get((row, mag))
            bins = [b for b in (group or {}).get("reliability") or [] if b["count"]]
            if not bins:
                continue
            x = [b["mean_prob"] for b in bins]
            y = [b["frac_malignant"] for b in bins]
            counts = np.array([b["count"] for b in bins], dtype=float)
            ece = fmt_stat(group["ece"])
            ax.plot(x, y, "-", color=colors[row], lw=1.2, label=f"{row_label(row)} (ECE {ece})")
            ax.scatter(x, y, s=12 + 80 * counts / counts.max(), color=colors[row], zorder=3)
            drawn = True
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
        ax.set(
            title=mag_label(mag),
            xlabel="mean predicted P(malignant) in bin",
            ylabel="share of malignant images in bin",
            xlim=(0, 1),
            ylim=(0, 1.02),
        )
        if drawn:
            ax.legend(fontsize=7, loc="upper left")
    return fig
