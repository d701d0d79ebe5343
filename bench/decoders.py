"""ingest-decoders: the PNG decoders ingest could use, against Pillow (part of ``bench.ingest``).

Candidates: Pillow, pyspng, OpenCV (``cv2.imdecode``), imagecodecs' libpng and libspng decoders,
torchvision.io's ``decode_png``/``decode_image``, and ours, ``dala_model.data._decode.decode_rgb``
(the fast decoder where it is proven identical, Pillow otherwise), each in its own RGB mode.
Measured on the real BreakHis sample (../shared/breakhis-sample, when present) and on the
synthetic PNGs, in interleaved rounds (each ratio to Pillow taken per round, then the median):

- images/s on one thread and on ingest's threads;
- pixel identity with Pillow's ``convert("RGB")`` on every image, and on each PNG flavour
  (``bench.data.mode_variants``: RGBA, gray, palette, 16-bit, ...);
- whether a pure-Python thread runs during a decode call (the GIL is released, so ingest's
  threads decode in parallel);
- strictness on damaged copies (``bench.data.damaged_pngs``): a decoder that returns pixels where
  Pillow refuses the file would let corrupt images into the manifest. It runs in a fresh
  interpreter per decoder (``python -m bench.decoders NAME PNG``), so a decoder that crashes is
  recorded as crashing instead of ending the benchmark.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.data import damaged_pngs, mode_variants, real_sample_files
from bench.harness import Goal, cpu_model, entry, median
from dala_model.data import _decode


def _native_to_rgb(pixels: np.ndarray) -> np.ndarray:
    """A decoder's native output (gray, gray+alpha, RGB, RGBA) as RGB, dtype left as decoded."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.shape[2] in (1, 2):
        pixels = np.repeat(pixels[..., :1], 3, axis=2)
    return np.ascontiguousarray(pixels[..., :3])


def _pil_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def decoders() -> dict[str, Callable[[bytes], np.ndarray] | str]:
    """Each candidate as ``bytes -> RGB array`` (the decoder's own RGB mode where it has one), or
    the reason it is unavailable here."""
    found: dict[str, Callable[[bytes], np.ndarray] | str] = {
        "pil": _pil_rgb,
        "ours (decode_rgb)": _decode.decode_rgb,
    }
    try:
        import pyspng

        found["pyspng"] = lambda data: pyspng.load(data, format="RGB")
    except ImportError as exc:
        found["pyspng"] = f"not installed: {exc}"
    try:
        import cv2

        flag = getattr(cv2, "IMREAD_COLOR_RGB", None)
        found["opencv"] = lambda data: (
            cv2.imdecode(np.frombuffer(data, np.uint8), flag)
            if flag is not None
            else cv2.cvtColor(
                cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
            )
        )
    except ImportError as exc:
        found["opencv"] = f"not installed: {exc}"
    try:
        import imagecodecs

        found["imagecodecs png (libpng)"] = lambda d: _native_to_rgb(imagecodecs.png_decode(d))
        found["imagecodecs spng (libspng)"] = lambda d: _native_to_rgb(imagecodecs.spng_decode(d))
    except ImportError as exc:
        found["imagecodecs png (libpng)"] = found["imagecodecs spng (libspng)"] = (
            f"not installed: {exc}"
        )
    try:
        import torch
        from torchvision.io import ImageReadMode, decode_image, decode_png

        def _tensor(data: bytes) -> torch.Tensor:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8)

        found["torchvision decode_png"] = lambda d: (
            decode_png(_tensor(d), ImageReadMode.RGB).permute(1, 2, 0).numpy()
        )
        found["torchvision decode_image"] = lambda d: (
            decode_image(_tensor(d), ImageReadMode.RGB).permute(1, 2, 0).numpy()
        )
    except ImportError as exc:
        found["torchvision decode_png"] = found["torchvision decode_image"] = (
            f"not installed: {exc}"
        )
    return found


def _decode_all(fn: Callable[[bytes], np.ndarray], blobs: list[bytes], workers: int) -> None:
    if workers == 1:
        for blob in blobs:
            fn(blob)
        return
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fn, blobs))


def _identical(fn: Callable[[bytes], np.ndarray], data: bytes, expected: np.ndarray) -> bool:
    try:
        got = fn(data)
    except Exception:  # a decoder that refuses a valid file is not identical
        return False
    return got.dtype == np.uint8 and got.shape == expected.shape and np.array_equal(got, expected)


def _releases_gil(fn: Callable[[bytes], np.ndarray], data: bytes, attempts: int = 5) -> str:
    """In how many of ``attempts`` decode calls a pure-Python counter thread made progress, with a
    switch interval far longer than the call (a GIL holder leaves the counter at zero)."""
    fn(data)  # warm-up: first-call costs (imports, allocations) are not the decoder's
    previous = sys.getswitchinterval()
    sys.setswitchinterval(0.25)
    progressed = 0
    try:
        for _ in range(attempts):
            count, stop, started = [0], threading.Event(), threading.Event()

            def counter(count=count, stop=stop, started=started) -> None:
                started.set()
                while not stop.is_set():
                    count[0] += 1

            thread = threading.Thread(target=counter)
            thread.start()
            started.wait()
            count[0] = 0
            fn(data)
            progressed += count[0] > 0
            stop.set()
            thread.join()
    finally:
        sys.setswitchinterval(previous)
    return f"{progressed}/{attempts}"


def _strictness(name: str, png: Path) -> dict[str, Any]:
    """Run :func:`_strictness_child` for one decoder in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.decoders", name, str(png)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        cwd=Path(__file__).resolve().parents[1],
    )
    if done.returncode < 0:
        return {"crashed": signal.Signals(-done.returncode).name, "strict": False}
    if done.returncode != 0:
        return {"error": done.stderr[-500:], "strict": False}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _strictness_child(name: str, png: str) -> None:
    fn = decoders()[name]
    assert callable(fn), fn
    damaged = damaged_pngs(Path(png).read_bytes())
    refused = accepted = wrong = 0
    for data in damaged:
        try:
            expected = _pil_rgb(data)
        except Exception:
            refused += 1
            try:
                fn(data)
                accepted += 1
            except Exception:
                pass
            continue
        wrong += not _identical(fn, data, expected)
    report = {
        "damaged_files": len(damaged),
        "pil_refused": refused,
        "accepted_where_pil_refused": accepted,
        "differs_where_pil_decoded": wrong,
        "strict": accepted == 0 and wrong == 0,
    }
    print(json.dumps(report))


def _throughputs(
    found: dict[str, Callable[[bytes], np.ndarray]], blobs: list[bytes], workers: int, reps: int
) -> dict[tuple[str, int], list[float]]:
    """Images/s per (decoder, threads) and round; the order alternates between rounds."""
    names = list(found)
    measured: dict[tuple[str, int], list[float]] = {(n, w): [] for n in names for w in (1, workers)}
    for name in names:  # warm-up
        _decode_all(found[name], blobs[:4], 1)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            for threads in sorted({1, workers}):
                started = time.perf_counter()
                _decode_all(found[name], blobs, threads)
                measured[name, threads].append(len(blobs) / (time.perf_counter() - started))
    return measured


def _per_set(
    found: dict[str, Callable[[bytes], np.ndarray]], blobs: list[bytes], workers: int, reps: int
) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, int], list[float]]]:
    expected = [_pil_rgb(blob) for blob in blobs]
    measured = _throughputs(found, blobs, workers, reps)
    report = {}
    for name, fn in found.items():
        row: dict[str, Any] = {"images": len(blobs)}
        for threads in sorted({1, workers}):
            ours, pil = measured[name, threads], measured["pil", threads]
            row[f"images_per_s_{threads}_thread"] = median(ours)
            row[f"ratio_to_pil_{threads}_thread"] = median(
                [a / b for a, b in zip(ours, pil, strict=True)]
            )
        mismatched = sum(not _identical(fn, b, e) for b, e in zip(blobs, expected, strict=True))
        row.update(identical=mismatched == 0, mismatched_images=mismatched)
        report[name] = row
    return report, measured


def compare_decoders(
    synthetic: list[Path], work: Path, *, reps: int, workers: int
) -> dict[str, Any]:
    """The ``ingest-decoders`` entry (see the module docstring)."""
    import torch

    real = real_sample_files()
    sets = {"real": [p.read_bytes() for p in real]} if real else {}
    sets["synthetic"] = [p.read_bytes() for p in synthetic[: max(len(real), 40)]]
    candidates = decoders()
    found = {name: fn for name, fn in candidates.items() if callable(fn)}
    per_set = {name: _per_set(found, blobs, workers, reps) for name, blobs in sets.items()}
    variants = mode_variants(next(iter(sets.values()))[0])
    damaged_source = work / "strictness-source.png"
    damaged_source.write_bytes(next(iter(sets.values()))[0])
    table: dict[str, Any] = {}
    for name, fn in candidates.items():
        if not callable(fn):
            table[name] = {"available": False, "why": fn}
            continue
        table[name] = {
            "available": True,
            **{set_name: report[0][name] for set_name, report in per_set.items()},
            "modes_identical": {
                mode: _identical(fn, data, _pil_rgb(data)) for mode, data in variants.items()
            },
            "gil_free_calls": _releases_gil(fn, next(iter(sets.values()))[0]),
            "damaged": _strictness(name, damaged_source),
        }
    headline = "real" if "real" in sets else "synthetic"
    threads = workers
    ours = per_set[headline][1]["ours (decode_rgb)", threads]
    reference = per_set[headline][1]["pil", threads]
    return entry(
        "ingest-decoders",
        "images/s",
        median(ours),
        median(reference),
        ratio=median([a / b for a, b in zip(ours, reference, strict=True)]),
        ratio_means=f"decode_rgb / Pillow, {headline} PNGs, {threads} threads, per-round ratio",
        goal=Goal("ratio", low=1.0),  # the reason to use a decoder other than Pillow
        settings={
            "ours": f"dala_model.data._decode.decode_rgb ({_decode.fast_decoder() or 'Pillow only'})",
            "reference": 'Pillow Image.open(...).convert("RGB")',
            "sets": {name: len(blobs) for name, blobs in sets.items()},
            "real_source": "../shared/breakhis-sample" if real else "not found",
            "threads": sorted({1, workers}),
            "reps": reps,
            "modes": sorted(variants),
        },
        reps={"ours": ours, "reference": reference},
        extra={
            "adopted": _decode.fast_decoder(),
            "cpu_model": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "decoders": table,
        },
    )


if __name__ == "__main__":
    _strictness_child(sys.argv[1], sys.argv[2])
