"""infer-cpu and scaling: batched inference (``dala_model.engine.inference.predict_logits``) on the CPU.

infer-cpu compares our batched path (uint8 batches normalised in one op, ``inference_mode``, under
each candidate precision x memory format; the fastest counts) with the naive per-image fp32 eager
loop, and puts the result against the hardware: images/s per core, and the model's FLOPs
(counted by ``torch.utils.flop_counter``) times images/s as a fraction of the machine's measured
matmul peak in the same precision. scaling fits the exponent b of wall time ~ images^b at 1x, 2x,
4x images: 1.0 means linear (no per-call setup cost hiding in the small runs, no slowdown at the
large ones).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench.harness import Goal, entry, median, rates, repeat
from dala_model.device import resolve_precision
from dala_model.engine.inference import predict_logits
from dala_model.models.registry import build_model
from dala_model.models.transforms import eval_transform

MODEL = "dalaresnet50"
VARIANTS = {
    "fp32-nchw": ("fp32", False),
    "fp32-channels_last": ("fp32", True),
    "bf16-channels_last": ("bf16", True),
}


def model_flops(model: nn.Module, size: int) -> float:
    """FLOPs of one forward pass on one image (2 per multiply-accumulate)."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 3) -> float:
    """Measured FLOP/s of a large square matmul: the practical peak of this machine in ``dtype``."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    seconds = repeat(lambda: a @ b, reps)
    return 2 * n**3 / min(seconds)


def predictor(model: nn.Module, precision: str, channels_last: bool, batch: int):
    """A callable scoring uint8 NHWC images with our batched path under one setting."""
    cpu = torch.device("cpu")
    ready = copy.deepcopy(model).to(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    dtype = resolve_precision(precision, cpu)
    return lambda images: predict_logits(
        ready,
        images,
        preset="paper",
        device=cpu,
        dtype=dtype,
        batch_size=batch,
        channels_last=channels_last,
    )


def per_image_loop(model: nn.Module, images: np.ndarray) -> None:
    """The naive reference: one image at a time, torchvision eval transform, fp32, NCHW."""
    transform = eval_transform("paper", images.shape[1])
    model.eval()
    with torch.no_grad():
        for image in images:
            model(transform(torch.from_numpy(image).permute(2, 0, 1)).unsqueeze(0))


def run(
    images: np.ndarray,
    *,
    ref_images: int,
    batch: int,
    reps: int,
    scaling_base: int,
    scaling_reps: int,
    variants: tuple[str, ...] = tuple(VARIANTS),
) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = build_model(MODEL).eval()
    size, n = images.shape[1], len(images)
    per_variant = {}
    for name in variants:
        score = predictor(model, *VARIANTS[name], batch)
        per_variant[name] = rates(n, repeat(lambda score=score: score(images), reps))
    best = max(per_variant, key=lambda k: median(per_variant[k]))
    subset = images[:ref_images]
    ref_rates = rates(len(subset), repeat(lambda: per_image_loop(model, subset), reps))
    ours, reference = median(per_variant[best]), median(ref_rates)

    flops = model_flops(model, size)
    precision = VARIANTS[best][0]
    peak = matmul_peak(resolve_precision(precision, torch.device("cpu")) or torch.float32)
    cores = torch.get_num_threads()
    infer = entry(
        "infer-cpu",
        "images/s",
        ours,
        reference,
        goal=Goal("ratio", low=3),
        settings={
            "model": MODEL,
            "images": n,
            "reference_images": len(subset),
            "size": size,
            "batch": batch,
            "reps": reps,
            "warmup": 1,
            "threads": cores,
            "ours": best,
            "ours_path": "dala_model.engine.inference.predict_logits (inference_mode, batched)",
            "reference": "per-image loop: eval_transform + model(x[None]) under no_grad, fp32, NCHW",
        },
        reps={"ours": per_variant[best], "reference": ref_rates},
        extra={
            "variants_images_per_s": {k: median(v) for k, v in per_variant.items()},
            "variants_reps": per_variant,
            "images_per_s_per_core": ours / cores,
            "cores": cores,
            "model_gflops_per_image": flops / 1e9,
            "achieved_gflops": ours * flops / 1e9,
            "matmul_peak_gflops": peak / 1e9,
            "matmul_peak_dtype": precision,
            "fraction_of_matmul_peak": ours * flops / peak,
        },
    )

    counts = [scaling_base, 2 * scaling_base, 4 * scaling_base]
    pool = np.concatenate([images] * (-(-counts[-1] // n)))[: counts[-1]]
    score = predictor(model, *VARIANTS[best], scaling_base)
    times = {c: repeat(lambda c=c: score(pool[:c]), scaling_reps) for c in counts}
    medians = [median(times[c]) for c in counts]
    exponent = float(np.polyfit(np.log(counts), np.log(medians), 1)[0])
    scaling = entry(
        "scaling",
        "exponent b in seconds ~ images^b",
        exponent,
        1.0,
        ratio=exponent,
        ratio_means="fitted exponent / 1 (linear)",
        goal=Goal("ours", low=0.9, high=1.1),
        settings={
            "images": counts,
            "batch": scaling_base,
            "reps": scaling_reps,
            "warmup": 1,
            "ours": best,
            "path": "dala_model.engine.inference.predict_logits",
        },
        reps={f"seconds_at_{c}": times[c] for c in counts},
        extra={"median_seconds": dict(zip(map(str, counts), medians, strict=True))},
    )
    return [infer, scaling]
