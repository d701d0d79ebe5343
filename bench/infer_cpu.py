"""infer-cpu, infer-cpu-int8 and scaling: batched inference (``dala_model.engine.inference``) on the CPU.

infer-cpu: "ours" is what the scorer serves: the model with each BatchNorm folded into its
convolution (``dala_model.engine.inference.fold_batchnorm``, as ``dala_model.serving.scorer``
does) at the autotuned choice (``dala_model.engine.autotune.choose``, measured on first use:
precision x memory format x batch);
it is timed in the same interleaved rounds as every candidate setting at the suite's batch and
the naive per-image fp32 eager loop (the reference), so each ratio comes from one run. It is put
against the hardware: the model's FLOPs (``torch.utils.flop_counter``) times images/s as a
fraction of the measured matmul peak of the best precision the CPU has natively
(``bench.harness.hardware_fraction``).

infer-cpu-int8: the post-training int8 model (``dala_model.engine.quantize``), calibrated on one
set of images and scored on another, against our best float path (the autotuned choice) in
interleaved rounds (the float side folded as the scorer folds it; the int8 model's own
quantization folds BatchNorm too). Its agreement (fraction of identical predicted labels) and ROC-AUC difference
need a model whose predictions depend on the image: the bench has no trained checkpoint, so it
scores dalaresnet50 after a few Adam steps on the calibration images (:func:`briefly_trained`
says why untrained weights would not do); the float model's predicted-malignant fraction and
the logit SQNR are recorded, so a one-class predictor (trivial agreement) is visible.

scaling fits the exponent b of wall time ~ images^b at 1x, 2x, 4x images: 1.0 means linear.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from bench.harness import Goal, entry, hardware_fraction, interleaved, median, model_flops, rates
from dala_model.engine import autotune
from dala_model.engine.inference import fold_batchnorm, predict_logits
from dala_model.engine.quantize import quantize_for_cpu
from dala_model.models.registry import build_model
from dala_model.models.transforms import eval_transform, normalize_batch

MODEL = "dalaresnet50"
CPU = torch.device("cpu")


def predictor(model: nn.Module, precision: str, channels_last: bool, batch: int):
    """A callable scoring uint8 NHWC images with our batched path under one setting."""
    ready = copy.deepcopy(model).to(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    choice = autotune.Choice(precision, channels_last, batch)
    return lambda images: predict_logits(
        ready,
        images,
        preset="paper",
        device=CPU,
        dtype=choice.dtype(CPU),
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


def served(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with the scorer's arithmetic: every BatchNorm folded into its conv."""
    folded = copy.deepcopy(model).eval()
    fold_batchnorm(folded)
    return folded


def autotuned(model: nn.Module, size: int) -> autotune.Choice:
    return autotune.choose("infer", MODEL, size, CPU, model=model)


def run(
    images: np.ndarray,
    *,
    ref_images: int,
    batch: int,
    reps: int,
    scaling_base: int,
    scaling_reps: int,
) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = build_model(MODEL).eval()
    ours_model = served(model)
    size, n = images.shape[1], len(images)
    choice = autotuned(ours_model, size)
    ours_fn = predictor(
        ours_model, choice.precision, choice.channels_last, choice.batch_size or batch
    )
    fns = {"ours": lambda: ours_fn(images)}
    for precision in autotune.precisions(CPU, "infer"):
        for channels_last in (True, False):
            score = predictor(ours_model, precision, channels_last, batch)
            fns[autotune.candidate_label(precision, channels_last)] = lambda s=score: s(images)
    subset = images[:ref_images]
    fns["reference"] = lambda: per_image_loop(model, subset)
    seconds = interleaved(fns, reps)
    measured = {k: rates(len(subset) if k == "reference" else n, v) for k, v in seconds.items()}
    ours, reference = median(measured["ours"]), median(measured["reference"])
    variants = {k: median(v) for k, v in measured.items() if k not in ("ours", "reference")}
    cores = torch.get_num_threads()
    infer = entry(
        "infer-cpu",
        "images/s",
        ours,
        reference,
        goal=Goal("ratio", low=3 if autotune.native_bf16(CPU) else 1.2),
        settings={
            "model": MODEL,
            "images": n,
            "reference_images": len(subset),
            "size": size,
            "batch": batch,
            "reps": reps,
            "warmup": 1,
            "timing": "interleaved rounds: ours, each variant, reference",
            "threads": cores,
            "ours": choice.label,
            "ours_path": "dala_model.engine.inference.predict_logits with the autotuned choice, "
            "BatchNorm folded as the scorer serves it (the variants too; the reference is not)",
            "reference": "per-image loop: eval_transform + model(x[None]) under no_grad, fp32, NCHW",
        },
        reps={"ours": measured["ours"], "reference": measured["reference"]},
        extra={
            "autotune": choice.record(),
            "variants_images_per_s": variants,
            "variants_reps": {k: measured[k] for k in variants},
            "best_variant_at_suite_batch": max(variants, key=variants.get),
            "images_per_s_per_core": ours / cores,
            "cores": cores,
            "model_gflops_per_image": model_flops(model, size) / 1e9,
            **hardware_fraction(ours, model_flops(model, size)),
        },
    )
    return [infer, _scaling(ours_model, choice, images, scaling_base, scaling_reps)]


def _scaling(model, choice, images, base: int, reps: int) -> dict[str, Any]:
    counts = [base, 2 * base, 4 * base]
    pool = np.concatenate([images] * (-(-counts[-1] // len(images))))[: counts[-1]]
    score = predictor(model, choice.precision, choice.channels_last, base)
    times = interleaved({str(c): lambda c=c: score(pool[:c]) for c in counts}, reps)
    medians = [median(times[str(c)]) for c in counts]
    exponent = float(np.polyfit(np.log(counts), np.log(medians), 1)[0])
    return entry(
        "scaling",
        "exponent b in seconds ~ images^b",
        exponent,
        1.0,
        ratio=exponent,
        ratio_means="fitted exponent / 1 (linear)",
        goal=Goal("ours", low=0.9, high=1.1),
        settings={
            "images": counts,
            "batch": base,
            "reps": reps,
            "warmup": 1,
            "ours": choice.label,
            "path": "dala_model.engine.inference.predict_logits",
        },
        reps={f"seconds_at_{c}": times[str(c)] for c in counts},
        extra={"median_seconds": dict(zip(map(str, counts), medians, strict=True))},
    )


def briefly_trained(
    pixels: np.ndarray, labels: np.ndarray, steps: int, batch: int = 8
) -> nn.Module:
    """dalaresnet50 after ``steps`` Adam steps (lr 1e-3) on ``pixels``: the smallest training
    that makes its features depend on the image. From random weights they barely do, and the
    int8 error then swamps the differences between images (measured at 64 px on the real
    sample: logit SQNR -0.2 dB from random weights with a fitted classifier, 34.5 dB after 20
    steps), so agreement measured on an untrained model would say nothing about int8."""
    torch.manual_seed(0)
    model = build_model(MODEL)
    x = normalize_batch(torch.from_numpy(np.ascontiguousarray(pixels)), "paper")
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        pick = torch.randperm(len(x), generator=generator)[:batch]
        loss = nn.functional.cross_entropy(model(x[pick]), y[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def logit_sqnr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of the malignant-minus-benign logit, in dB."""
    ref = (reference[:, 1] - reference[:, 0]).double()
    noise = ref - (other[:, 1] - other[:, 0]).double()
    return float(10 * torch.log10(ref.square().sum() / noise.square().sum().clamp_min(1e-30)))


def run_int8(
    calibration: np.ndarray,
    calibration_labels: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    reps: int,
    train_steps: int,
) -> dict[str, Any]:
    model = briefly_trained(calibration, calibration_labels, train_steps)
    size = images.shape[1]
    float_model = served(model)
    choice = autotuned(float_model, size)
    batch = choice.batch_size or 16
    quantized = quantize_for_cpu(model, calibration, "paper")  # folds BatchNorm itself
    float_fn = predictor(float_model, choice.precision, choice.channels_last, batch)
    int8_fn = predictor(quantized, "fp32", False, batch)  # int8 kernels; no autocast on top
    seconds = interleaved(
        {"int8": lambda: int8_fn(images), "float": lambda: float_fn(images)}, reps
    )
    measured = {k: rates(len(images), v) for k, v in seconds.items()}
    float_logits, int8_logits = float_fn(images), int8_fn(images)
    float_p = torch.softmax(float_logits, 1)[:, 1].numpy()
    int8_p = torch.softmax(int8_logits, 1)[:, 1].numpy()
    both_classes = len(set(labels.tolist())) == 2
    auc = {
        "float": float(roc_auc_score(labels, float_p)) if both_classes else None,
        "int8": float(roc_auc_score(labels, int8_p)) if both_classes else None,
    }
    return entry(
        "infer-cpu-int8",
        "images/s",
        median(measured["int8"]),
        median(measured["float"]),
        goal=Goal("ratio", low=2),
        settings={
            "model": f"{MODEL} after {train_steps} Adam steps on the calibration images "
            "(no trained checkpoint in the bench; see briefly_trained)",
            "calibration_images": len(calibration),
            "images": len(images),
            "size": size,
            "batch": batch,
            "reps": reps,
            "warmup": 1,
            "timing": "interleaved rounds: int8, float",
            "ours": "int8 (dala_model.engine.quantize.quantize_for_cpu, FX x86 static PTQ)",
            "reference": f"our best float inference: the autotuned {choice.label}, "
            "BatchNorm folded as the scorer serves it",
        },
        reps={"ours": measured["int8"], "reference": measured["float"]},
        extra={
            "agreement": float(((float_p > 0.5) == (int8_p > 0.5)).mean()),
            "agreement_goal": 0.99,
            "roc_auc": auc,
            "roc_auc_difference": None if auc["float"] is None else auc["int8"] - auc["float"],
            "roc_auc_goal": "within 0.005 of float",
            "max_probability_difference": float(np.abs(float_p - int8_p).max()),
            "logit_sqnr_db": logit_sqnr_db(float_logits, int8_logits),
            "float_predicted_malignant_fraction": float((float_p > 0.5).mean()),
            "float_autotune": choice.record(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
    )
