"""The BreakHis name parser: every subtype and magnification, both layouts, the quirk, bad names."""

from __future__ import annotations

from pathlib import Path

import pytest

from dala_model.data.breakhis import MAGNIFICATIONS, SUBTYPES, UnparseableName, parse_breakhis_path


@pytest.mark.parametrize("magnification", MAGNIFICATIONS)
@pytest.mark.parametrize("code", sorted(SUBTYPES))
def test_every_subtype_and_magnification_in_archive_and_flat_layouts(code, magnification):
    label, subtype = SUBTYPES[code]
    cls = label[0].upper()
    filename = f"SOB_{cls}_{code}-14-22549AB-{magnification}-007.png"
    archive = (
        f"BreaKHis_v1/histology_slides/breast/{label}/SOB/{subtype}/"
        f"SOB_{cls}_{code}_14-22549AB/{magnification}X/{filename}"
    )
    for path in (archive, filename, f"s3://bucket/flat/{filename}"):
        name = parse_breakhis_path(path)
        assert (name.procedure, name.label, name.subtype_code, name.subtype) == (
            "SOB",
            label,
            code,
            subtype,
        )
        assert (name.patient_id, name.slide_id) == ("14-22549", "14-22549AB")
        assert (name.magnification, name.seq) == (magnification, 7)
        assert name.label_id == (0 if label == "benign" else 1)
    assert name.archive_path() == archive.split("histology_slides/")[1]


def test_real_archive_names():
    name = parse_breakhis_path(
        "breast/malignant/SOB/ductal_carcinoma/SOB_M_DC_14-2980/40X/SOB_M_DC-14-2980-40-009.png"
    )
    assert (name.patient_id, name.subtype, name.magnification, name.seq) == (
        "14-2980",
        "ductal_carcinoma",
        40,
        9,
    )


def test_quirk_slide_14_13412_keeps_each_subtype_and_one_patient():
    dc = parse_breakhis_path(
        "breast/malignant/SOB/ductal_carcinoma/SOB_M_DC_14-13412/100X/SOB_M_DC-14-13412-100-001.png"
    )
    lc = parse_breakhis_path(
        "breast/malignant/SOB/lobular_carcinoma/SOB_M_LC_14-13412/100X/SOB_M_LC-14-13412-100-001.png"
    )
    assert (dc.subtype_code, lc.subtype_code) == ("DC", "LC")
    assert dc.patient_id == lc.patient_id == "14-13412"
    assert dc.label == lc.label == "malignant"


@pytest.mark.parametrize(
    "path, message",
    [
        ("SOB_B_A-14-22549AB-50-001.png", "not a BreakHis name"),  # magnification 50
        ("SOB_B_XX-14-22549AB-40-001.png", "not a BreakHis name"),  # unknown subtype
        ("SOB_B_DC-14-22549AB-40-001.png", "contradicts subtype"),  # benign ductal carcinoma
        ("SOB_B_A-14-22549AB-40-001.txt", "not a BreakHis name"),
        ("SOB_B_A_14-22549AB-40-001.png", "not a BreakHis name"),  # '_' where '-' belongs
        ("image_0001.png", "not a BreakHis name"),
        ("", "empty path"),
        # folders that contradict the name: moved or renamed by hand
        ("SOB_B_A_14-22549CD/40X/SOB_B_A-14-22549AB-40-001.png", "slide_id"),
        ("SOB_B_A_14-22549AB/100X/SOB_B_A-14-22549AB-40-001.png", "magnification"),
        ("breast/malignant/SOB/adenosis/x/SOB_B_A-14-22549AB-40-001.png", "label"),
        ("breast/benign/SOB/fibroadenoma/SOB_B_A-14-22549AB-40-001.png", "subtype"),
    ],
)
def test_bad_names_are_rejected_with_a_reason(path, message):
    with pytest.raises(UnparseableName, match=message):
        parse_breakhis_path(path)


def test_extensions_are_case_insensitive_and_other_image_formats_parse():
    for suffix in (".PNG", ".jpg", ".jpeg", ".tif", ".TIFF"):
        assert parse_breakhis_path(f"SOB_M_PC-15-190EF-400-12{suffix}").seq == 12


def test_lettered_slides_of_one_case_are_one_patient_in_the_real_sample():
    """../shared/breakhis-sample: 14-22549AB/CD/G and 14-29960AB (fibroadenoma) + CD (adenosis)."""
    root = Path(__file__).resolve().parents[2] / "shared" / "breakhis-sample"
    if not root.is_dir():
        pytest.skip("the real BreakHis sample is not beside this checkout")
    names = [parse_breakhis_path(str(p.relative_to(root))) for p in root.rglob("*.png")]
    slides: dict[str, set[str]] = {}
    subtypes: dict[str, set[str]] = {}
    for name in names:
        slides.setdefault(name.patient_id, set()).add(name.slide_id)
        subtypes.setdefault(name.patient_id, set()).add(name.subtype)
    assert slides["14-22549"] == {"14-22549AB", "14-22549CD", "14-22549G"}
    assert slides["14-29960"] == {"14-29960AB", "14-29960CD"}
    assert subtypes["14-29960"] == {"fibroadenoma", "adenosis"}
    n_slides = sum(len(s) for s in slides.values())
    assert len(slides) < n_slides  # folders collapse into fewer cases


def test_a_slide_id_must_start_with_its_case_number():
    with pytest.raises(UnparseableName, match="slide id"):
        parse_breakhis_path("SOB_B_A-14-AB22549-40-001.png")
