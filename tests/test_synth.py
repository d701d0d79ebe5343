"""Synthetic BreakHis: layout, names, sizes, class balance, determinism and a visible class signal."""

from __future__ import annotations

import numpy as np
from PIL import Image

from dala_model import storage
from dala_model.data.breakhis import MAGNIFICATIONS, SUBTYPES, parse_breakhis_path
from dala_model.data.synth import generate, patients_for


def test_layout_names_sizes_and_modes(tmp_path):
    count = generate(str(tmp_path), patients=8, images_per_patient=2, seed=1, size=(120, 80))
    files = storage.list_file_infos(str(tmp_path))
    assert count == len(files) == 8 * 4 * 2
    names = [parse_breakhis_path(f.relpath) for f in files]  # folders must agree with the names
    assert {n.subtype_code for n in names} == set(SUBTYPES)
    assert {n.magnification for n in names} == set(MAGNIFICATIONS)
    for file, name in zip(files, names, strict=True):
        assert file.relpath == name.archive_path()
        with Image.open(tmp_path / file.relpath) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (120, 80))


def test_benign_fraction_follows_breakhis():
    for patients, benign in ((8, 4), (24, 7), (82, 25)):
        codes = [code for code, _ in patients_for(patients, seed=0)]
        assert sum(SUBTYPES[c][0] == "benign" for c in codes) == benign
        assert len({pid for _, pid in patients_for(patients, seed=0)}) == patients


def test_same_seed_same_bytes_whatever_the_workers(tmp_path, s3_bucket):
    generate(
        str(tmp_path / "a"), patients=2, images_per_patient=1, seed=9, size=(64, 48), workers=1
    )
    generate(f"{s3_bucket}/b", patients=2, images_per_patient=1, seed=9, size=(64, 48), workers=2)
    generate(str(tmp_path / "c"), patients=2, images_per_patient=1, seed=10, size=(64, 48))
    local = {
        f.relpath: (tmp_path / "a" / f.relpath).read_bytes()
        for f in storage.list_file_infos(str(tmp_path / "a"))
    }
    remote = {
        f.relpath: storage.read_bytes(f.url) for f in storage.list_file_infos(f"{s3_bucket}/b")
    }
    assert local == remote
    other = {
        f.relpath: (tmp_path / "c" / f.relpath).read_bytes()
        for f in storage.list_file_infos(str(tmp_path / "c"))
    }
    assert set(other) != set(local) or other != local


def test_malignant_images_carry_more_and_darker_nuclei(tmp_path):
    generate(str(tmp_path), patients=12, images_per_patient=2, seed=2, size=(350, 230))
    stained = {"benign": [], "malignant": []}
    for file in storage.list_file_infos(str(tmp_path)):
        pixels = np.asarray(Image.open(tmp_path / file.relpath), dtype=np.int16)
        nuclei = (pixels[..., 0] < 150) & (pixels[..., 2] > pixels[..., 1])  # purple, dark
        stained[parse_breakhis_path(file.relpath).label].append(nuclei.mean())
    assert np.mean(stained["malignant"]) > 1.3 * np.mean(stained["benign"])
    # ...but not trivially: the classes overlap image by image
    assert min(stained["malignant"]) < max(stained["benign"])


def test_larger_sets_have_cases_with_two_lettered_slides_of_different_subtypes():
    slides = patients_for(40, seed=0)
    names = [
        parse_breakhis_path(f"SOB_{SUBTYPES[code][0][0].upper()}_{code}-{slide}-40-001.png")
        for code, slide in slides
    ]
    by_case: dict[str, list] = {}
    for name in names:
        by_case.setdefault(name.patient_id, []).append(name)
    multi = {case: group for case, group in by_case.items() if len(group) > 1}
    assert len(multi) >= 5 and len(by_case) == len(slides) - len(multi)
    for group in multi.values():
        assert sorted(n.slide_id[-2:] for n in group) == ["AB", "CD"]
        assert len({n.subtype for n in group}) == 2 and len({n.label for n in group}) == 1
    # small sets keep one slide per case, so every split still receives a case of each class
    assert (
        len(
            {
                parse_breakhis_path(f"SOB_B_A-{s}-40-001.png").patient_id
                for _, s in patients_for(8, 0)
            }
        )
        == 8
    )
