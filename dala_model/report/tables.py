"""Table text shared by the report and the flows' artifacts: one number format, one Markdown table,
and the one builder of the paper's Table 6 and Table 7 layouts.

The report document, the Prefect table/markdown artifacts and the CLI all print metric values;
they print them the same way (3 digits, an em dash for a missing value) because they use these.

Table 6 gives, per model and magnification, four columns: accuracy, F1 (minority/weighted),
IBA and G-mean. ``TABLE6`` names which of our metrics (as ``dala_model.evaluation.evaluate``
names them) fill each column, and ``paper_metrics`` restates the paper's numbers under those
same names, so our cells and the paper's come out of one function, ``table6_cells``. The
paper's "IBA" equals its G-mean within 0.002 in all 36 cells: it is imbalanced-learn's default
(macro) IBA, our ``iba_macro``, which on two classes *is* G-mean; the binary-dominance forms
(``iba``, squared, and ``iba_unsquared``) stay in metrics.json. Runs written before
``iba_macro`` existed have it filled in from ``gmean`` by ``collect``.

The report lays those cells out one row per model (and model options) with a last column
saying how many seeds/folds each cell averages (``table6``); a training run's artifact lays
them out as one record for the run and one for the paper (``table6_row``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from dala_model.paper import (
    PAPER_CONVERGENCE_SECONDS,
    PAPER_MEAN_CONVERGENCE_SECONDS,
    PAPER_PARAMS,
    PAPER_RESULTS,
    paper_name,
)

MISSING = "—"
# A table row: a model and its model options ("" when it has none).
RowKey = tuple[str, str]

# Table 6's metric columns and the metric keys (ours) each one shows, joined by a separator.
TABLE6: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Accuracy", ("accuracy",)),
    ("F1 (minority/weighted)", ("f1_minority", "f1_weighted")),
    ("IBA", ("iba_macro",)),
    ("G-mean", ("gmean",)),
)
# The paper's Table 6 fields under our metric names.
_PAPER_FIELDS = {
    "accuracy": "accuracy",
    "f1_minority": "f1_minority",
    "f1_weighted": "f1_weighted",
    "iba_macro": "iba",
    "gmean": "gmean",
}


def fmt(value: Any, digits: int = 3, *, missing: str = MISSING) -> str:
    """A metric value for a table: ``digits`` decimals, or ``missing`` when absent or not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return missing
    return f"{value:.{digits}f}"


def fmt_stat(stat: Mapping[str, Any] | None, digits: int = 3) -> str:
    """An aggregate (``{"mean", "std", ...}``) as "mean ± std", the mean alone without a std."""
    if stat is None:
        return MISSING
    if stat["std"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def mag_label(mag: int) -> str:
    """How the paper writes a magnification: 40 -> "40X"."""
    return f"{mag}X"


def row_label(row: RowKey) -> str:
    """A row's name: the paper's name for the model, then its options in brackets if any."""
    model, options = row
    return paper_name(model) + (f" [{options}]" if options else "")


def averaged_over(group: Mapping[str, Any]) -> str:
    """How many runs a group's mean ± std averages, and over which seeds and folds."""
    parts = []
    for name, values in (("fold", group["folds"]), ("seed", group["seeds"])):
        present = [str(v) for v in values if v is not None]
        if present:
            parts.append(f"{name}{'s' if len(present) > 1 else ''} {', '.join(present)}")
    runs = "1 run" if group["n_runs"] == 1 else f"{group['n_runs']} runs"
    return f"{runs} ({'; '.join(parts)})" if parts else runs


def averaged_cell(groups: Mapping[int, Mapping[str, Any]]) -> str:
    """``averaged_over`` for one row's magnifications: said once when they all agree."""
    texts = {mag: averaged_over(g) for mag, g in groups.items()}
    if len(set(texts.values())) == 1:
        return next(iter(texts.values()))
    return "; ".join(f"{mag_label(mag)}: {text}" for mag, text in texts.items()) or MISSING


def with_paper(ours: str, paper: str | None) -> str:
    """A cell holding our value and, when the paper publishes one, the paper's in parentheses."""
    return ours if paper is None else f"{ours} (paper {paper})"


def find_interval(
    evaluation: Mapping[str, Any] | None, metric: str, unit: str, scope: str = "image"
) -> dict[str, Any] | None:
    """The interval of ``metric`` at ``scope`` resampled by ``unit`` in an ``evaluate`` result.

    Runs from before intervals named their unit have only ``ci`` (image-resampled): that one is
    returned for ``unit="image"``, without a unit count."""
    for record in (evaluation or {}).get("intervals") or []:
        if (record.get("metric"), record.get("unit"), record.get("scope")) == (metric, unit, scope):
            return dict(record)
    bounds = ((evaluation or {}).get("ci") or {}).get(metric)
    if unit == "image" and scope == "image" and bounds:
        return {
            "metric": metric,
            "unit": "image",
            "low": bounds[0],
            "high": bounds[1],
            "n_units": None,
            "optimistic": True,
        }
    return None


def fmt_interval(record: Mapping[str, Any] | None, digits: int = 3) -> str:
    """An interval with its resampling unit: "[0.61, 0.93] 10 patients" or "... optimistic"."""
    if record is None or not all(isinstance(record.get(k), int | float) for k in ("low", "high")):
        return MISSING
    text = f"[{record['low']:.{digits}f}, {record['high']:.{digits}f}]"
    n, unit = record.get("n_units"), record.get("unit", "image")
    if n is not None:
        text += f" {n} {unit}s"
    return text + (", optimistic" if record.get("optimistic") else "")


# A code span as the report's texts write one: backticks around text without a backtick.
CODE_SPAN = re.compile(r"`([^`\n]+)`")
# Outside code spans: what would start raw HTML (``<``), a code span of its own (a lone
# backtick) or an escape (a backslash); and line breaks, which would end a table row or a
# heading. Entities (``&lt;``) decode to text, never to a tag.
_MD_LITERAL = str.maketrans({"\\": "\\\\", "`": "\\`", "<": "&lt;", "\n": " ", "\r": " "})
# A link needs "](" or "][" (no text can define a reference: see ``markdown_text``).
_LINK = re.compile(r"\]([(\[])")


def _literal(text: str) -> str:
    return _LINK.sub(r"]\\\1", text.translate(_MD_LITERAL))


def markdown_text(text: Any, *, line_start: bool = True) -> str:
    """``text`` as inert Markdown: its `code` spans kept, everything else shown literally.

    Every text a Markdown table, heading, paragraph or list of ours shows passes through here,
    so a run id, a file name or a model option can never become HTML, a link, or a new line of
    the document. Code spans are literal in CommonMark and their content has no backtick, so
    they end where this parse says they do. A text that begins a line (``line_start``: a
    paragraph or list item, not a table cell) has a leading ``[`` escaped, so it can neither
    define a link reference nor become a task-list checkbox; brackets elsewhere stay as they
    are (intervals are written ``[0.61, 0.93]``)."""
    text = str(text).replace("\r", " ").replace("\n", " ")
    parts, end = [], 0
    for span in CODE_SPAN.finditer(text):
        parts += [_literal(text[end : span.start()]), span.group(0)]
        end = span.end()
    out = "".join([*parts, _literal(text[end:])])
    stripped = out.lstrip()
    if line_start and stripped.startswith("["):
        out = out[: len(out) - len(stripped)] + "\\" + stripped
    return out


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table of ``markdown_text`` cells; pipes are escaped too."""

    def row(cells: Sequence[Any]) -> str:
        return (
            "| "
            + " | ".join(markdown_text(c, line_start=False).replace("|", "\\|") for c in cells)
            + " |"
        )

    return "\n".join([row(header), "|" + "---|" * len(header), *(row(r) for r in rows)])


def paper_metrics(model: str, mag: int) -> dict[str, float]:
    """The paper's Table 6 values for ``model`` at ``mag`` under our metric names; {} if none."""
    paper = PAPER_RESULTS.get(model, {}).get(mag)
    if paper is None:
        return {}
    values = {ours: getattr(paper, field) for ours, field in _PAPER_FIELDS.items()}
    return {key: value for key, value in values.items() if value is not None}


def table6_cells(
    values: Mapping[str, Any],
    number: Callable[[Any], str | None] = fmt,
    sep: str = "/",
) -> list[str | None]:
    """The four Table 6 cells of one model and magnification, from metrics named as ours.

    ``number`` formats each value (our aggregates or plain numbers); a cell is None when
    ``number`` returns None for any of its values, which is how the paper's unpublished
    values are left out.
    """
    cells = []
    for _, keys in TABLE6:
        parts = [number(values.get(key)) for key in keys]
        cells.append(None if any(p is None for p in parts) else sep.join(parts))
    return cells


def table6_row(
    values: Mapping[str, Any], number: Callable[[Any], str | None] = fmt
) -> dict[str, str | None]:
    """``table6_cells`` keyed by their column names, for a record-per-row table artifact."""
    return dict(zip((name for name, _ in TABLE6), table6_cells(values, number), strict=True))


def _published(value: float | None, digits: int = 3) -> str | None:
    return None if value is None else f"{value:.{digits}f}"


Cells = Mapping[tuple[RowKey, int], Mapping[str, Any]]


def table6(rows: list[RowKey], mags: list[int], cell: Cells) -> tuple[list[str], list[list[str]]]:
    """Table 6 as the report shows it: a row per model (and options), each magnification's four
    columns holding our mean ± std across runs and the paper's value in parentheses, and the
    runs each row averages."""
    header = ["Model"] + [f"{mag_label(mag)} {name}" for mag in mags for name, _ in TABLE6]
    body = []
    for key in rows:
        model = key[0]
        row = [row_label(key)]
        for mag in mags:
            test = cell[(key, mag)]["test"] if (key, mag) in cell else {}
            ours = table6_cells(test, fmt_stat, sep=" / ")
            paper = table6_cells(paper_metrics(model, mag), _published)
            row += [with_paper(o, p) for o, p in zip(ours, paper, strict=True)]
        row.append(averaged_cell({mag: cell[(key, mag)] for mag in mags if (key, mag) in cell}))
        body.append(row)
    return [*header, "Averaged over"], body


def table7(rows: list[RowKey], mags: list[int], cell: Cells) -> tuple[list[str], list[list[str]]]:
    """Table 7 as the report shows it: parameters, epochs and training seconds, ours (paper)."""
    header = (
        ["Model", "Parameters", "Epochs"]
        + [f"{mag_label(mag)} seconds" for mag in mags]
        + ["Mean seconds"]
    )
    body = []
    for key in rows:
        model = key[0]
        groups = [cell[(key, mag)] for mag in mags if (key, mag) in cell]
        params = [g["parameters"]["mean"] for g in groups if g["parameters"]]
        paper_params = PAPER_PARAMS.get(model)
        epochs = sorted({e for g in groups for e in g["epochs"] if e is not None})
        row = [
            row_label(key),
            with_paper(
                f"{int(round(params[0])):,}" if params else MISSING,
                None if paper_params is None else f"{paper_params:,}",
            ),
            ", ".join(str(e) for e in epochs) or MISSING,
        ]
        for mag in mags:
            ours = cell[(key, mag)]["train_seconds"] if (key, mag) in cell else None
            row.append(
                with_paper(
                    fmt_stat(ours, 1),
                    _published(PAPER_CONVERGENCE_SECONDS.get(model, {}).get(mag), 1),
                )
            )
        means = [g["train_seconds"]["mean"] for g in groups if g["train_seconds"]]
        row.append(
            with_paper(
                f"{np.mean(means):.1f}" if means else MISSING,
                _published(PAPER_MEAN_CONVERGENCE_SECONDS.get(model), 1),
            )
        )
        body.append(row)
    return header, body
