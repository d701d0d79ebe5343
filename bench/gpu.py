"""The GPU benchmark: one command, a paper-sized synthetic magnification, ours vs a reference.

``python -m bench.gpu [--out bench/results/gpu.json] [--smoke] [--budget-s 420]``

1. Data: ``dala_model.data.synth`` renders patients x 4 magnifications x images (in parallel
   processes); only 40X is kept (about 2,050 images, the paper's 1,995), ingested into a local
   root with its 224px cache, and split with the paper's image-level 60/10/30 scheme.
2. Training images/s of the engine's own epoch function (``dala_model.engine.epoch.train_epoch``, data
   already on the GPU as uint8): the reference is fp32 + NCHW at the paper's batch 32; ours is
   bf16 autocast + channels_last at batch 32 and the other batch sizes, then ``torch.compile`` at
   batch 32 and at the fastest batch.
3. Inference images/s of ``predict_logits``: fp32 NCHW batch 32 vs bf16 channels_last at larger
   batches (and compiled).
4. The paper's protocol on one magnification through the real ``dala_model.engine.train.train()``: 50
   epochs of training + validation, then the test evaluation, timed end to end.

Every phase records peak GPU memory (``torch.cuda.max_memory_allocated``) and GPU utilisation
(NVML sampled every 100 ms in a thread). The JSON is rewritten after every phase, so a run cut
short still leaves what it measured; compiled variants are skipped (and marked so) when the
time budget would be exceeded. ``--smoke`` runs everything on the CPU with tiny sizes in seconds
(no compile) so the script is exercised by the test suite and never rots.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.data import keep_magnification, synthesize, total_bytes
from bench.harness import Goal, entry, machine_info, median, now, rates, repeat, write_json
from bench.train_cpu import engine_epoch_fn
from dala_model import storage
from dala_model.data.dataset import load_split
from dala_model.data.ingest import ingest
from dala_model.data.splits import make_split
from dala_model.device import resolve_precision
from dala_model.engine.config import TrainConfig
from dala_model.engine.inference import predict_logits
from dala_model.engine.train import train
from dala_model.models.registry import build_model

DEFAULT_OUT = str(Path(__file__).resolve().parent / "results" / "gpu.json")
MODEL = "dalaresnet50"
MAGNIFICATION = 40
PAPER_50_EPOCH_SECONDS = 2084.98  # mean over magnifications, RTX A4000 (paper-facts.md)
GOALS = {"train": 3000.0, "infer": 10000.0, "protocol_s": 60.0}


@dataclass(frozen=True)
class Profile:
    device: str
    patients: int
    per_patient: int  # images per patient at each magnification
    synth_size: tuple[int, int]
    image_size: int
    batch_sizes: tuple[int, ...]  # the first is the paper's batch
    infer_batches: tuple[int, ...]
    epochs: int
    reps: int
    compile: bool


FULL = Profile(
    device="cuda",
    patients=82,
    per_patient=25,
    synth_size=(700, 460),
    image_size=224,
    batch_sizes=(32, 64, 128, 256),
    infer_batches=(128, 256, 512),
    epochs=50,
    reps=5,
    compile=True,
)
SMOKE = Profile(
    device="cpu",
    patients=6,
    per_patient=3,
    synth_size=(64, 48),
    image_size=32,
    batch_sizes=(4,),
    infer_batches=(8,),
    epochs=1,
    reps=1,
    compile=False,
)


class GpuMonitor:
    """Peak memory and NVML utilisation over a ``with`` block (both None on a CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._nvml = None
        if self.cuda:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            except Exception as exc:  # noqa: BLE001 (utilisation is optional; say why it is missing)
                print(f"[gpu] NVML unavailable ({exc}); no utilisation samples", file=sys.stderr)

    def __enter__(self) -> GpuMonitor:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.samples.append(int(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_gib = torch.cuda.max_memory_allocated() / 2**30
        if self._nvml is not None:
            self._stop.set()
            self._thread.join()

    def report(self) -> dict[str, float | None]:
        return {
            "peak_memory_gib": round(self.peak_gib, 3) if self.cuda else None,
            "gpu_util_mean_pct": round(float(np.mean(self.samples)), 1) if self.samples else None,
            "gpu_util_max_pct": max(self.samples) if self.samples else None,
        }


class Run:
    """State shared by the phases: device, deadline, and the JSON written after every phase."""

    def __init__(self, profile: Profile, out: str, budget_s: float, smoke: bool) -> None:
        self.profile, self.out, self.budget_s = profile, out, budget_s
        self.device = torch.device(profile.device)
        self.started = time.perf_counter()
        self.sync = torch.cuda.synchronize if self.device.type == "cuda" else None
        self.payload: dict[str, Any] = {
            "suite": "gpu",
            "smoke": smoke,
            "created_at": now(),
            "complete": False,
            "machine": machine_info(),
            "profile": dataclasses.asdict(profile),
            "budget_s": budget_s,
            "data": {},
            "variants": {},
            "entries": [],
            "skipped": [],
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def has_time(self, needed_s: float) -> bool:
        return self.elapsed() + needed_s <= self.budget_s

    def save(self) -> None:
        self.payload["elapsed_s"] = round(self.elapsed(), 1)
        write_json(self.out, self.payload)

    def log(self, message: str) -> None:
        print(f"[gpu {self.elapsed():6.1f}s] {message}", file=sys.stderr, flush=True)

    def measure(
        self, key: str, make: Callable[[], Callable[[], object]], count: int, warmup: int = 1
    ) -> dict[str, Any]:
        """Build a workload, time ``reps`` calls after ``warmup`` (reported as warmup_s, which
        holds any compilation), record images/s, peak memory and utilisation under ``key``."""
        with GpuMonitor(self.device) as monitor:
            fn = make()
            t0 = time.perf_counter()
            for _ in range(warmup):
                fn()
            if self.sync:
                self.sync()
            warmup_s = time.perf_counter() - t0
            per_rep = rates(count, repeat(fn, self.profile.reps, warmup=0, sync=self.sync))
        result = {
            "images_per_s": median(per_rep),
            "reps": per_rep,
            "warmup_s": round(warmup_s, 2),
            "images": count,
            **monitor.report(),
        }
        self.payload["variants"][key] = result
        self.log(
            f"{key}: {result['images_per_s']:.0f} images/s (warm-up {warmup_s:.1f}s, "
            f"peak {result['peak_memory_gib']} GiB, util {result['gpu_util_mean_pct']}%)"
        )
        self.save()
        del fn
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return result


def prepare_data(run: Run, work: Path) -> tuple[str, dict]:
    p = run.profile
    t0 = time.perf_counter()
    files = synthesize(
        work / "png", p.patients, p.per_patient, seed=0, size=p.synth_size, processes=os.cpu_count()
    )
    synth_s = time.perf_counter() - t0
    kept = keep_magnification(files, MAGNIFICATION)
    root = str(work / "root")
    t1 = time.perf_counter()
    result = ingest(str(work / "png"), root, workers=os.cpu_count(), cache_size=p.image_size)
    ingest_s = time.perf_counter() - t1
    make_split(root, "paper", seed=0)
    data = load_split(root, "paper", MAGNIFICATION, None, p.image_size)
    run.payload["data"] = {
        "synth_generated": len(files),
        "synth_seconds": round(synth_s, 1),
        "synth_images_per_s": round(len(files) / synth_s, 1),
        "synth_size": list(p.synth_size),
        "synth_note": "synth renders all 4 magnifications; only 40X is kept and ingested",
        "magnification": MAGNIFICATION,
        "images": len(kept),
        "mb": round(total_bytes(kept) / 1e6, 1),
        "ingest_seconds": round(ingest_s, 1),
        "ingest_images_per_s": round(result.images / ingest_s, 1),
        "ingest_workers": os.cpu_count(),
        "cache_size": p.image_size,
        "scheme": "paper",
        "split_sizes": {name: len(split) for name, split in data.items()},
    }
    run.log(f"data: {run.payload['data']}")
    run.save()
    return root, data


def trim(images: np.ndarray, multiple: int) -> np.ndarray:
    """The largest prefix that is a whole number of batches, so every batch has one shape
    (a compiled model would otherwise recompile for the short last batch)."""
    return images[: (len(images) // multiple) * multiple] if len(images) >= multiple else images


def fast_precision(device: torch.device) -> str:
    """bf16 autocast on a GPU; fp32 on a CPU (the smoke run checks plumbing, not speed)."""
    return "bf16" if device.type == "cuda" else "fp32"


def training_phase(run: Run, data: dict, compiled: bool) -> None:
    """Eager: the fp32 NCHW reference and ours at every batch size. Compiled: ours at the paper's
    batch and at the fastest eager batch, while the time budget allows."""
    p = run.profile
    x = trim(data["train"].images, max(p.batch_sizes))
    y = data["train"].labels[: len(x)]
    fast, paper_batch = fast_precision(run.device), p.batch_sizes[0]

    def variant(precision: str, channels_last: bool, batch: int, compile_model: bool = False):
        return lambda: engine_epoch_fn(
            x,
            y,
            precision=precision,
            channels_last=channels_last,
            batch=batch,
            device=run.device,
            compile_model=compile_model,
        )

    if not compiled:
        run.measure(
            f"train/fp32-nchw/eager/b{paper_batch}", variant("fp32", False, paper_batch), len(x)
        )
        for b in p.batch_sizes:
            run.measure(f"train/{fast}-channels_last/eager/b{b}", variant(fast, True, b), len(x))
        return
    eager = _candidates(run, "train")
    best_batch = int(max(eager, key=lambda k: eager[k]["images_per_s"]).split("/b")[1])
    for b in dict.fromkeys([paper_batch, best_batch]):
        if run.has_time(150):
            run.measure(
                f"train/{fast}-channels_last/compiled/b{b}", variant(fast, True, b, True), len(x)
            )
        else:
            run.payload["skipped"].append(f"compiled training at batch {b}: time budget")


def inference_phase(run: Run, data: dict, compiled: bool) -> None:
    """Eager: the fp32 NCHW batch-32 reference and ours at each batch. Compiled: ours at the
    fastest eager batch, while the time budget allows."""
    p = run.profile
    pixels = np.concatenate([data[name].images for name in ("train", "val", "test")])
    images = torch.from_numpy(trim(pixels, max(p.infer_batches))).to(run.device)
    fast, paper_batch = fast_precision(run.device), p.batch_sizes[0]

    def variant(precision: str, channels_last: bool, batch: int, compile_model: bool = False):
        def make():
            torch.manual_seed(0)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            model = build_model(MODEL).to(run.device, memory_format=fmt).eval()
            scored = torch.compile(model, dynamic=False) if compile_model else model
            dtype = resolve_precision(precision, run.device)
            return lambda: predict_logits(
                scored,
                images,
                preset="paper",
                device=run.device,
                dtype=dtype,
                batch_size=batch,
                channels_last=channels_last,
            )

        return make

    if not compiled:
        run.measure(
            f"infer/fp32-nchw/eager/b{paper_batch}",
            variant("fp32", False, paper_batch),
            len(images),
        )
        for b in p.infer_batches:
            run.measure(
                f"infer/{fast}-channels_last/eager/b{b}", variant(fast, True, b), len(images)
            )
        return
    eager = _candidates(run, "infer")
    b = int(max(eager, key=lambda k: eager[k]["images_per_s"]).split("/b")[1])
    if run.has_time(90):
        run.measure(
            f"infer/{fast}-channels_last/compiled/b{b}", variant(fast, True, b, True), len(images)
        )
    else:
        run.payload["skipped"].append(f"compiled inference at batch {b}: time budget")


def _candidates(run: Run, task: str) -> dict[str, dict]:
    """Our variants of ``task`` measured so far, keyed "eager/b64", "compiled/b32", ..."""
    prefix = f"{task}/{fast_precision(run.device)}-channels_last/"
    return {
        k.removeprefix(prefix): v
        for k, v in run.payload["variants"].items()
        if k.startswith(prefix)
    }


def summarise(run: Run) -> None:
    """(Re)build the train/infer entries from every variant measured so far."""
    p = run.profile
    paper_batch = p.batch_sizes[0]
    entries = []
    for task, goal, unit_note in (
        (
            "train",
            GOALS["train"],
            "one epoch of dala_model.engine.epoch.train_epoch "
            "(uint8 data on the device, batch normalise + BatchAugment, Adam)",
        ),
        (
            "infer",
            GOALS["infer"],
            "dala_model.engine.inference.predict_logits on uint8 images already on the device",
        ),
    ):
        reference = run.payload["variants"].get(f"{task}/fp32-nchw/eager/b{paper_batch}")
        candidates = _candidates(run, task)
        if reference is None or not candidates:
            continue
        at_paper = {k: v for k, v in candidates.items() if k.endswith(f"/b{paper_batch}")}
        picks = [(f"{task}-gpu", candidates, Goal("ours", low=goal))]
        if task == "train":
            picks.append((f"train-gpu-b{paper_batch}", at_paper, None))
        for name, pool, target in picks:
            best = max(pool, key=lambda k: pool[k]["images_per_s"])
            ours = pool[best]["images_per_s"]
            entries.append(
                entry(
                    name,
                    "images/s",
                    ours,
                    reference["images_per_s"],
                    goal=target,
                    settings={
                        "model": MODEL,
                        "images": reference["images"],
                        "size": p.image_size,
                        "reps": p.reps,
                        "rep": unit_note,
                        "ours": best,
                        "ours_precision": fast_precision(run.device),
                        "channels_last": True,
                        "reference": f"fp32, NCHW, eager, batch {paper_batch}, same function",
                    },
                    reps={"ours": pool[best]["reps"], "reference": reference["reps"]},
                    extra={
                        k: pool[best][k]
                        for k in ("peak_memory_gib", "gpu_util_mean_pct", "warmup_s")
                    }
                    | {
                        "all_variants_images_per_s": {
                            k: v["images_per_s"] for k, v in candidates.items()
                        },
                        "reference_peak_memory_gib": reference["peak_memory_gib"],
                        "reference_gpu_util_mean_pct": reference["gpu_util_mean_pct"],
                    },
                )
            )
    run.payload["entries"] = entries + run.payload.get("protocol", [])
    run.save()


def protocol_phase(run: Run, root: str, data: dict, compile_model: bool) -> None:
    """The paper's 50 epochs (train + validation each epoch) through the real ``train()``."""
    p = run.profile
    config = TrainConfig(
        root=root,
        magnification=MAGNIFICATION,
        scheme="paper",
        epochs=p.epochs,
        batch_size=p.batch_sizes[0],
        image_size=p.image_size,
        precision="auto",
        channels_last=True,
        compile=compile_model,
        device=str(run.device),
        run_id="bench-protocol",
    )
    with GpuMonitor(run.device) as monitor:
        t0 = time.perf_counter()
        result = train(config)
        wall = time.perf_counter() - t0
    history = storage.read_parquet(storage.join(result.run_uri, "history.parquet"))
    epoch_s = history["epoch_seconds"].to_numpy()
    reference = (
        run.payload["variants"]
        .get(f"train/fp32-nchw/eager/b{p.batch_sizes[0]}", {})
        .get("images_per_s")
    )
    naive_estimate = p.epochs * len(data["train"]) / reference if reference else None
    run.payload["protocol"] = [
        entry(
            f"protocol-{p.epochs}-epochs",
            "seconds",
            wall,
            PAPER_50_EPOCH_SECONDS,
            ratio=PAPER_50_EPOCH_SECONDS / wall,
            ratio_means="paper's seconds / ours (speed-up)",
            goal=Goal("ours", high=GOALS["protocol_s"]),
            settings={
                "path": "dala_model.engine.train.train(TrainConfig) end to end: load split from the cache, "
                "epochs of train + validation, checkpoint each epoch, test evaluation",
                "config": config.model_dump(mode="json"),
                "split_sizes": {k: len(v) for k, v in data.items()},
                "reference": "the paper's mean 50-epoch time per magnification on an RTX A4000 "
                "(published, not re-measured here)",
            },
            reps={"ours": [wall]},
            extra={
                "sum_epoch_seconds": float(epoch_s.sum()),
                "median_epoch_seconds": float(np.median(epoch_s)),
                "outside_epochs_seconds": wall - float(epoch_s.sum()),
                "outside_note": "setup, per-epoch checkpoint + best-model writes, final test evaluation",
                "median_train_images_per_s": float(history["images_per_s"].median()),
                "train_seconds_in_run_json": result.train_seconds,
                "best_epoch": result.best_epoch,
                "naive_estimate_seconds": naive_estimate,
                "naive_estimate_note": "epochs x train images / measured fp32-NCHW-b32 images/s "
                "(training only, same run)",
            }
            | monitor.report(),
        )
    ]
    run.log(f"protocol: {wall:.1f} s for {p.epochs} epochs (sum of epochs {epoch_s.sum():.1f} s)")
    summarise(run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"results JSON (default {DEFAULT_OUT})")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, in seconds")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="skip compiled variants that would end the run after this many seconds",
    )
    parser.add_argument(
        "--protocol-compile",
        action="store_true",
        help="run the 50-epoch protocol with torch.compile (default: eager)",
    )
    parser.add_argument("--workdir", default=None, help="keep the generated data here")
    parser.add_argument(
        "--phases",
        type=lambda text: set(text.split(",")),
        default={"train", "infer", "protocol"},
        help="comma-separated subset of train,infer,protocol (default: all)",
    )
    args = parser.parse_args(argv)
    profile = SMOKE if args.smoke else FULL
    if profile.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device visible: run this on a GPU machine, or use --smoke on a CPU")
    if args.smoke:
        torch.set_num_threads(
            1
        )  # the smoke run checks plumbing; one thread is robust on a busy CPU
    run = Run(profile, args.out, args.budget_s, args.smoke)
    if profile.device == "cuda":
        torch.backends.cudnn.benchmark = True
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dala-gpu-bench-"))
    try:
        root, data = prepare_data(run, work)
        # The goals' numbers first (eager, then the protocol); compiled variants only while the
        # time budget allows, since a cold torch.compile of ResNet50 takes a minute or more.
        for name, phase in (("train", training_phase), ("infer", inference_phase)):
            if name in args.phases:
                phase(run, data, compiled=False)
                summarise(run)
        if "protocol" in args.phases:
            protocol_phase(run, root, data, args.protocol_compile)
        if run.profile.compile:
            for name, phase in (("train", training_phase), ("infer", inference_phase)):
                if name in args.phases:
                    phase(run, data, compiled=True)
                    summarise(run)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    run.payload["complete"] = True
    run.save()
    for result in run.payload["entries"]:
        print(
            json.dumps(
                {
                    k: result[k]
                    for k in ("name", "unit", "ours", "reference", "ratio", "goal", "met")
                }
            )
        )
    run.log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
