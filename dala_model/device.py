"""Device and precision choices shared by training, inference and the benchmarks.

Keeping them in one place means "auto" means the same thing everywhere: CUDA when present,
bf16 autocast on CUDA (no loss scaler needed, unlike fp16), fp32 on CPU unless bf16 is asked for.
Which of those is *fastest* on a given machine is measured, not assumed, by
:mod:`dala_model.engine.autotune`; this module only says what each name means and what the
hardware can do natively.

bf16 on a CPU is only a candidate where the CPU computes it natively (AVX512_BF16 or AMX, as
oneDNN reports it): on AVX2-only CPUs oneDNN emulates bf16 and it measured 5x slower than fp32
(issue 16: train 0.18 vs 1.0 img/s on a 2-core EPYC). ``ONEDNN_MAX_CPU_ISA=AVX2`` hides the
native support from oneDNN, and so from :func:`native_bf16`, which is how the AVX2 path is tested.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={name!r} was asked for but CUDA is not available; use 'auto' or 'cpu'"
        )
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    "auto" here is the static default (bf16 on CUDA, fp32 elsewhere); the measured choice is
    ``dala_model.engine.autotune.choose``. "int8" is not an autocast dtype: it needs a quantized
    model (``dala_model.engine.quantize.quantize_for_cpu``), which then runs with None here.
    """
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16
    if precision in _DTYPES:
        if precision == "fp16" and device.type == "cpu":
            raise ValueError("precision='fp16' is for CUDA; on a CPU use fp32, bf16 or int8")
        return _DTYPES[precision]
    if precision == "int8":
        raise ValueError(
            "precision='int8' needs a quantized model (dala_model.engine.quantize."
            "quantize_for_cpu), not an autocast dtype; it is for CPU batch inference only"
        )
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (CUDA with bf16 support; AVX512_BF16/AMX CPUs)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def capability(device: torch.device) -> str:
    """What kernels this device runs: the GPU's name and compute capability, or torch's CPU
    capability (``DEFAULT``, ``AVX2``, ``AVX512``, ``SVE256``...) plus ``+bf16`` where native."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"{torch.cuda.get_device_name(index)} sm{major}{minor}"
    cpu = torch.backends.cpu.get_cpu_capability()
    return f"{cpu}+bf16" if native_bf16(device) else cpu


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings mean something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
