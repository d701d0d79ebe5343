"""train-cpu: training images/s of dalaresnet50 at 224, our CPU path vs the naive paper pipeline.

Ours is the training engine's own epoch function (``dala_model.engine.train._train_epoch``: pixels from the
decoded cache as one uint8 array, batches gathered by index, normalised and augmented as a batch)
under each candidate setting (precision x memory format); the fastest is "ours" and every one is
reported, which is what justifies bf16 (or not) on a CPU. fp32-nchw is left out by default to keep
the suite short: infer-cpu measures channels_last against NCHW on the same convolutions. The reference is what the
paper's code does: a torch Dataset that opens and decodes each PNG with PIL every epoch and applies
torchvision transforms per image, a default DataLoader (no workers), fp32 and NCHW.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bench.harness import Goal, entry, median, rates, repeat
from dala_model.device import resolve_precision
from dala_model.engine import train as engine
from dala_model.engine.config import TrainConfig
from dala_model.engine.distributed import World
from dala_model.models.registry import build_model
from dala_model.models.transforms import BatchAugment, train_transform

MODEL = "dalaresnet50"
VARIANTS = {
    "fp32-nchw": ("fp32", False),
    "fp32-channels_last": ("fp32", True),
    "bf16-channels_last": ("bf16", True),
}


class PngDataset(Dataset):
    """The naive dataset: decode + transform every image on every access."""

    def __init__(self, paths: list[str], labels: np.ndarray, size: int) -> None:
        self.paths, self.labels = paths, labels
        self.transform = train_transform("paper", size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB")), int(self.labels[i])


def naive_epoch_fn(paths: list[str], labels: np.ndarray, size: int, batch: int):
    torch.manual_seed(0)
    model = build_model(MODEL)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    criterion = nn.CrossEntropyLoss()
    loader = DataLoader(PngDataset(paths, labels, size), batch_size=batch, shuffle=True)

    def epoch() -> None:
        model.train()
        for x, y in loader:
            loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return epoch


def engine_epoch_fn(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    precision: str,
    channels_last: bool,
    batch: int,
    device: torch.device,
    compile_model: bool = False,
    root: str = "unused",
):
    """One call = one epoch of the training engine's own loop on ``images`` (already in memory)."""
    torch.manual_seed(0)
    config = TrainConfig(
        root=root,
        magnification=40,
        model=MODEL,
        batch_size=batch,
        precision=precision,
        channels_last=channels_last,
        image_size=images.shape[1],
        compile=compile_model,
        device=str(device),
    )
    model = build_model(MODEL).to(
        device, memory_format=torch.channels_last if channels_last else torch.preserve_format
    )
    step_model = torch.compile(model, dynamic=False) if compile_model else model
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    criterion = nn.CrossEntropyLoss()
    augment = BatchAugment(degrees=config.rotation_degrees)
    dtype = resolve_precision(precision, device)
    train_x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    train_y = torch.from_numpy(labels).to(device)
    epochs = itertools.count()

    def epoch() -> None:
        engine._train_epoch(
            config,
            next(epochs),
            step_model,
            optimizer,
            criterion,
            augment,
            train_x,
            train_y,
            device,
            dtype,
            World(),
        )  # one process

    return epoch


def run(
    images: np.ndarray,
    labels: np.ndarray,
    paths: list[str],
    *,
    batch: int,
    reps: int,
    variants: tuple[str, ...] = ("fp32-channels_last", "bf16-channels_last"),
) -> dict[str, Any]:
    n, size = len(images), images.shape[1]
    cpu = torch.device("cpu")
    per_variant: dict[str, list[float]] = {}
    for name in variants:
        precision, channels_last = VARIANTS[name]
        epoch = engine_epoch_fn(
            images,
            labels,
            precision=precision,
            channels_last=channels_last,
            batch=batch,
            device=cpu,
        )
        per_variant[name] = rates(n, repeat(epoch, reps))
    best = max(per_variant, key=lambda k: median(per_variant[k]))
    ref_rates = rates(n, repeat(naive_epoch_fn(paths, labels, size, batch), reps))
    ours, reference = median(per_variant[best]), median(ref_rates)
    return entry(
        "train-cpu",
        "images/s",
        ours,
        reference,
        goal=Goal("ratio", low=2),
        settings={
            "model": MODEL,
            "images_per_epoch": n,
            "size": size,
            "batch": batch,
            "reps": reps,
            "warmup": "1 epoch",
            "threads": torch.get_num_threads(),
            "ours": best,
            "ours_path": "cached uint8 pixels -> dala_model.engine.train._train_epoch (batch normalise + "
            "BatchAugment, Adam)",
            "reference": "PIL decode + torchvision train_transform per image in a default "
            "DataLoader, fp32, NCHW",
        },
        reps={"ours": per_variant[best], "reference": ref_rates},
        extra={
            "variants_images_per_s": {k: median(v) for k, v in per_variant.items()},
            "variants_reps": per_variant,
        },
    )
