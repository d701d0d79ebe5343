"""The report's Grad-CAM gallery: the overlays ``dala explain`` wrote, one figure per magnification.

Only runs that have been explained (``runs/<run_id>/explain/index.parquet``, written by
``report.explain``) appear; a report of runs never explained has no gallery section at all. Each
magnification gets one figure, a row per explained run and a column per sampled image (the
index's order: confident errors first), each captioned with its category and probability, and
each DALAResNet50 run its attention-channel figure; a table under each figure names every tile's
image id and patient, so a reader can find the slide. The overlays are copied into the figure, so
the HTML report stays self-contained.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image as PILImage

from dala_model import storage
from dala_model.paper import paper_name
from dala_model.report import figures as fig
from dala_model.report.blocks import Block, Heading, Image, Table, Text
from dala_model.report.collect import Run
from dala_model.report.explain import CHANNELS_FIGURE, EXPLAIN, INDEX
from dala_model.report.tables import fmt, mag_label
from dala_model.runs import run_folder

MAX_COLUMNS = 8


def gallery_blocks(root: str, runs: list[Run]) -> list[Block]:
    """The gallery section, or nothing when no run has been explained."""
    explained = [(run, index) for run in runs if (index := _index(root, run)) is not None]
    if not explained:
        return []
    blocks: list[Block] = [
        Heading(2, "Grad-CAM gallery"),
        Text(
            "Class activation maps of test images (`dala explain`), over the class each model "
            "predicted: red is where the evidence for that call lies. Images are sampled across "
            "false positives (FP), false negatives (FN), true positives (TP) and true negatives "
            "(TN), the most confident of each first; `p` is the predicted probability of "
            "malignancy. A map shows what the model looked at, not that it was right to. The "
            "table under each figure names the image and patient of every tile."
        ),
    ]
    for mag in sorted({run.key[2] for run, _ in explained}):
        rows = [(run, index) for run, index in explained if run.key[2] == mag]
        blocks += [
            Heading(3, mag_label(mag)),
            Image(
                f"gallery_{mag}x.png",
                f"Grad-CAM overlays at {mag_label(mag)} ({len(rows)} run(s))",
                fig.png(_gallery_figure(root, rows)),
            ),
            Table(*_tile_key(rows)),
        ]
        for run, _ in rows:
            channels = storage.join(run_folder(root, run.run_id), EXPLAIN, CHANNELS_FIGURE)
            if storage.exists(channels):
                blocks.append(
                    Image(
                        f"attention_channels_{_slug(run.run_id)}.png",
                        f"{run.run_id}: mean attention weight of the channels amplified most, "
                        "benign vs malignant test images",
                        storage.read_bytes(channels),
                    )
                )
    return blocks


def _tile_key(rows: list[tuple[Run, pd.DataFrame]]) -> tuple[list[str], list[list[str]]]:
    """Which test image each tile shows, so a reader can find it: a line per tile, in order."""
    header = ["Row", "Run", "Column", "Category", "P(malignant)", "Image", "Patient"]
    body = []
    for number, (run, index) in enumerate(rows, start=1):
        for column in range(min(len(index), MAX_COLUMNS)):
            entry = index.iloc[column]
            body.append(
                [
                    str(number),
                    f"`{run.run_id}`",
                    str(column + 1),
                    str(entry["category"]),
                    fmt(entry["prob_malignant"], 2),
                    f"`{entry['image_id']}`",
                    str(entry["patient_id"]),
                ]
            )
    return header, body


def _index(root: str, run: Run) -> pd.DataFrame | None:
    uri = storage.join(run_folder(root, run.run_id), EXPLAIN, INDEX)
    return storage.read_parquet(uri) if storage.exists(uri) else None


def _gallery_figure(root: str, rows: list[tuple[Run, pd.DataFrame]]) -> Figure:
    columns = max(min(len(index), MAX_COLUMNS) for _, index in rows)
    figure = Figure(figsize=(1.7 * columns, 2.0 * len(rows)), layout="constrained")
    grid = np.atleast_2d(figure.subplots(len(rows), columns, squeeze=False))
    for (run, index), axes_row in zip(rows, grid, strict=True):
        folder = storage.join(run_folder(root, run.run_id), EXPLAIN)
        for column, axes in enumerate(axes_row):
            axes.set_axis_off()
            if column >= min(len(index), MAX_COLUMNS):
                continue
            entry = index.iloc[column]
            pixels = PILImage.open(
                io.BytesIO(storage.read_bytes(storage.join(folder, entry["file"])))
            )
            axes.imshow(np.asarray(pixels.convert("RGB")))
            axes.set_title(f"{entry['category']} p={entry['prob_malignant']:.2f}", fontsize=7)
        axes_row[0].text(
            -0.08,
            0.5,
            f"{paper_name(run.key[1])}\n{run.key[0]}",
            transform=axes_row[0].transAxes,
            rotation=90,
            ha="right",
            va="center",
            fontsize=7,
        )
    return figure


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text)
