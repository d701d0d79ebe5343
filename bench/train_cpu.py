"""train-cpu: training images/s of dalaresnet50 at 224, our CPU path vs the naive paper pipeline.

Ours is the training engine's own epoch function (``dala_model.engine.epoch.train_epoch``: pixels from the
decoded cache as one uint8 array, batches gathered by index, normalised and augmented as a batch)
under every candidate setting (precision x memory format: bf16 only where the CPU has it
natively), all timed in interleaved rounds with the reference. "Ours" is the setting the engine's
autotuner (``dala_model.engine.autotune.choose("train", ...)``) picks on first use, not the best
of the bench's own rounds, so the entry measures what a user gets; ``extra.best_variant`` says
whether the autotuner's short probe agreed. ``fraction_of_matmul_peak`` uses the FLOPs of a
forward + backward pass (``bench.harness.model_flops(train=True)``). The reference is what the
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

from bench.harness import Goal, entry, hardware_fraction, interleaved, median, model_flops, rates
from dala_model.device import resolve_precision
from dala_model.engine import autotune
from dala_model.engine.config import TrainConfig
from dala_model.engine.epoch import EpochContext, train_epoch
from dala_model.models.registry import build_model
from dala_model.models.transforms import BatchAugment, train_transform

MODEL = "dalaresnet50"


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
    context = EpochContext(
        config=config,
        model=step_model,
        optimizer=optimizer,
        criterion=criterion,
        augment=augment,
        images=train_x,
        labels=train_y,
        device=device,
        dtype=dtype,
    )  # one process
    epochs = itertools.count()

    def epoch() -> None:
        train_epoch(context, next(epochs))

    return epoch


def run(
    images: np.ndarray,
    labels: np.ndarray,
    paths: list[str],
    *,
    batch: int,
    reps: int,
) -> dict[str, Any]:
    n, size = len(images), images.shape[1]
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = build_model(MODEL)
    choice = autotune.choose("train", MODEL, size, cpu, batch_size=batch, model=model)
    fns = {}
    for precision in autotune.precisions(cpu, "train"):
        for channels_last in (True, False):
            fns[autotune.candidate_label(precision, channels_last)] = engine_epoch_fn(
                images,
                labels,
                precision=precision,
                channels_last=channels_last,
                batch=batch,
                device=cpu,
            )
    fns["reference"] = naive_epoch_fn(paths, labels, size, batch)
    measured = {k: rates(n, v) for k, v in interleaved(fns, reps).items()}
    ours_name = autotune.candidate_label(choice.precision, choice.channels_last)
    ours, reference = median(measured[ours_name]), median(measured["reference"])
    variants = {k: median(v) for k, v in measured.items() if k != "reference"}
    flops = model_flops(model, size, train=True)
    return entry(
        "train-cpu",
        "images/s",
        ours,
        reference,
        goal=Goal("ratio", low=2 if autotune.native_bf16(cpu) else 1.2),
        settings={
            "model": MODEL,
            "images_per_epoch": n,
            "size": size,
            "batch": batch,
            "reps": reps,
            "warmup": "1 epoch",
            "timing": "interleaved rounds: each variant's epoch, then the reference's",
            "threads": torch.get_num_threads(),
            "ours": ours_name,
            "ours_path": "autotuned choice; cached uint8 pixels -> dala_model.engine.epoch."
            "train_epoch (batch normalise + BatchAugment, Adam)",
            "reference": "PIL decode + torchvision train_transform per image in a default "
            "DataLoader, fp32, NCHW",
        },
        reps={"ours": measured[ours_name], "reference": measured["reference"]},
        extra={
            "autotune": choice.record(),
            "variants_images_per_s": variants,
            "variants_reps": {k: v for k, v in measured.items() if k != "reference"},
            "best_variant": max(variants, key=variants.get),
            "model_gflops_per_image_train_step": flops / 1e9,
            **hardware_fraction(ours, flops),
        },
    )
