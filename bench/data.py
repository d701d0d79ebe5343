"""Benchmark data: synthetic BreakHis PNGs (``dala_model.data.synth``) ingested into a local root.

Synthetic images have the real archive's size (700x460), layout and PNG encoding, so decode and
ingest costs are realistic, and any number of them can be made without downloads. Generation runs
in several processes, each with its own seed and output folder: ``synth.generate`` renders in
threads, but part of the rendering holds the GIL, so processes scale further on many cores.

The decoder comparison also uses the real BreakHis sample beside the repository, each image
re-encoded in every PNG flavour a decoder must handle, and damaged copies (truncated, bit-flipped).
"""

from __future__ import annotations

import io
import math
import os
import random
import shutil
import struct
import zlib
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dala_model.data import synth
from dala_model.data.breakhis import MAGNIFICATIONS

IMAGES_PER_PATIENT = 5


def patients_for_images(images: int, per_patient: int = IMAGES_PER_PATIENT) -> int:
    """Patients needed for at least ``images`` PNGs (synth writes all four magnifications)."""
    return max(2, math.ceil(images / (len(MAGNIFICATIONS) * per_patient)))


def _generate(job: tuple[str, int, int, int, tuple[int, int], int]) -> int:
    out, patients, per_patient, seed, size, threads = job
    return synth.generate(out, patients, per_patient, seed, size=size, workers=threads)


def synthesize(
    out: Path,
    patients: int,
    per_patient: int = IMAGES_PER_PATIENT,
    seed: int = 0,
    size: tuple[int, int] = (700, 460),
    processes: int | None = None,
) -> list[Path]:
    """Generate ``patients x 4 x per_patient`` PNGs under ``out`` (in ``part-<k>`` folders when
    several processes are used); return the sorted file list."""
    processes = max(1, min(processes or os.cpu_count() or 1, patients // 2))
    shares = [patients // processes + (k < patients % processes) for k in range(processes)]
    if processes == 1:
        _generate((str(out), patients, per_patient, seed, size, os.cpu_count() or 1))
    else:
        jobs = [
            (str(out / f"part-{k}"), share, per_patient, seed * 1000 + k, size, 2)
            for k, share in enumerate(shares)
        ]
        with ProcessPoolExecutor(processes) as pool:
            list(pool.map(_generate, jobs))
    return sorted(out.rglob("*.png"))


def keep_magnification(files: list[Path], magnification: int) -> list[Path]:
    """Delete every file not at ``magnification`` (so ingest reads only what is trained on)."""
    kept = []
    for path in files:
        if path.parent.name == f"{magnification}X":
            kept.append(path)
        else:
            path.unlink()
    return kept


def total_bytes(files: list[Path]) -> int:
    return sum(path.stat().st_size for path in files)


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def real_sample_files() -> list[Path]:
    """The real BreakHis PNGs of ``../shared/breakhis-sample`` (beside the repository), or []."""
    here = Path(__file__).resolve().parents[1]
    for base in (here.parent, here):
        sample = base / "shared" / "breakhis-sample" / "histology_slides"
        if sample.is_dir():
            return sorted(sample.rglob("*.png"))
    return []


def mode_variants(png: bytes) -> dict[str, bytes]:
    """One image re-encoded as each PNG flavour a decoder must get right (made with Pillow; the
    16-bit RGB ones with imagecodecs, when installed, since Pillow cannot write them)."""
    rgb = Image.open(io.BytesIO(png)).convert("RGB")
    array = np.asarray(rgb)
    alpha = (np.arange(array.shape[1]) % 256).astype(np.uint8)[None, :].repeat(array.shape[0], 0)
    rgba = Image.fromarray(np.dstack([array, alpha]), "RGBA")
    variants = {
        "RGB": _encode(rgb),
        "RGBA": _encode(rgba),
        "L": _encode(rgb.convert("L")),
        "LA": _encode(rgba.convert("LA")),
        "P": _encode(rgb.quantize(256)),
        "P+tRNS": _encode(rgb.quantize(256), transparency=3),
        "P 4-bit": _encode(rgb.quantize(16), bits=4),
        "1-bit": _encode(rgb.convert("1")),
        "I;16": _encode(Image.fromarray(array[..., 0].astype(np.uint16) * 257)),
    }
    try:
        import imagecodecs
    except ImportError:
        return variants
    wide = array.astype(np.uint16) * 257 + np.uint16(0x7F)
    variants["RGB 16-bit"] = imagecodecs.png_encode(wide)
    variants["RGBA 16-bit"] = imagecodecs.png_encode(np.dstack([wide, wide[..., :1]]))
    return variants


def damaged_pngs(png: bytes, count: int = 40, seed: int = 0) -> list[bytes]:
    """``count`` truncations of ``png`` and ``count`` single bit flips inside its IDAT data with
    every chunk CRC fixed up (so only the zlib stream shows the damage)."""
    rng = random.Random(seed)
    idat = [(pos, length) for pos, length, kind in _chunks(png) if kind == b"IDAT"]
    files = [png[: rng.randrange(64, len(png))] for _ in range(count)]
    for _ in range(count):
        pos, length = rng.choice(idat)
        flipped = bytearray(png)
        flipped[pos + 8 + rng.randrange(length)] ^= 1 << rng.randrange(8)
        for pos2, length2, _ in _chunks(bytes(flipped)):
            body = bytes(flipped[pos2 + 4 : pos2 + 8 + length2])
            flipped[pos2 + 8 + length2 : pos2 + 12 + length2] = struct.pack(">I", zlib.crc32(body))
        files.append(bytes(flipped))
    return files


def _chunks(png: bytes) -> Iterator[tuple[int, int, bytes]]:
    pos = 8
    while pos + 8 <= len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        yield pos, length, png[pos + 4 : pos + 8]
        pos += 12 + length


def _encode(image: Image.Image, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **options)
    return buffer.getvalue()
