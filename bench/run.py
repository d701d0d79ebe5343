"""The CPU benchmark suite (``make bench``): writes ``bench/results/latest.json``.

``python -m bench.run [--quick] [--only cache-read,ingest,...] [--out PATH] [--<size> N ...]``.
``--quick`` (or ``BENCH_QUICK=1``) shrinks every size so the whole suite runs in a couple of
minutes for debugging; its numbers are too small to quote. The full sizes are chosen so the suite
stays under 15 minutes on a 2-core machine; every size is recorded in the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import cache_read, infer_cpu, ingest, predict_cpu, train_cpu
from bench.data import fresh_dir, patients_for_images, synthesize, total_bytes
from bench.harness import (
    add_size_flags,
    apply_size_flags,
    machine_info,
    matmul_peaks,
    now,
    write_json,
)
from dala_model.data import _pool, cache
from dala_model.data.ingest import ingest as ingest_images
from dala_model.data.manifest import read_manifest

DEFAULT_OUT = str(Path(__file__).resolve().parent / "results" / "latest.json")


@dataclass(frozen=True)
class Sizes:
    ingest_sizes: tuple[int, ...] = (400, 1200)  # images at the two ingest sizes (small, large)
    cache_images: int = 256
    cache_batch: int = 32
    train_images: int = 32  # images per measured training epoch
    train_batch: int = 32
    infer_images: int = 32
    infer_batch: int = 32
    ref_images: int = 16  # images per repetition of the per-image inference loop
    scaling_base: int = 16  # 1x of the scaling benchmark (also its batch size)
    scaling_reps: int = 5  # more than reps: its short 1x runs are the most exposed to a busy CPU
    int8_calibration_images: int = 32  # calibrate the int8 model on these ("validation")...
    int8_images: int = 96  # ...and score it against float on these (disjoint; "test")
    int8_train_steps: int = 10  # Adam steps: image-dependent features for the int8 entry
    predict_images: int = 96  # PNGs of the predict-cpu drop (at 40X, from the small ingest set)
    reps: int = 3
    size: int = 224


FULL = Sizes()
QUICK = Sizes(
    ingest_sizes=(40, 80),
    cache_images=32,
    cache_batch=8,
    train_images=8,
    train_batch=8,
    infer_images=8,
    infer_batch=8,
    ref_images=4,
    scaling_base=4,
    scaling_reps=2,
    int8_calibration_images=8,
    int8_images=8,
    int8_train_steps=2,
    predict_images=8,
    reps=2,
)


class Workspace:
    """Synthetic PNGs and a locally ingested root, made on first use and shared by the benchmarks."""

    def __init__(self, work: Path, sizes: Sizes) -> None:
        self.work, self.sizes = work, sizes
        self.timings: dict[str, float] = {}

    def _timed(self, name: str, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        value = fn()
        self.timings[name] = round(time.perf_counter() - started, 1)
        return value

    @functools.cached_property
    def small_files(self) -> list[Path]:
        patients = patients_for_images(self.sizes.ingest_sizes[0])
        return self._timed(
            "synth_small_s", lambda: synthesize(self.work / "png" / "small", patients, seed=0)
        )

    @functools.cached_property
    def extra_files(self) -> list[Path]:
        patients = patients_for_images(self.sizes.ingest_sizes[1] - len(self.small_files))
        return self._timed(
            "synth_extra_s", lambda: synthesize(self.work / "png" / "extra", patients, seed=1)
        )

    @functools.cached_property
    def root(self) -> str:
        self.small_files  # noqa: B018 (generate the PNGs first)
        source, root = str(self.work / "png" / "small"), str(self.work / "root")
        self._timed(
            "ingest_root_s", lambda: ingest_images(source, root, cache_size=self.sizes.size)
        )
        return root

    @functools.cached_property
    def manifest(self):
        return read_manifest(self.root).sort_values("image_id").reset_index(drop=True)

    def take(self, n: int) -> tuple[list[str], np.ndarray, list[str]]:
        """The first ``n`` images: ids, labels and local PNG paths."""
        if n > len(self.manifest):
            raise ValueError(
                f"benchmark asks for {n} images but the workspace has {len(self.manifest)}; "
                "raise --ingest-sizes or lower the image counts"
            )
        rows = self.manifest.iloc[:n]
        return rows["image_id"].tolist(), rows["label_id"].to_numpy(np.int64), rows["uri"].tolist()

    def pixels(self, n: int) -> np.ndarray:
        return cache.load_images(self.root, self.take(n)[0], self.sizes.size)


def bench_cache_read(ws: Workspace) -> list[dict[str, Any]]:
    ids, _, paths = ws.take(ws.sizes.cache_images)
    return [
        cache_read.run(
            ws.root, ids, paths, size=ws.sizes.size, batch=ws.sizes.cache_batch, reps=ws.sizes.reps
        )
    ]


def bench_ingest(ws: Workspace) -> list[dict[str, Any]]:
    small, large = ws.small_files, ws.small_files + ws.extra_files
    results = ingest.run(
        small,
        large,
        ws.work / "png",
        fresh_dir(ws.work / "ingest"),
        reps=ws.sizes.reps,
        workers=_pool.default_workers(),
    )
    results[0]["settings"]["synthetic_png_mb_total"] = round(total_bytes(large) / 1e6, 1)
    return results


def bench_train_cpu(ws: Workspace) -> list[dict[str, Any]]:
    _, labels, paths = ws.take(ws.sizes.train_images)
    return [
        train_cpu.run(
            ws.pixels(ws.sizes.train_images),
            labels,
            paths,
            batch=ws.sizes.train_batch,
            reps=ws.sizes.reps,
        )
    ]


def bench_infer_cpu(ws: Workspace) -> list[dict[str, Any]]:
    return infer_cpu.run(
        ws.pixels(ws.sizes.infer_images),
        ref_images=ws.sizes.ref_images,
        batch=ws.sizes.infer_batch,
        reps=ws.sizes.reps,
        scaling_base=ws.sizes.scaling_base,
        scaling_reps=ws.sizes.scaling_reps,
    )


def bench_infer_cpu_int8(ws: Workspace) -> list[dict[str, Any]]:
    calibration, images = ws.sizes.int8_calibration_images, ws.sizes.int8_images
    _, labels, _ = ws.take(calibration + images)
    pixels = ws.pixels(calibration + images)
    # Calibration and scoring sets are disjoint, and each holds both classes when the
    # workspace's first images do (the manifest is sorted by image id, i.e. by patient).
    order = np.random.default_rng(0).permutation(len(labels))
    cal, rest = order[:calibration], order[calibration:]
    return [
        infer_cpu.run_int8(
            pixels[cal],
            labels[cal],
            pixels[rest],
            labels[rest],
            reps=ws.sizes.reps,
            train_steps=ws.sizes.int8_train_steps,
        )
    ]


def bench_predict_cpu(ws: Workspace) -> list[dict[str, Any]]:
    return [
        predict_cpu.run(
            fresh_dir(ws.work / "predict"),
            ws.small_files,
            size=ws.sizes.size,
            images=ws.sizes.predict_images,
            reps=ws.sizes.reps,
        )
    ]


BENCHMARKS: dict[str, Callable[[Workspace], list[dict[str, Any]]]] = {
    "cache-read": bench_cache_read,
    "ingest": bench_ingest,
    "train-cpu": bench_train_cpu,
    "infer-cpu": bench_infer_cpu,  # also writes the scaling entry
    "infer-cpu-int8": bench_infer_cpu_int8,
    "predict-cpu": bench_predict_cpu,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        default=os.environ.get("BENCH_QUICK") == "1",
        help="tiny sizes for debugging (also BENCH_QUICK=1)",
    )
    parser.add_argument(
        "--only",
        default=",".join(BENCHMARKS),
        help=f"comma-separated subset of {', '.join(BENCHMARKS)}",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help="results JSON path")
    parser.add_argument(
        "--workdir", default=None, help="keep the generated data here (default: a temp dir)"
    )
    add_size_flags(parser, Sizes)
    args = parser.parse_args(argv)
    sizes = apply_size_flags(QUICK if args.quick else FULL, args)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    if len(sizes.ingest_sizes) != 2 or not 0 < sizes.ingest_sizes[0] < sizes.ingest_sizes[1]:
        parser.error(
            f"--ingest-sizes needs two increasing sizes (small,large), got {sizes.ingest_sizes}"
        )

    started = time.perf_counter()
    machine = machine_info()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dala-bench-"))
    ws = Workspace(work, sizes)
    # The autotuner measures on first use: a cache of its own per suite run, so "ours" is what a
    # user's first run chooses on this machine, and the measuring time is in the results.
    os.environ["DALA_CACHE_DIR"] = str(work / "dala-cache")
    entries, durations = [], {}
    try:
        for name in chosen:
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            for result in BENCHMARKS[name](ws):
                entries.append(result)
                print(f"[bench] {_summary(result)}", file=sys.stderr, flush=True)
            durations[name] = round(time.perf_counter() - t0, 1)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if any(name.startswith(("train-cpu", "infer-cpu")) for name in chosen):
        machine["matmul_peak_gflops"] = matmul_peaks()
    write_json(
        args.out,
        {
            "suite": "cpu",
            "created_at": now(),
            "mode": "quick" if args.quick else "full",
            "sizes": dataclasses.asdict(sizes),
            "machine": machine,
            "entries": entries,
            "durations_s": durations,
            "setup_s": ws.timings,
            "total_seconds": round(time.perf_counter() - started, 1),
        },
    )
    print(f"[bench] wrote {args.out} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


def _summary(result: dict[str, Any]) -> str:
    ratio = f"{result['ratio']:.3g}" if result["ratio"] is not None else "-"
    return (
        f"{result['name']}: ours {result['ours']:.4g} {result['unit']}, reference "
        f"{result['reference']:.4g}, ratio {ratio} (goal {result['goal']}: "
        f"{'met' if result['met'] else 'NOT met'})"
    )


if __name__ == "__main__":
    raise SystemExit(main())
