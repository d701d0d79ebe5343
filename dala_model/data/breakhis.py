"""BreakHis file names: what each image is, parsed from its path and never guessed.

A BreakHis name reads ``<procedure>_<class>_<subtype>-<yy>-<slide>-<magnification>-<seq>.png``,
e.g. ``SOB_B_A-14-22549AB-40-001.png``: surgical open biopsy, benign, adenosis, patient/slide
``14-22549AB``, 40X, image 1. The official archive also names the class, subtype, slide and
magnification in folders (``benign/SOB/adenosis/SOB_B_A_14-22549AB/40X/``). When those folders are
present they must agree with the file name; a disagreement means the file was moved or renamed by
hand, so the path is rejected (``UnparseableName``, quarantined by ingest) instead of trusting
either side. Flat folders of BreakHis-named files carry no such folders and parse from the name.

The patient is the *case*, not the slide folder. The name's third field is a slide id such as
``14-22549AB``: the case number ``14-22549`` followed by the letters of the slides cut from it.
BreakHis cases with several lettered slides are one patient: in the public archive 9 case numbers
cover 20 slide folders (14-22549 has AB, CD and G; 14-29960AB is a fibroadenoma and 14-29960CD an
adenosis of the same case), so the 24 benign "patients" of a folder count are about 16 cases.
``slide_id`` keeps the folder's id; ``patient_id`` is the case number (the id without its letters),
and every patient-disjoint split groups by it, so two slides of one case never straddle a split.

Slide ``14-13412`` is a known archive quirk: it appears under both ductal (DC) and lobular (LC)
carcinoma. Each file keeps the subtype its own name gives, and both share the patient id
``14-13412``, so that patient's images always land in one split together, whatever their subtype;
both subtypes are malignant, so its label is unique.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

SUBTYPES: dict[str, tuple[str, str]] = {
    "A": ("benign", "adenosis"),
    "F": ("benign", "fibroadenoma"),
    "PT": ("benign", "phyllodes_tumor"),
    "TA": ("benign", "tubular_adenoma"),
    "DC": ("malignant", "ductal_carcinoma"),
    "LC": ("malignant", "lobular_carcinoma"),
    "MC": ("malignant", "mucinous_carcinoma"),
    "PC": ("malignant", "papillary_carcinoma"),
}
LABELS = ("benign", "malignant")
CLASS_CODES = {"B": "benign", "M": "malignant"}
MAGNIFICATIONS = (40, 100, 200, 400)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")

_SUBTYPE_ALT = "|".join(sorted(SUBTYPES, key=len, reverse=True))
_NAME = re.compile(
    rf"^(?P<procedure>[A-Z]{{2,5}})_(?P<cls>[BM])_(?P<code>{_SUBTYPE_ALT})"
    r"-(?P<patient>\d{2}-[0-9A-Za-z]+)-(?P<mag>40|100|200|400)-(?P<seq>\d{1,4})"
    r"\.(?:png|jpe?g|tiff?)$",
    re.IGNORECASE,
)
_SLIDE_DIR = re.compile(
    rf"^(?P<procedure>[A-Z]{{2,5}})_(?P<cls>[BM])_(?P<code>{_SUBTYPE_ALT})_(?P<patient>\d{{2}}-[0-9A-Za-z]+)$"
)
_MAG_DIR = re.compile(r"^(?P<mag>\d+)X$")
_SUBTYPE_NAMES = {name: code for code, (_, name) in SUBTYPES.items()}
_CASE = re.compile(r"^\d{2}-\d+")


def case_of(slide_id: str) -> str:
    """The case (patient) a BreakHis slide id belongs to: ``14-22549AB`` -> ``14-22549``."""
    match = _CASE.match(slide_id)
    if match is None:
        raise UnparseableName(f"{slide_id!r} is not a BreakHis slide id like '14-22549AB'")
    return match.group(0)


def check_magnifications(values: Iterable[int], what: str = "magnification") -> list[int]:
    """``values`` as a list, or a ValueError naming each value that is not a BreakHis magnification.

    The one check of this rule: the training config, the flows' parameters and ``dala promote``
    all call it, so they accept and refuse the same values with the same message."""
    values = list(values)
    unknown = [value for value in values if value not in MAGNIFICATIONS]
    if unknown:
        named = ", ".join(repr(value) for value in unknown)
        raise ValueError(f"{what} must be one of {MAGNIFICATIONS}, got {named}")
    return values


class UnparseableName(ValueError):
    """A path that is not a BreakHis image name, or whose folders contradict its name."""


@dataclass(frozen=True)
class BreakHisName:
    procedure: str
    label: str
    subtype_code: str
    subtype: str
    slide_id: str  # the slide folder's id, e.g. 14-22549AB
    magnification: int
    seq: int

    @property
    def patient_id(self) -> str:
        """The case number (``14-22549``): the unit every patient-disjoint split groups by."""
        return case_of(self.slide_id)

    @property
    def label_id(self) -> int:
        """0 benign, 1 malignant: the order every model output uses."""
        return LABELS.index(self.label)

    def filename(self, suffix: str = ".png") -> str:
        cls = self.label[0].upper()
        return (
            f"{self.procedure}_{cls}_{self.subtype_code}-{self.slide_id}"
            f"-{self.magnification}-{self.seq:03d}{suffix}"
        )

    def archive_path(self, suffix: str = ".png") -> str:
        """The file's path in the official archive layout, below ``histology_slides/``."""
        cls = self.label[0].upper()
        slide = f"{self.procedure}_{cls}_{self.subtype_code}_{self.slide_id}"
        return (
            f"breast/{self.label}/{self.procedure}/{self.subtype}/{slide}"
            f"/{self.magnification}X/{self.filename(suffix)}"
        )


def parse_breakhis_path(path: str) -> BreakHisName:
    """Parse a BreakHis file name (or any path ending in one); raise ``UnparseableName`` if not."""
    parts = [p for p in str(path).replace("\\", "/").split("/") if p]
    if not parts:
        raise UnparseableName(f"{path!r}: empty path")
    match = _NAME.match(parts[-1])
    if match is None:
        raise UnparseableName(
            f"{parts[-1]!r} is not a BreakHis name like 'SOB_B_A-14-22549AB-40-001.png'"
        )
    case_of(match["patient"])  # a slide id must start with its case number
    code = match["code"].upper()
    label, subtype = SUBTYPES[code]
    if CLASS_CODES[match["cls"].upper()] != label:
        raise UnparseableName(
            f"{parts[-1]!r}: class {match['cls']} contradicts subtype {code} ({label})"
        )
    name = BreakHisName(
        procedure=match["procedure"].upper(),
        label=label,
        subtype_code=code,
        subtype=subtype,
        slide_id=match["patient"],
        magnification=int(match["mag"]),
        seq=int(match["seq"]),
    )
    _check_folders(path, parts[:-1], name)
    return name


def _check_folders(path: str, folders: list[str], name: BreakHisName) -> None:
    """Folders that state a class, subtype, slide or magnification must agree with the name."""
    for folder in folders:
        found: dict[str, object] = {}
        if folder in LABELS:
            found["label"] = folder
        elif folder in _SUBTYPE_NAMES:
            found["subtype"] = folder
        elif slide := _SLIDE_DIR.match(folder):
            found.update(
                label=CLASS_CODES[slide["cls"]],
                subtype_code=slide["code"],
                slide_id=slide["patient"],
            )
        elif mag := _MAG_DIR.match(folder):
            found["magnification"] = int(mag["mag"])
        for field, value in found.items():
            if getattr(name, field) != value:
                raise UnparseableName(
                    f"{path!r}: folder {folder!r} says {field}={value!r} "
                    f"but the file name says {getattr(name, field)!r}"
                )
