"""The report's building blocks (headings, text, tables, images, lists) and one ``Section``.

One document model feeds both renderers (``render.to_markdown`` and ``render.to_html``), so
the Markdown and HTML reports cannot drift apart. An ``Image`` block carries its PNG bytes:
the figures a report writes are exactly the images its blocks show (``figure_files(blocks)``).

A ``Section`` is one (split scheme, setting) of the report: the groups and runs trained the
same way, with the axes (rows, magnifications) their tables and figures share. The section
builders live in ``document`` (the paper's tables, curves, intervals), ``evaluation``
(setting, k-fold pooling, threshold and calibration, subtypes) and ``checklist``; this module
holds what they all use, so none imports another.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from matplotlib.figure import Figure

from dala_model.report import figures as fig
from dala_model.report.aggregate import model_order
from dala_model.report.collect import Run
from dala_model.report.tables import RowKey

_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*\.png")


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Text:
    text: str
    warning: bool = False


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Image:
    """A figure: its file name beside the report, its caption, and its PNG bytes."""

    name: str
    caption: str
    png: bytes = field(repr=False)

    def __post_init__(self) -> None:
        # The name becomes a file beside the report and a Markdown link target, unescaped.
        if not _FILE_NAME.fullmatch(self.name):
            raise ValueError(
                f"figure file name {self.name!r} must match {_FILE_NAME.pattern}: "
                "slug any run id or scheme that goes into it"
            )


@dataclass(frozen=True)
class Bullets:
    items: list[str]


Block = Heading | Text | Table | Image | Bullets


def figure_files(blocks: list[Block]) -> dict[str, bytes]:
    """``{file name: PNG bytes}`` of every image the blocks show, in document order."""
    return {b.name: b.png for b in blocks if isinstance(b, Image)}


@dataclass(frozen=True)
class Section:
    """One (scheme, setting)'s groups and runs, with the axes its tables and figures share.

    ``tag`` is empty when the scheme has one setting (figure files keep their plain names,
    ``table6_patient.png``), else the setting hash, so two settings never share a file."""

    name: str  # the split scheme
    setting_hash: str
    tag: str
    groups: list[dict[str, Any]]
    runs: list[Run]
    rows: list[RowKey]
    mags: list[int]
    cell: dict[tuple[RowKey, int], dict[str, Any]]

    @classmethod
    def of(
        cls, scheme: str, setting: str, tag: str, groups: list[dict[str, Any]], runs: list[Run]
    ) -> Section:
        rows = {(g["model"], g["model_options"]) for g in groups}
        return cls(
            scheme,
            setting,
            tag,
            groups,
            runs,
            rows=sorted(rows, key=lambda row: (model_order(row[0]), row[1])),
            mags=sorted({g["magnification"] for g in groups}),
            cell={((g["model"], g["model_options"]), g["magnification"]): g for g in groups},
        )

    @property
    def title(self) -> str:
        return self.name + (f", setting {self.tag}" if self.tag else "")

    def image(self, kind: str, figure: Figure, caption: str, suffix: str = "") -> Image:
        """``figure`` as ``<kind>_<scheme>[-<tag>]<suffix>.png``, captioned with the section."""
        slug = re.sub(r"[^A-Za-z0-9_-]+", "-", self.name) + (f"-{self.tag}" if self.tag else "")
        return Image(f"{kind}_{slug}{suffix}.png", f"{caption} ({self.title})", fig.png(figure))
