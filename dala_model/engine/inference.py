"""Batched prediction on uint8 images: the one scoring path for validation, test and batch inference.

Images stay uint8 until they reach the device (4x less to copy), are normalised there with the
checkpoint's preset, and run under ``inference_mode`` with autocast where the device supports it.
Which precision, memory format and (CPU) batch size to score with is measured once per machine by
:func:`tuned` (``dala_model.engine.autotune``); an int8 model from
``dala_model.engine.quantize`` goes through the same :func:`predict_logits` with ``dtype=None``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dala_model.device import autocast
from dala_model.engine import autotune
from dala_model.models.transforms import normalize_batch


def predict_logits(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    *,
    preset: str,
    device: torch.device,
    dtype: torch.dtype | None = None,
    batch_size: int = 128,
    channels_last: bool = True,
) -> torch.Tensor:
    """Logits (N, classes) as float32 on the CPU for uint8 NHWC ``images`` (numpy or tensor)."""
    if len(images) == 0:
        raise ValueError("predict_logits got an empty batch of images; nothing to score")
    pixels = (
        torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    )
    was_training = model.training
    model.eval()
    outputs = []
    with torch.inference_mode(), autocast(device, dtype):
        for start in range(0, len(pixels), batch_size):
            batch = pixels[start : start + batch_size].to(device, non_blocking=True)
            x = normalize_batch(batch, preset, channels_last=channels_last)
            outputs.append(model(x).float())
    model.train(was_training)
    return torch.cat(outputs).cpu()


def predict_proba(model: nn.Module, images: np.ndarray | torch.Tensor, **kwargs) -> np.ndarray:
    """Probability of the malignant class (label 1) for each image."""
    logits = predict_logits(model, images, **kwargs)
    return torch.softmax(logits, dim=1)[:, 1].numpy()


def tuned(
    model: nn.Module,
    *,
    model_name: str,
    image_size: int,
    device: torch.device,
    precision: str | None = None,
    channels_last: bool | None = None,
    batch_size: int | None = None,
) -> tuple[nn.Module, dict, autotune.Choice]:
    """``model`` on ``device`` in the measured (or given) memory format, the keyword arguments
    that make :func:`predict_logits` run the measured choice, and the choice to record."""
    choice = autotune.choose(
        "infer",
        model_name,
        image_size,
        device,
        precision=precision,
        channels_last=channels_last,
        batch_size=batch_size,
        model=model,
    )
    layout = torch.channels_last if choice.channels_last else torch.contiguous_format
    kwargs = {
        "device": device,
        "dtype": choice.dtype(device),
        "channels_last": choice.channels_last,
        "batch_size": choice.batch_size or batch_size or 128,
    }
    return model.to(device, memory_format=layout), kwargs, choice
