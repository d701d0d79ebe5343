"""Preprocessing as data: normalisation presets, per-image transforms and the batched hot path.

Two ways in, one result:

- ``train_transform``/``eval_transform``: torchvision.transforms.v2 pipelines for single images
  (PIL or uint8 CHW tensors), for ad-hoc use and inference on files.
- ``normalize_batch`` + ``BatchAugment``: the training hot path. Images stay uint8 until they
  are on the device, are normalised there in one fused multiply-add, and are augmented with one
  ``affine_grid``/``grid_sample`` for the whole batch, each sample with its own angle and flip.

Both rotate *after* normalising and fill the exposed corners with 0, i.e. with the preset's
mean colour, so the two paths produce the same distribution.

Rotation range: the paper says "random rotation" without a range; we use +-20 degrees
(:data:`ROTATION_DEGREES`), a common histopathology choice that keeps most of the tissue in
frame (larger angles cut ~20% of a square image away at 45 degrees).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

ROTATION_DEGREES = 20.0


@dataclass(frozen=True)
class Preset:
    """Per-channel normalisation ``(x / 255 - mean) / std`` and why it exists."""

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str


PRESETS: dict[str, Preset] = {
    "paper": Preset("paper", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "the paper's scaling to [-1, 1]"),
    "imagenet": Preset(
        "imagenet",
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
        "ImageNet statistics, what torchvision/timm pretrained backbones were trained with",
    ),
}


def get_preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}") from None


def _to_normalized(preset: str | Preset, size: int) -> list[nn.Module]:
    p = get_preset(preset)
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    return [
        v2.ToImage(),
        v2.Resize((size, size), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(p.mean), std=list(p.std)),
    ]


def eval_transform(preset: str | Preset = "paper", size: int = 224) -> v2.Compose:
    """Resize to ``size`` x ``size`` and normalise: PIL image or uint8 CHW -> float CHW."""
    return v2.Compose(_to_normalized(preset, size))


def train_transform(
    preset: str | Preset = "paper", size: int = 224, degrees: float = ROTATION_DEGREES
) -> v2.Compose:
    """The paper's training preprocessing: resize, normalise, random rotation, random h-flip."""
    return v2.Compose(
        [
            *_to_normalized(preset, size),
            v2.RandomRotation(degrees, fill=0.0),
            v2.RandomHorizontalFlip(),
        ]
    )


@functools.lru_cache(maxsize=16)
def _affine(preset: Preset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel scale and shift of ``preset`` on ``device``, made once: building them per batch
    would cost two blocking host-to-device copies in every training and inference step."""
    std = torch.tensor(preset.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    mean = torch.tensor(preset.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return 1.0 / (255.0 * std), mean / std


def normalize_batch(
    x: torch.Tensor, preset: str | Preset = "paper", channels_last: bool = False
) -> torch.Tensor:
    """uint8 images (N, H, W, 3) or (N, 3, H, W) -> float32 (N, 3, H, W) normalised by ``preset``.

    Runs on whatever device ``x`` is on: move the uint8 batch first (4x fewer bytes than float).
    With ``channels_last`` the result uses that memory format, which NHWC input gives for free.
    """
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.ndim != 4:
        got = (
            f"{x.dtype} tensor of shape {tuple(x.shape)}"
            if isinstance(x, torch.Tensor)
            else type(x).__name__
        )
        raise ValueError(
            f"normalize_batch needs a uint8 tensor (N, H, W, 3) or (N, 3, H, W), got {got}"
        )
    if x.shape[1] == 3:
        nchw = x
    elif x.shape[3] == 3:
        nchw = x.permute(0, 3, 1, 2)  # a channels_last view, no copy
    else:
        raise ValueError(
            f"normalize_batch needs 3 colour channels in dim 1 (NCHW) or dim 3 (NHWC), "
            f"got shape {tuple(x.shape)}"
        )
    scale, shift = _affine(get_preset(preset), x.device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = nchw.to(dtype=torch.float32, memory_format=fmt)
    return out.mul_(scale).sub_(shift)


class BatchAugment(nn.Module):
    """Random rotation and horizontal flip, drawn independently per sample, on a float NCHW batch.

    One ``affine_grid`` + ``grid_sample`` call handles the whole batch on its device; the random
    draws come from ``generator`` when given (on the generator's device, then moved), so a seeded
    generator replays the exact augmentation. Positive angles turn counter-clockwise, as in
    torchvision. Call in training only; it is the identity for ``degrees=0, flip_p=0``.
    """

    def __init__(
        self, degrees: float | tuple[float, float] = ROTATION_DEGREES, flip_p: float = 0.5
    ) -> None:
        super().__init__()
        low, high = (
            (-float(degrees), float(degrees)) if isinstance(degrees, int | float) else degrees
        )
        if low > high:
            raise ValueError(f"BatchAugment: degrees range ({low}, {high}) is empty")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"BatchAugment: flip_p={flip_p} must be a probability in [0, 1]")
        self.degrees = (float(low), float(high))
        self.flip_p = float(flip_p)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(
                f"BatchAugment needs a float (N, C, H, W) batch, got {x.dtype} {tuple(x.shape)}"
            )
        n, _, h, w = x.shape
        draw_on = generator.device if generator is not None else x.device
        u = torch.rand(n, 2, generator=generator, device=draw_on).to(x.device, torch.float32)
        low, high = self.degrees
        angle = torch.deg2rad(low + (high - low) * u[:, 0])
        flip = torch.where(u[:, 1] < self.flip_p, -1.0, 1.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        zero = torch.zeros_like(angle)
        # Output -> input sampling map in normalised coordinates (y points down, so this matrix
        # turns the content counter-clockwise); the aspect terms keep non-square images undistorted,
        # and the flip negates the input's x axis.
        theta = torch.stack(
            [
                torch.stack([cos * flip, -sin * (h / w), zero], dim=1),
                torch.stack([sin * (w / h) * flip, cos, zero], dim=1),
            ],
            dim=1,
        )
        grid = F.affine_grid(theta.to(x.dtype), [n, x.shape[1], h, w], align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out.contiguous(memory_format=torch.channels_last) if _is_channels_last(x) else out


def _is_channels_last(x: torch.Tensor) -> bool:
    return (
        x.shape[1] > 1
        and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous()
    )
