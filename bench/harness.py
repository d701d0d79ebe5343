"""Shared measuring rules: warm-up then repetitions, medians, goals, machine facts, the JSON file.

Every benchmark reports through :func:`entry`, so ``latest.json`` and ``gpu.json`` have one shape:
``{name, unit, ours, reference, ratio, ratio_means, goal, met, settings, reps, extra}``. Medians
rather than means because the machines are shared: one preempted repetition should not move the
result.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dala_model import storage
from dala_model.device import native_bf16


def repeat(
    fn: Callable[[], object], reps: int, warmup: int = 1, sync: Callable[[], None] | None = None
) -> list[float]:
    """Wall seconds of ``reps`` calls of ``fn`` after ``warmup`` untimed calls.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock read, so queued GPU work is
    inside the repetition that queued it.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    seconds = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        if sync:
            sync()
        seconds.append(time.perf_counter() - started)
    return seconds


def interleaved(
    fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall seconds of each function, timed in rounds (A B C A B C ...) after ``warmup`` rounds.

    Every speed ratio in the suite comes from one such call: on a shared machine a burst of load
    then slows every side of the ratio alike instead of the one that happened to run during it.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - started)
    return seconds


def rates(count: float, seconds: list[float]) -> list[float]:
    """Per-repetition throughput (count / seconds)."""
    return [count / s for s in seconds]


def median(values: list[float]) -> float:
    return float(statistics.median(values))


@dataclass(frozen=True)
class Goal:
    """A target on ``ours`` or on ``ratio``: at least ``low`` and/or at most ``high``."""

    on: str  # "ratio" or "ours"
    low: float | None = None
    high: float | None = None

    def text(self) -> str:
        if self.low is not None and self.high is not None:
            return f"{self.low:g} <= {self.on} <= {self.high:g}"
        if self.low is not None:
            return f"{self.on} >= {self.low:g}"
        return f"{self.on} <= {self.high:g}"

    def met(self, value: float) -> bool:
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)


def entry(
    name: str,
    unit: str,
    ours: float,
    reference: float | None,
    *,
    ratio: float | None = None,
    ratio_means: str = "ours / reference (speed-up)",
    goal: Goal | None,
    settings: dict[str, Any],
    reps: dict[str, list[float]],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One benchmark's result in the shared shape; ``met`` is None when there is no goal.

    ``ratio`` defaults to the speed-up ``ours / reference``; pass it (and ``ratio_means``) for
    any other comparison.
    """
    if ratio is None and reference:
        ratio = ours / reference
    checked = {"ours": ours, "ratio": ratio}[goal.on] if goal else None
    return {
        "name": name,
        "unit": unit,
        "ours": ours,
        "reference": reference,
        "ratio": ratio,
        "ratio_means": ratio_means,
        "goal": goal.text() if goal else None,
        "met": None if goal is None or checked is None else goal.met(checked),
        "settings": settings,
        "reps": reps,
        "extra": extra or {},
    }


def model_flops(model: nn.Module, size: int, *, train: bool = False) -> float:
    """FLOPs for one image (2 per multiply-accumulate): the forward pass, or forward + backward."""
    counter = FlopCounterMode(display=False)
    was_training = model.training
    if train:
        with counter:
            model.train()(torch.zeros(2, 3, size, size)).sum().backward()
        model.zero_grad(set_to_none=True)
        flops = counter.get_total_flops() / 2
    else:
        with torch.inference_mode(), counter:
            model.eval()(torch.zeros(1, 3, size, size))
        flops = counter.get_total_flops()
    model.train(was_training)
    return float(flops)


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 3) -> float:
    """Measured FLOP/s of a large square matmul: the practical peak of this machine in ``dtype``."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    seconds = repeat(lambda: a @ b, reps)
    return 2 * n**3 / min(seconds)


@functools.cache
def matmul_peaks() -> dict[str, float]:
    """GFLOP/s of the CPU matmul peak per dtype (fp32, bf16), measured once per suite run.

    bf16 is measured whether native or not (an emulated bf16 peak shows why it is no candidate);
    the emulated one with a smaller matrix, which is enough to reach its (low) plateau."""
    native = native_bf16(torch.device("cpu"))
    return {
        "fp32": matmul_peak(torch.float32) / 1e9,
        "bf16": matmul_peak(torch.bfloat16, n=2048 if native else 1024) / 1e9,
    }


def hardware_fraction(images_per_s: float, flops_per_image: float) -> dict[str, Any]:
    """``images_per_s`` as a fraction of the matmul peak of the best precision the CPU has
    natively (fp32, or bf16 on AVX512_BF16/AMX), with the per-dtype peaks beside it."""
    peaks = matmul_peaks()
    native = ["fp32"] + (["bf16"] if native_bf16(torch.device("cpu")) else [])
    best = max(native, key=peaks.get)
    achieved = images_per_s * flops_per_image / 1e9
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": "bf16" in native,
        "matmul_peak_gflops": peaks,
        "matmul_peak_dtype": best,
        "achieved_gflops": achieved,
        "fraction_of_matmul_peak": achieved / peaks[best],
    }


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on; load average because the CPU may be shared."""
    import psutil

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16(torch.device("cpu")),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Atomically, so a crashed run never leaves a half-written results file."""
    storage.write_bytes_atomic(path, json.dumps(payload, indent=2, default=float).encode() + b"\n")


def add_size_flags(parser: argparse.ArgumentParser, sizes_type: type) -> None:
    """One ``--field`` flag per field of a sizes dataclass (int or tuple of ints); unset flags keep
    the mode's default, so quick and full modes differ only in their defaults."""
    for field in dataclasses.fields(sizes_type):
        flag = f"--{field.name.replace('_', '-')}"
        if str(field.type).startswith("tuple"):
            parser.add_argument(
                flag,
                dest=field.name,
                default=None,
                metavar="N,N,...",
                type=lambda s: tuple(int(v) for v in s.split(",")),
            )
        else:
            parser.add_argument(flag, dest=field.name, default=None, metavar="N", type=int)


def apply_size_flags(sizes: Any, args: argparse.Namespace) -> Any:
    """``sizes`` with every flag the user gave replacing the mode's default."""
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(sizes)
        if getattr(args, f.name) is not None
    }
    return dataclasses.replace(sizes, **given)
