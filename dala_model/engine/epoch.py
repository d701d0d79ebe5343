"""One training epoch, and the evaluation of a split, on pixels already in memory.

Speed comes from the data path, not from tricks in the model: the split's pixels are one uint8
array (moved to the GPU once when training there), batches are gathered by index, normalised
and augmented on the device, and the loss of every step stays on the device until the epoch
ends, so no step waits on a host sync.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dala_model.data.dataset import SplitImages
from dala_model.device import autocast, synchronize
from dala_model.engine import distributed
from dala_model.engine.config import TrainConfig
from dala_model.engine.inference import predict_logits
from dala_model.engine.sampling import AUGMENT_SALT, epoch_order, epoch_seed
from dala_model.metrics import classification_metrics
from dala_model.models.transforms import BatchAugment, normalize_batch


class NonFiniteLoss(RuntimeError):
    """Training diverged; the run stops and its best model is not promoted."""


@dataclass(frozen=True)
class EpochContext:
    """What a training epoch needs, fixed for the whole run.

    ``model`` is what a step calls (the model itself, or its DDP and/or compiled wrapper);
    ``images`` are the training split's uint8 pixels (NHWC, on the GPU when training there) and
    ``labels`` their classes on ``device``.
    """

    config: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    augment: BatchAugment
    images: torch.Tensor
    labels: torch.Tensor
    device: torch.device
    dtype: torch.dtype
    job: distributed.World = distributed.World()


@dataclass(frozen=True)
class EpochStats:
    """An epoch's training totals (over all ranks under DDP)."""

    loss: float
    accuracy: float
    seen: int


def training_tensors(split: SplitImages, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split's pixels and labels as tensors for :class:`EpochContext`.

    The pixels are copied to the GPU once when training there; every epoch then gathers on it.
    """
    images = torch.from_numpy(split.images)
    if device.type == "cuda":
        images = images.to(device)
    return images, torch.from_numpy(split.labels).to(device)


def train_epoch(ctx: EpochContext, epoch: int) -> EpochStats:
    """Train one epoch in the order and with the augmentation that ``(seed, epoch)`` fix.

    Raises :class:`NonFiniteLoss` when any step's loss was NaN or infinite.
    """
    config, job, device = ctx.config, ctx.job, ctx.device
    ctx.model.train()
    batches = _batches(ctx, epoch)
    # Ranks draw different augmentations (rank 0, and a single process, keep the original seed).
    augment_seed = epoch_seed(config.seed, epoch, salt=AUGMENT_SALT) ^ job.rank
    generator = torch.Generator(device=device).manual_seed(augment_seed)
    losses = torch.zeros(len(batches), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    # The epoch's indices go to the pixels' device in one copy: a copy per step from pageable
    # memory would make the host wait for the GPU every step, so it could never queue ahead.
    sizes = [len(batch) for batch in batches]
    indices = torch.from_numpy(np.concatenate(batches)).to(ctx.images.device).split(sizes)
    same_device = ctx.labels.device == ctx.images.device
    label_indices = indices if same_device else [i.to(device) for i in indices]
    steps = tqdm(
        zip(indices, label_indices, strict=True),
        total=len(sizes),
        desc=f"epoch {epoch + 1}",
        leave=False,
        disable=not (sys.stderr.isatty() and job.is_main),
    )
    for b, (index, label_index) in enumerate(steps):
        loss, hits = _step(ctx, generator, index, label_index)
        losses[b] = loss
        correct += hits
    seen = sum(sizes)
    synchronize(device)
    if job.size > 1:  # epoch totals over all ranks, so every rank logs and checks the same numbers
        losses = distributed.sum_over_ranks(losses, job) / job.size
        distributed.sum_over_ranks(correct, job)
        seen = int(distributed.sum_over_ranks(torch.tensor(seen, device=device), job))
    _check_finite(losses, config, epoch)
    return EpochStats(loss=float(losses.mean()), accuracy=int(correct) / seen, seen=seen)


def _batches(ctx: EpochContext, epoch: int) -> list[np.ndarray]:
    """This rank's share of each batch of the epoch's order."""
    config, job = ctx.config, ctx.job
    order = epoch_order(ctx.labels.cpu().numpy(), config.seed, epoch, config.imbalance)
    batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2 * job.size:
        batches.pop()  # BatchNorm cannot train on a single image (per rank)
    return [distributed.shard(batch, job) for batch in batches]


def _step(
    ctx: EpochContext, generator: torch.Generator, index: torch.Tensor, label_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on one batch; its loss and correct count stay on the device."""
    config = ctx.config
    xb = ctx.images.index_select(0, index).to(ctx.device, non_blocking=True)
    yb = ctx.labels.index_select(0, label_index)
    x = ctx.augment(
        normalize_batch(xb, config.preset, channels_last=config.channels_last),
        generator=generator,
    )
    with autocast(ctx.device, ctx.dtype):
        logits = ctx.model(x)
    loss = ctx.criterion(logits.float(), yb)
    ctx.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    ctx.optimizer.step()
    return loss.detach(), (logits.argmax(dim=1) == yb).sum()


def _check_finite(losses: torch.Tensor, config: TrainConfig, epoch: int) -> None:
    finite = torch.isfinite(losses)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0, 0])
        raise NonFiniteLoss(
            f"{config.resolved_run_id}: loss became {losses[bad].item()} at epoch {epoch + 1}, batch {bad + 1}; "
            "the run stopped and its best model was not promoted (try a lower learning rate)"
        )


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, images: torch.Tensor, config: TrainConfig, device, dtype
) -> None:
    """Recompute BatchNorm running statistics over the (unaugmented) training images.

    During training BatchNorm normalises with batch statistics while its running averages lag
    behind weights that move every step; early in a run (or with few steps per epoch, as on
    BreakHis) evaluation with those stale averages collapses to one class even when the weights
    are good. One forward pass with cumulative averaging ("precise BN") fixes the statistics and
    leaves the weights, and so the optimisation trajectory, untouched. Only BatchNorm layers
    switch to train mode, so dropout draws no random numbers here.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    was_training = model.training
    model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
        m.train()
    with autocast(device, dtype):
        for start in range(0, len(images), config.batch_size * 4):
            batch = images[start : start + config.batch_size * 4].to(device, non_blocking=True)
            model(normalize_batch(batch, config.preset, channels_last=config.channels_last))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)


def split_logits(
    config: TrainConfig, model: nn.Module, split: SplitImages, device, dtype
) -> torch.Tensor:
    """Scores of a split with the run's preset, precision and memory format (val and test alike)."""
    return predict_logits(
        model, split.images, preset=config.preset, device=device, dtype=dtype,
        channels_last=config.channels_last,
    )  # fmt: skip


def validate(
    config: TrainConfig, model: nn.Module, split: SplitImages, criterion, device, dtype
) -> dict:
    """Loss, accuracy, G-mean and weighted F1 of ``model`` on ``split`` (the validation split)."""
    logits = split_logits(config, model, split, device, dtype)
    y_true = split.labels
    loss = float(criterion(logits.to(device), torch.from_numpy(y_true).to(device)))
    y_pred = logits.argmax(dim=1).numpy()
    metrics = classification_metrics(y_true, y_pred)
    return {
        "loss": loss,
        "accuracy": metrics["accuracy"],
        "gmean": metrics["gmean"],
        "f1_weighted": metrics["f1_weighted"],
    }
