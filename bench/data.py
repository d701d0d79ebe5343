"""Benchmark data: synthetic BreakHis PNGs (``dala_model.data.synth``) ingested into a local root.

Synthetic images have the real archive's size (700x460), layout and PNG encoding, so decode and
ingest costs are realistic, and any number of them can be made without downloads. Generation runs
in several processes, each with its own seed and output folder: ``synth.generate`` renders in
threads, but part of the rendering holds the GIL, so processes scale further on many cores.
"""

from __future__ import annotations

import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

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
