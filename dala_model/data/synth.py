"""Synthetic BreakHis: H&E-looking PNGs in the official archive layout, for demos and tests.

Each image is pink, textured stroma with purple nuclei. The class signal is the one pathologists
use: malignant tissue has more nuclei, larger ones, more variable in size and shape (pleomorphic),
darker (hyperchromatic) and less organised (fewer tight clusters). Every patient draws its own
multipliers for density, size and stain colour, and every image adds noise, so the two classes
overlap: a CNN has to learn the signal, and a model trained on shuffled labels cannot.

Rendering is vectorised: textures are low-resolution noise upscaled by Pillow and nuclei are filled
polygons drawn by ``ImageDraw`` in C, so a 700x460 image renders in about 10 ms. There is no
per-pixel noise: it would triple the PNG encoding time (incompressible) and carries no class signal.

About 31% of patients are benign (as in BreakHis: 2,480 of 7,909 images), but at least 4 per class
from 8 patients up; subtypes are dealt round-robin within each class, so 8 or more patients cover
all 8 subtypes. Every slide folder gets ``images_per_patient`` images at each of the four
magnifications. ``patients`` counts slide folders: from 6 folders per class up, some cases have two
lettered slides (see :func:`patients_for`), so there are fewer cases (patients) than folders.
"""

from __future__ import annotations

import io
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dala_model import storage
from dala_model.data.breakhis import MAGNIFICATIONS, SUBTYPES, BreakHisName, case_of

log = logging.getLogger(__name__)

BENIGN_FRACTION = 0.31
PNG_COMPRESS_LEVEL = 1  # zlib's fastest: encoding dominates generation time; ~370 KB files
# Nucleus radius (pixels) and count per image at each magnification (at 700x460).
_RADIUS = {40: 2.6, 100: 4.2, 200: 7.0, 400: 11.5}
_COUNT = {40: 900, 100: 420, 200: 170, 400: 70}
_BENIGN_CODES = [c for c, (label, _) in SUBTYPES.items() if label == "benign"]
_MALIGNANT_CODES = [c for c, (label, _) in SUBTYPES.items() if label == "malignant"]


def patients_for(patients: int, seed: int) -> list[tuple[str, str]]:
    """``(subtype_code, slide_id)`` per synthetic slide folder: ~31% benign, subtypes round-robin.

    As in the archive, some cases have several lettered slides: in a class with 6 or more slide
    folders, every fourth folder is a second slide (``CD``) of the case before it (``AB``), which
    round-robin subtypes make a different subtype of the same class (14-29960AB is a fibroadenoma,
    14-29960CD an adenosis). Smaller sets keep one slide per case, so every split still gets a case.
    """
    if patients < 2:
        raise ValueError(f"patients must be >= 2 (one per class at least), got {patients}")
    rng = np.random.default_rng([seed, 0])
    floor = min(4, patients // 2)  # 4 per class from 8 patients up, so all 8 subtypes appear
    benign = min(patients - floor, max(floor, round(patients * BENIGN_FRACTION)))
    numbers = iter(rng.choice(np.arange(1000, 30000), size=patients, replace=False).tolist())
    slides = []
    for codes, count in ((_BENIGN_CODES, benign), (_MALIGNANT_CODES, patients - benign)):
        plain = ["", "", "E", "C"]
        for j in range(count):
            year = 14 + len(slides) % 2
            if count >= 6 and j % 4 == 3:
                code, case = slides[-1][0], case_of(slides[-1][1])
                slides[-1] = (code, f"{case}AB")
                slides.append((codes[j % 4], f"{case}CD"))
                continue
            slides.append((codes[j % 4], f"{year}-{next(numbers)}{plain[j % len(plain)]}"))
    return slides


def generate(
    out: str,
    patients: int,
    images_per_patient: int,
    seed: int,
    size: tuple[int, int] = (700, 460),
    workers: int | None = None,
) -> int:
    """Write ``patients x 4 magnifications x images_per_patient`` PNGs under ``out``; return the count.

    Paths follow the archive layout below ``out``:
    ``breast/<label>/SOB/<subtype>/SOB_<B|M>_<code>_<patient>/<mag>X/SOB_<B|M>_<code>-<patient>-<mag>-<seq>.png``.
    Every image has its own seeded generator, so the same arguments give the same bytes whatever
    the number of worker threads (Pillow releases the GIL while drawing, resizing and encoding).
    """
    if images_per_patient < 1:
        raise ValueError(f"images_per_patient must be >= 1, got {images_per_patient}")
    width, height = size
    if width < 32 or height < 32:
        raise ValueError(f"size must be at least 32x32 pixels, got {size}")
    started = time.perf_counter()
    jobs = []
    for index, (code, slide_id) in enumerate(patients_for(patients, seed)):
        label, subtype = SUBTYPES[code]
        style = _patient_style(label == "malignant", np.random.default_rng([seed, 2, index]))
        for magnification in MAGNIFICATIONS:
            for seq in range(1, images_per_patient + 1):
                name = BreakHisName("SOB", label, code, subtype, slide_id, magnification, seq)
                jobs.append((name, style, [seed, 3, index, magnification, seq]))

    def write(job: tuple[BreakHisName, dict, list[int]]) -> None:
        name, style, key = job
        image = render(style, name.magnification, size, np.random.default_rng(key))
        buffer = io.BytesIO()
        image.save(buffer, "PNG", compress_level=PNG_COMPRESS_LEVEL)
        storage.write_bytes_atomic(storage.join(out, name.archive_path()), buffer.getvalue())

    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        for _ in pool.map(write, jobs):
            pass
    seconds = time.perf_counter() - started
    log.info(
        "wrote %d synthetic images in %.1f s (%.1f images/s)",
        len(jobs),
        seconds,
        len(jobs) / seconds,
    )
    return len(jobs)


def generate_cases(
    out: str,
    cases: int,
    images_per_magnification: int,
    seed: int,
    size: tuple[int, int] = (350, 230),
    magnifications: tuple[int, ...] = MAGNIFICATIONS,
) -> list[str]:
    """An unlabelled drop as a clinic or scanner sends it; return the paths written, sorted.

    Case folders with non-BreakHis names, so nothing but the folders says what an image is:
    ``<out>/case-<NNNN>/<m>X/scan_<k>.png`` (``k`` counts on across a case's magnifications).
    Cases alternate benign- and malignant-looking tissue (drawn as :func:`generate` draws it),
    but no label is written anywhere. Seeded like :func:`generate`: same arguments, same bytes.
    """
    if cases < 1 or images_per_magnification < 1:
        raise ValueError(
            f"cases and images_per_magnification must be >= 1, got {cases}, {images_per_magnification}"
        )
    numbers = np.random.default_rng([seed, 4]).choice(np.arange(1, 10000), cases, replace=False)
    written = []
    for index, number in enumerate(numbers.tolist()):
        style = _patient_style(index % 2 == 1, np.random.default_rng([seed, 5, index]))
        scan = 0
        for magnification in magnifications:
            for _ in range(images_per_magnification):
                scan += 1
                rng = np.random.default_rng([seed, 6, index, magnification, scan])
                buffer = io.BytesIO()
                render(style, magnification, size, rng).save(
                    buffer, "PNG", compress_level=PNG_COMPRESS_LEVEL
                )
                path = f"case-{number:04d}/{magnification}X/scan_{scan}.png"
                storage.write_bytes_atomic(storage.join(out, path), buffer.getvalue())
                written.append(path)
    return sorted(written)


def _patient_style(malignant: bool, rng: np.random.Generator) -> dict[str, float | np.ndarray]:
    """Per-patient drawing parameters: class means, jittered so the classes overlap."""
    jitter = lambda sigma: float(np.exp(rng.normal(0, sigma)))  # noqa: E731
    return {
        "density": (1.4 if malignant else 1.0) * jitter(0.3),
        "radius": (1.15 if malignant else 1.0) * jitter(0.12),
        "size_cv": (0.30 if malignant else 0.15) * jitter(0.25),
        "irregularity": (0.16 if malignant else 0.07) * jitter(0.3),
        "darkness": float(np.clip((0.78 if malignant else 0.72) + rng.normal(0, 0.07), 0.4, 1.0)),
        "clustering": float(np.clip((0.35 if malignant else 0.7) + rng.normal(0, 0.12), 0.0, 1.0)),
        "stroma": np.array([228.0, 130.0, 196.0]) + rng.normal(0, 8, 3),
        "nucleus": np.array([88.0, 40.0, 130.0]) + rng.normal(0, 10, 3),
    }


def render(
    style: dict,
    magnification: int,
    size: tuple[int, int],
    rng: np.random.Generator,
) -> Image.Image:
    """One H&E-looking RGB tile of ``size`` (width, height) for a patient's ``style``."""
    width, height = size
    stroma = _stroma(style["stroma"], width, height, rng)
    mask = _nuclei_mask(style, magnification, width, height, width / 700, rng)
    colour = style["nucleus"] * (1.25 - 0.5 * style["darkness"]) + rng.normal(0, 4, 3)
    nuclei = Image.new("RGB", size, tuple(int(c) for c in np.clip(colour, 0, 255)))
    return Image.composite(nuclei, stroma, mask)


def _stroma(base: np.ndarray, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Pink stroma with blotchy stain variation, fibre streaks and pale (lumen/fat) areas.

    Drawn at a quarter of the resolution (it is smooth) and upscaled bicubically by Pillow.
    """
    w, h = max(8, width // 4), max(8, height // 4)
    blotch = _smooth_noise(w, h, (9, 6), rng)
    cells = (8, 60) if rng.random() < 0.5 else (60, 8)
    fibres = _smooth_noise(w, h, cells, rng)
    grain = _smooth_noise(w, h, (w // 2, h // 2), rng)
    pale = np.clip((_smooth_noise(w, h, (6, 4), rng) - 0.4) * 3, 0, 1)[..., None]
    shade = (1.0 + 0.06 * blotch + 0.10 * fibres + 0.05 * grain)[..., None]
    pixels = base * shade * (1 - pale) + np.array([245.0, 235.0, 240.0]) * pale
    small = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    return small.resize((width, height), Image.Resampling.BICUBIC)


def _smooth_noise(
    width: int, height: int, cells: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """Smooth random field in about [-1, 1]: coarse noise upscaled bicubically."""
    coarse = rng.normal(0.5, 0.18, (cells[1], cells[0])).clip(0, 1)
    field = Image.fromarray((coarse * 255).astype(np.uint8), "L").resize(
        (width, height), Image.Resampling.BICUBIC
    )
    return np.asarray(field, dtype=np.float32) / 127.5 - 1.0


def _nuclei_mask(
    style: dict, magnification: int, width: int, height: int, scale: float, rng: np.random.Generator
) -> Image.Image:
    """Nuclei as filled irregular polygons on an 8-bit mask (value = stain opacity), softened."""
    area = width * height / (700 * 460)
    count = rng.poisson(_COUNT[magnification] * style["density"] * area * rng.uniform(0.8, 1.25))
    clustered = rng.random(count) < style["clustering"]
    centres = rng.uniform((0, 0), (width, height), size=(max(1, count // 12 + 1), 2))
    owner = rng.integers(0, len(centres), count)
    spread = 0.09 * min(width, height)
    xy = np.where(
        clustered[:, None],
        centres[owner] + rng.normal(0, spread, (count, 2)),
        rng.uniform((0, 0), (width, height), size=(count, 2)),
    )
    radius = (
        _RADIUS[magnification]
        * scale
        * style["radius"]
        * np.exp(rng.normal(0, style["size_cv"], count))
    )
    vertices = 9
    angles = np.linspace(0, 2 * np.pi, vertices, endpoint=False) + rng.uniform(0, np.pi, (count, 1))
    elongation = 1 + np.abs(rng.normal(0, 0.15 + style["irregularity"], (count, 1)))
    wobble = 1 + rng.normal(0, style["irregularity"], (count, vertices)).clip(-0.6, 0.6)
    tilt = rng.uniform(0, np.pi, (count, 1))
    rx = radius[:, None] * wobble * np.cos(angles) * elongation
    ry = radius[:, None] * wobble * np.sin(angles) / elongation
    px = xy[:, :1] + rx * np.cos(tilt) - ry * np.sin(tilt)
    py = xy[:, 1:] + rx * np.sin(tilt) + ry * np.cos(tilt)
    polygons = np.stack([px, py], axis=-1).reshape(count, 2 * vertices).tolist()
    opacity = (255 * np.clip(style["darkness"] + rng.normal(0, 0.08, count), 0.3, 1.0)).astype(int)
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    for polygon, fill in zip(polygons, opacity.tolist(), strict=True):
        draw.polygon(polygon, fill=fill)
    return mask.filter(ImageFilter.BoxBlur(max(0.5, 0.6 * scale)))
