"""Scoring sources: which images a drop holds, and what is known about each before it is read.

Three layouts, told apart without reading any image:

- **sidecar**: ``SOURCE/metadata.csv`` or ``SOURCE/metadata.parquet`` with columns ``path``
  (relative to SOURCE), ``case_id``, ``magnification`` and an optional ``label``
  (benign/malignant): what a LIMS or slide-scanner export gives. The table is the truth; images
  under SOURCE that it does not list are quarantined as ``not_in_metadata`` and listed paths that
  are missing as ``missing_file``. A table that cannot be trusted as a whole (an unknown or
  missing column, a bad label or magnification, an empty case id, a repeated path, or a path
  that escapes SOURCE: ``..``, absolute, another scheme) is an error naming the row (the 1-based
  line of the CSV, header = line 1; the 1-based row of the Parquet file) and what to do, because
  scoring half an export silently is worse than scoring none of it.
- **BreakHis archive**: files named the BreakHis way (``dala_model.data.breakhis``) carry their
  case (the patient id), magnification and label in the name.
- **case folders**: ``SOURCE/.../<case_id>/<magnification>X/<any name>.(png|jpg|jpeg|tif|tiff)``
  at any depth; the folder right above the ``<m>X`` folder is the case. No label.

Without a sidecar each file is read as a BreakHis name first, then as a case-folder path. A file
whose magnification cannot be known (no ``<m>X`` folder, or an empty sidecar cell) is
quarantined as ``unknown_magnification`` unless a ``magnification`` override is given, which
fills in only unknown ones; its case is then its parent folder. A ``<m>X`` folder with a value
that no model serves (``50X``) is ``unknown_magnification`` too, overridden or not. A file
straight under SOURCE with no folder has no case (``unknown_case``). Keys with ``.``/``..``
segments are ``unsafe_key``, as in ingest.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import pandas as pd

from dala_model import storage
from dala_model.data.breakhis import (
    IMAGE_SUFFIXES,
    LABELS,
    MAGNIFICATIONS,
    UnparseableName,
    parse_breakhis_path,
)

SIDECARS = ("metadata.csv", "metadata.parquet")
SIDECAR_REQUIRED = ("path", "case_id", "magnification")
SIDECAR_COLUMNS = (*SIDECAR_REQUIRED, "label")
LAYOUTS = ("sidecar", "breakhis", "case_folders")
_MAG_DIR = re.compile(r"^(?P<mag>\d+)[xX]$")


class SourceError(ValueError):
    """A sidecar table or source that cannot be scored as given; the message says what to fix."""


@dataclass(frozen=True)
class SourceImage:
    """One image candidate of a drop and what its path or the sidecar says about it."""

    file: storage.StoredFile
    case_id: str
    magnification: int
    magnification_from: str  # name | folder | metadata | override
    label: str | None  # benign | malignant | None (unlabelled)
    layout: str  # one of LAYOUTS


@dataclass(frozen=True)
class Discovery:
    """A drop as listed: its images, the files refused before any read, and the rest ignored."""

    source: str
    layout: str  # sidecar, or breakhis/case_folders/mixed for per-file layouts
    images: list[SourceImage]
    quarantined: list[dict]  # uri, reason, detail, case_id, magnification (None when unknown)
    ignored: int  # files without an image suffix (and the sidecar itself)


def discover(source: str, *, magnification: int | None = None) -> Discovery:
    """List ``source`` and describe every image candidate (see the module docstring)."""
    if magnification is not None and magnification not in MAGNIFICATIONS:
        raise SourceError(f"magnification must be one of {MAGNIFICATIONS}, got {magnification!r}")
    listing = storage.list_file_infos(source)
    sidecars = [f for f in listing if f.relpath in SIDECARS]
    if len(sidecars) > 1:
        raise SourceError(
            f"{storage.redact(source)} holds both {' and '.join(SIDECARS)}: keep one of them"
        )
    files = [f for f in listing if f.relpath.lower().endswith(IMAGE_SUFFIXES)]
    ignored = len(listing) - len(files)
    if sidecars:
        table = read_sidecar(sidecars[0].url)
        images, quarantined = _from_sidecar(table, sidecars[0].url, files, source, magnification)
        layout = "sidecar"
    else:
        images, quarantined = [], []
        for file in files:
            image, refused = _from_path(file, magnification)
            if image is not None:
                images.append(image)
            else:
                quarantined.append(refused)
        found = sorted({i.layout for i in images})
        layout = found[0] if len(found) == 1 else ("mixed" if found else "case_folders")
    if not images and not quarantined:
        raise SourceError(
            f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {storage.redact(source)}: "
            "check the source URL"
        )
    return Discovery(storage.redact(source), layout, images, quarantined, ignored)


def _refused(file_url: str, reason: str, detail: str, case_id=None, magnification=None) -> dict:
    return {
        "uri": file_url,
        "reason": reason,
        "detail": detail,
        "case_id": case_id,
        "magnification": magnification,
    }


def _from_path(
    file: storage.StoredFile, override: int | None
) -> tuple[SourceImage | None, dict | None]:
    """A BreakHis name, else a case-folder path; or the quarantine record saying why neither."""
    try:
        storage.check_relative_key(file.relpath)
    except ValueError as exc:
        return None, _refused(file.url, "unsafe_key", str(exc))
    try:
        name = parse_breakhis_path(file.relpath)
    except UnparseableName:
        name = None
    if name is not None:
        image = SourceImage(
            file, name.patient_id, name.magnification, "name", name.label, "breakhis"
        )
        return image, None
    folders = file.relpath.split("/")[:-1]
    for depth in range(len(folders) - 1, -1, -1):
        match = _MAG_DIR.match(folders[depth])
        if match is None:
            continue
        value = int(match["mag"])
        case = folders[depth - 1] if depth > 0 else None
        if value not in MAGNIFICATIONS:
            detail = (
                f"folder {folders[depth]!r}: no model serves {value}X (one of {MAGNIFICATIONS})"
            )
            return None, _refused(file.url, "unknown_magnification", detail, case)
        if case is None:
            detail = "a <magnification>X folder straight under SOURCE: put it in a case folder"
            return None, _refused(file.url, "unknown_case", detail, None, value)
        return SourceImage(file, case, value, "folder", None, "case_folders"), None
    case = folders[-1] if folders else None
    if override is None:
        detail = (
            "no <magnification>X folder (SOURCE/<case_id>/<m>X/<name>) and no sidecar: "
            "move it into one, list it in metadata.csv, or pass --magnification"
        )
        return None, _refused(file.url, "unknown_magnification", detail, case)
    if case is None:
        detail = "straight under SOURCE: put it in a case folder or list it in metadata.csv"
        return None, _refused(file.url, "unknown_case", detail, None, override)
    return SourceImage(file, case, override, "override", None, "case_folders"), None


def read_sidecar(uri: str) -> pd.DataFrame:
    """The sidecar as strings, with a ``row`` column naming each row as errors should name it."""
    data = storage.read_bytes(uri)
    if uri.endswith(".csv"):
        try:
            table = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise SourceError(f"{storage.redact(uri)} is not a readable CSV: {exc}") from None
        table.columns = [str(c).strip() for c in table.columns]
        table["row"] = [f"line {i + 2}" for i in range(len(table))]
    else:
        table = storage.read_parquet(uri)
        table = table.astype(object).where(table.notna(), "").astype(str)
        table["row"] = [f"row {i + 1}" for i in range(len(table))]
    unknown = [c for c in table.columns if c not in (*SIDECAR_COLUMNS, "row")]
    missing = [c for c in SIDECAR_REQUIRED if c not in table.columns]
    if unknown or missing:
        problem = "; ".join(
            p
            for p in (
                f"unknown column(s) {unknown}" if unknown else "",
                f"missing column(s) {missing}" if missing else "",
            )
            if p
        )
        raise SourceError(
            f"{storage.redact(uri)}: {problem}; the columns are {', '.join(SIDECAR_REQUIRED)} "
            "and an optional label (benign/malignant): rename or drop the others"
        )
    if "label" not in table.columns:
        table["label"] = ""
    for column in SIDECAR_COLUMNS:
        table[column] = table[column].str.strip()
    return table


def _sidecar_error(uri: str, row: str, problem: str, fix: str) -> SourceError:
    return SourceError(f"{storage.redact(uri)} {row}: {problem}; {fix}")


def _check_sidecar_row(uri: str, row: pd.Series, seen: dict[str, str]) -> int | None:
    """Check one row; return its magnification (None when the cell is empty)."""
    where = row["row"]
    try:
        storage.check_relative_key(row["path"])
    except ValueError:
        raise _sidecar_error(
            uri,
            where,
            f"path {row['path']!r} is not inside SOURCE",
            "give a path relative to the folder holding metadata (no '..', no leading '/', "
            "no scheme)",
        ) from None
    if row["path"] in seen:
        raise _sidecar_error(
            uri, where, f"path {row['path']!r} is listed again", f"it is on {seen[row['path']]}"
        )
    seen[row["path"]] = where
    if not row["case_id"]:
        raise _sidecar_error(uri, where, "empty case_id", "every image needs its case")
    if row["label"] and row["label"].lower() not in LABELS:
        raise _sidecar_error(
            uri, where, f"label {row['label']!r}", f"use one of {LABELS} or leave it empty"
        )
    if not row["magnification"]:
        return None
    text = row["magnification"].upper().removesuffix("X")
    value = int(float(text)) if re.fullmatch(r"\d+(\.0*)?", text) else None
    if value not in MAGNIFICATIONS:
        raise _sidecar_error(
            uri,
            where,
            f"magnification {row['magnification']!r}",
            f"use one of {MAGNIFICATIONS} (40 or 40X), or leave it empty and pass --magnification",
        )
    return value


def _from_sidecar(
    table: pd.DataFrame,
    uri: str,
    files: list[storage.StoredFile],
    source: str,
    override: int | None,
) -> tuple[list[SourceImage], list[dict]]:
    """Images as the sidecar lists them; unlisted and missing files go to quarantine."""
    by_path = {f.relpath: f for f in files}
    seen: dict[str, str] = {}
    images, quarantined = [], []
    for _, row in table.iterrows():
        value = _check_sidecar_row(uri, row, seen)
        label = row["label"].lower() or None
        file = by_path.get(row["path"])
        file_url = storage.join(source, row["path"])
        if file is None:
            detail = f"metadata {row['row']} lists it, but there is no image file at that path"
            quarantined.append(_refused(file_url, "missing_file", detail, row["case_id"], value))
            continue
        origin = "metadata"
        if value is None and override is not None:
            value, origin = override, "override"
        if value is None:
            detail = (
                f"metadata {row['row']} leaves magnification empty: fill it or pass --magnification"
            )
            quarantined.append(_refused(file.url, "unknown_magnification", detail, row["case_id"]))
            continue
        images.append(SourceImage(file, row["case_id"], value, origin, label, "sidecar"))
    for path, file in by_path.items():
        if path not in seen:
            detail = "an image under SOURCE that metadata does not list: add a row for it"
            quarantined.append(_refused(file.url, "not_in_metadata", detail))
    return images, quarantined
