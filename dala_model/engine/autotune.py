"""Measured, cached choice of precision, memory format and (CPU inference) batch size.

Why measure: the fixed choice (fp32 + channels_last, bf16 where asked) was tuned on an
AVX512-BF16 machine and was slower than the naive fp32 NCHW reference on an AVX2 EPYC (issue 16:
train 0.45x, infer 0.73x; bf16 emulated at 0.18 img/s). Which layout and batch win depends on the
CPU's kernels, its caches and the thread count, so the engine times the real model at the real
image size on first use and keeps the fastest.

Candidates: fp32 always; bf16 only where the device computes it natively
(:func:`dala_model.device.native_bf16`); on CUDA also fp16 for inference (training in fp16 needs
a loss scaler the loop does not have, so it is not offered there); channels_last and contiguous
for each. On CPU inference the batch size is measured too (1, 4, 16: per-image calls beat
batches on small-cache CPUs). Candidates are timed in interleaved rounds (ABAB...), one step of
each per round, and compared by their median rate, so a burst of load on a shared machine
hits every candidate alike. A candidate replaces fp32 contiguous (the naive reference's choice,
and batch 4 for inference) only when it is at least 10% faster (:data:`WIN_MARGIN`).

Training is probed at the run's own batch size (``batch_size=``, at most
:data:`TRAIN_PROBE_BATCH`), because the layout's win depends on it: under AVX2 kernels on a 2-core
AMD EPYC (2026-12-04, dalaresnet50 at 224, fp32, interleaved rounds) channels_last trained
1.20x, 1.11x, 1.13x and 1.54x as fast as NCHW at batch 4, 8, 16 and 32, and a batch-4 probe in
another run saw 1.06x (under the 10% margin) where the bench's batch-32 rounds then measured
1.31x, so the engine trained in the slower layout. The batch is part of the cache key.

Cost: one warm-up round plus at least two timed rounds, more until ``budget_s`` (default 8 s on
CPU, 3 s on CUDA) is spent, at most :data:`MAX_ROUNDS`. That is a few seconds at 64 px (the quick
profile); at 224 px and batch 32 on a 2-core AVX2 CPU the minimum rounds take about a minute,
once per machine and batch, against hours for the training it tunes: the choice is cached as
JSON under ``$DALA_CACHE_DIR`` (else the platform's user cache directory, ``~/.cache/dala`` on
Linux), keyed by device kind, CPU capability or GPU name, thread count, torch version, model,
image size and mode, and written atomically so concurrent first uses never read a torn file.

Explicit overrides skip what they fix: ``precision=``/``channels_last=``/``batch_size=`` given by
the caller are kept, and when nothing is left to choose nothing is measured.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from dala_model.device import autocast, capability, native_bf16, resolve_precision, synchronize
from dala_model.models.transforms import normalize_batch

Mode = Literal["train", "infer"]
CACHE_VERSION = 1
MAX_ROUNDS = 6
TRAIN_PROBE_BATCH = 32  # the paper's batch; larger batches are probed at 32
INFER_BATCHES = (1, 4, 16)
WIN_MARGIN = 1.10  # a candidate replaces the reference choice only when >= 10% faster


@dataclass(frozen=True)
class Choice:
    """What the engine runs with, and why (recorded in run.json and the bench output)."""

    precision: str  # fp32, bf16 or fp16
    channels_last: bool
    batch_size: int | None  # CPU inference only; None: the caller's (training's is the protocol's)
    images_per_s: dict[str, float] = field(default_factory=dict)  # candidate label -> measured
    key: str = ""
    cached: bool = False
    measured_seconds: float = 0.0

    @property
    def label(self) -> str:
        return candidate_label(self.precision, self.channels_last, self.batch_size)

    def dtype(self, device: torch.device) -> torch.dtype | None:
        return resolve_precision(self.precision, device)

    def record(self) -> dict[str, Any]:
        return asdict(self) | {"label": self.label}


def candidate_label(precision: str, channels_last: bool, batch: int | None = None) -> str:
    layout = "channels_last" if channels_last else "nchw"
    return f"{precision}-{layout}" + (f"-b{batch}" if batch else "")


def precisions(device: torch.device, mode: Mode) -> list[str]:
    """The precisions worth timing on ``device``: fp32, plus what it computes natively."""
    found = ["fp32"]
    if native_bf16(device):
        found.append("bf16")
    if device.type == "cuda" and mode == "infer":
        found.append("fp16")
    return found


def cache_dir() -> Path:
    if os.environ.get("DALA_CACHE_DIR"):
        return Path(os.environ["DALA_CACHE_DIR"])
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("dala"))
    except ImportError:
        return Path.home() / ".cache" / "dala"


def cache_key(device: torch.device, model_name: str, image_size: int, mode: Mode) -> dict:
    return {
        "version": CACHE_VERSION,
        "device": device.type,
        "capability": capability(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "torch": torch.__version__,
        "model": model_name,
        "image_size": image_size,
        "mode": mode,
    }


def _cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "autotune" / f"{key['model']}-{key['mode']}-{digest}.json"


def _read_cache(path: Path, key: dict) -> Choice | None:
    try:
        payload = json.loads(path.read_text())
        if payload.get("key") != key:
            return None
        fields = payload["choice"]
        return Choice(
            precision=str(fields["precision"]),
            channels_last=bool(fields["channels_last"]),
            batch_size=fields["batch_size"],
            images_per_s={str(k): float(v) for k, v in fields["images_per_s"].items()},
            key=path.stem,
            cached=True,
            measured_seconds=float(fields.get("measured_seconds", 0.0)),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # missing, torn by another writer's crash or an old format: measure again


def _write_cache(path: Path, key: dict, choice: Choice) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"key": key, "choice": asdict(choice) | {"cached": False}}
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(payload, out, indent=2, sort_keys=True)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def interleaved_rates(
    steps: dict[str, Any], images: dict[str, int], budget_s: float, sync: Any
) -> dict[str, float]:
    """Median images/s of each step function, timed in interleaved rounds after a warm-up round."""
    for step in steps.values():
        step()
    sync()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    started = time.perf_counter()
    for rounds in range(MAX_ROUNDS):
        if rounds >= 2 and time.perf_counter() - started > budget_s:
            break
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            sync()
            seconds[name].append(time.perf_counter() - t0)
    return {name: images[name] / statistics.median(s) for name, s in seconds.items()}


def _train_step(model, device, precision, channels_last, batch, size, preset):
    net = copy.deepcopy(model).to(
        device, memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    pixels = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)
    labels = torch.arange(batch, device=device) % 2
    dtype = resolve_precision(precision, device)

    def step() -> None:
        x = normalize_batch(pixels, preset, channels_last=channels_last)
        with autocast(device, dtype):
            loss = nn.functional.cross_entropy(net(x), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _infer_step(model, device, precision, channels_last, batch, size, preset):
    net = copy.deepcopy(model).to(
        device, memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    net.eval()
    pixels = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)
    dtype = resolve_precision(precision, device)

    def step() -> None:
        with torch.inference_mode(), autocast(device, dtype):
            net(normalize_batch(pixels, preset, channels_last=channels_last))

    return step


def choose(
    mode: Mode,
    model_name: str,
    image_size: int,
    device: torch.device,
    *,
    precision: str | None = None,
    channels_last: bool | None = None,
    batch_size: int | None = None,
    model: nn.Module | None = None,
    preset: str = "paper",
    budget_s: float | None = None,
    use_cache: bool = True,
) -> Choice:
    """The fastest (precision, memory format[, CPU inference batch]) for ``model_name`` here.

    ``precision``/``channels_last``/``batch_size`` (None or "auto": choose) fix what the caller
    decided; in training ``batch_size`` is the run's batch, which the probe uses (see the module
    docstring), not something to choose. ``model`` (any weights) is timed if given, else a fresh
    ``build_model(model_name)``.
    """
    if mode not in ("train", "infer"):
        raise ValueError(f"mode must be 'train' or 'infer', got {mode!r}")
    precision = None if precision == "auto" else precision
    tune_batch = mode == "infer" and device.type == "cpu" and batch_size is None
    options = [precision] if precision else precisions(device, mode)
    layouts = [channels_last] if channels_last is not None else [True, False]
    if len(options) * len(layouts) == 1 and not tune_batch:
        return Choice(options[0], layouts[0], batch_size if mode == "infer" else None)
    key = cache_key(device, model_name, image_size, mode)
    fixed = {"precision": precision, "channels_last": channels_last, "batch_size": batch_size}
    key["fixed"] = {k: v for k, v in fixed.items() if v is not None}
    path = _cache_path(key)
    if use_cache and (found := _read_cache(path, key)) is not None:
        return found
    if model is None:
        from dala_model.models.registry import build_model

        model = build_model(model_name)
    budget = budget_s if budget_s is not None else (8.0 if device.type == "cpu" else 3.0)
    started = time.perf_counter()
    choice = _measure(
        mode, model, device, options, layouts, batch_size, tune_batch, image_size, preset, budget
    )
    choice = Choice(
        **(
            asdict(choice)
            | {"key": path.stem, "measured_seconds": round(time.perf_counter() - started, 2)}
        )
    )
    if use_cache:
        _write_cache(path, key, choice)
    return choice


def _clear_winner(combos: list[tuple[str, bool]], measured: dict[str, float]) -> tuple[str, bool]:
    """The fastest combination if it beats fp32 contiguous (the naive reference's layout) by
    ``WIN_MARGIN``; fp32 contiguous otherwise. A short probe on a loaded machine can rank close
    candidates wrongly (seen: bf16-nchw chosen at 64 px under load 14, then slowest in the
    bench's longer rounds), so a change from the reference needs a clear win: the engine is then
    never slower than the naive path by more than the probe's noise."""
    reference = ("fp32", False)
    best = max(combos, key=lambda c: measured[candidate_label(*c)])
    if reference not in combos:
        return best
    if measured[candidate_label(*best)] < measured[candidate_label(*reference)] * WIN_MARGIN:
        return reference
    return best


def _measure(mode, model, device, options, layouts, batch_size, tune_batch, size, preset, budget):
    sync = lambda: synchronize(device)  # noqa: E731
    make = _train_step if mode == "train" else _infer_step
    probe = (
        min(batch_size or TRAIN_PROBE_BATCH, TRAIN_PROBE_BATCH)
        if mode == "train"
        else (batch_size or INFER_BATCHES[1])
    )
    combos = [(p, cl) for p in options for cl in layouts]
    steps = {
        candidate_label(p, cl): make(model, device, p, cl, probe, size, preset) for p, cl in combos
    }
    measured = interleaved_rates(
        steps, dict.fromkeys(steps, probe), budget / 2 if tune_batch else budget, sync
    )
    best_precision, best_layout = _clear_winner(combos, measured)
    chosen_batch = batch_size if mode == "infer" else None
    if tune_batch:
        steps = {
            candidate_label(best_precision, best_layout, b): make(
                model, device, best_precision, best_layout, b, size, preset
            )
            for b in INFER_BATCHES
        }
        batches = dict(zip(steps, INFER_BATCHES, strict=True))
        by_batch = interleaved_rates(steps, batches, budget / 2, sync)
        measured |= by_batch
        fastest = max(by_batch, key=by_batch.get)
        default = candidate_label(best_precision, best_layout, INFER_BATCHES[1])
        keep = by_batch[fastest] < by_batch.get(default, 0.0) * WIN_MARGIN
        chosen_batch = batches[default if keep else fastest]
    rounded = {k: round(v, 3) for k, v in measured.items()}
    return Choice(best_precision, best_layout, chosen_batch, rounded)
