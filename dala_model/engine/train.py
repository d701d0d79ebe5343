"""The training engine: one model x one magnification x one split (or fold).

``train`` reads top to bottom as the loop's named steps, the division Lightning's fit loop
makes, without its callback framework: prepare the run folder (refuse a conflicting run, record
the config), set up the model and what an epoch needs, resume from the checkpoint, then per epoch
train and validate (``epoch``), keep the best model and checkpoint (``checkpointing``), and
finally evaluate the best model on the test split and write ``run.json``. With a tracking URI,
rank 0 mirrors the run into MLflow at those same steps (``dala_model.tracking.training``);
the mirror is guarded and never fails a training.

Speed comes from the data path (see ``epoch``); resumability from deriving every random choice of
an epoch from ``(seed, epoch)`` (see ``sampling``) and checkpointing the rest (weights, optimiser,
the global RNG that dropout uses) atomically at each epoch's end: a resumed run replays exactly the
epochs an uninterrupted one would have run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from dala_model import runs, storage
from dala_model.data.dataset import SplitImages, load_split
from dala_model.data.manifest import manifest_version
from dala_model.data.splits import split_identity, split_uri
from dala_model.engine import autotune, distributed, records
from dala_model.engine.checkpointing import CheckpointWriter, model_card, restore
from dala_model.engine.config import TrainConfig
from dala_model.engine.epoch import (
    EpochContext,
    NonFiniteLoss,
    recalibrate_batchnorm,
    train_epoch,
    training_tensors,
    validate,
)
from dala_model.engine.records import RunConflict
from dala_model.engine.sampling import class_weights, seed_everything
from dala_model.metrics import monitor_score
from dala_model.models.checkpoint import save_model
from dala_model.models.registry import build_model
from dala_model.models.transforms import BatchAugment
from dala_model.tracking import training as tracking

# NonFiniteLoss is raised by an epoch (``epoch``) but is part of ``train``'s contract.
__all__ = ["NonFiniteLoss", "ProgressCallback", "RunConflict", "TrainResult", "completed_result",
           "completed_summary", "run_uri", "train"]  # fmt: skip

# The per-epoch line is logged under this module's name; tests and the e2e deployment read it so.
log = logging.getLogger(__name__)

ProgressCallback = Callable[[dict], None]


@dataclass
class TrainResult:
    run_id: str
    run_uri: str
    status: str  # "complete", or "skipped" when the run had already completed
    best_epoch: int
    metrics: dict
    train_seconds: float
    best_model_uri: str


@dataclass(frozen=True)
class _Run:
    """What the loop's steps share once the run is set up."""

    config: TrainConfig
    paths: runs.RunPaths
    data_version: str
    data: dict[str, SplitImages]
    model: nn.Module  # the plain model: validated, saved and checkpointed
    epoch: EpochContext  # what a training epoch needs, ``epoch.model`` being the stepped wrapper
    tuning: autotune.Choice  # the precision and memory format this machine runs (epoch.config)
    tracker: tracking.RunTracker  # the MLflow mirror (a no-op without a tracking URI, off rank 0)

    @property
    def job(self) -> distributed.World:
        return self.epoch.job


def run_uri(config: TrainConfig) -> str:
    return runs.run_folder(config.root, config.resolved_run_id)


def train(config: TrainConfig, progress: ProgressCallback | None = None) -> TrainResult:
    """Train, keep the best-on-validation model, evaluate it on the test split, write the run folder.

    Under ``torchrun`` every rank calls this; see ``dala_model.engine.distributed`` for the split of work.
    """
    storage.check_writable(config.root)  # fail in a second, not after an epoch
    job = distributed.world()
    if job.size == 1:
        return _train(config, progress, job)
    started = distributed.start(job, distributed.device_for(config.device, job))
    try:
        return _train(config, progress, job)
    finally:
        distributed.stop(started)


def _train(
    config: TrainConfig, progress: ProgressCallback | None, job: distributed.World
) -> TrainResult:
    paths = runs.RunPaths.of(run_uri(config))
    summary = completed_summary(config)
    if summary is not None:
        log.info("run %s is already complete; skipping", config.resolved_run_id)
        return _result(summary, paths, status="skipped")
    recorded, data_version = _prepare(config, paths, job)
    run = _setup(config, paths, data_version, job, record_config=recorded is None)
    with run.tracker.until_done():  # a training that raises ends its MLflow run as FAILED
        state = _resume(run)
        _fit(run, state, progress)
        return _finish(run, state)


def _prepare(
    config: TrainConfig, paths: runs.RunPaths, job: distributed.World
) -> tuple[dict | None, str]:
    """Refuse a folder holding another run; return its recorded config (None if new), data version."""
    recorded = _recorded(paths.config)
    data_version = manifest_version(config.root)
    if recorded is not None:
        if not config.resume and storage.exists(paths.checkpoint):
            raise RunConflict(
                f"run folder {storage.redact(paths.folder)} holds an unfinished run; pass resume=True "
                "(--resume) to continue it or choose another run_id/seed"
            )
        if recorded.get("data_version", data_version) != data_version:
            raise RunConflict(
                f"run folder {storage.redact(paths.folder)} was started on data version "
                f"{recorded['data_version']}, but the manifest is now {data_version}: resuming would "
                "mix two datasets; choose another run_id or seed"
            )
        records.check_same_split(
            recorded.get("split"), split_identity(config.root, config.scheme), paths
        )
    distributed.check_batch_size(config.batch_size, job)
    distributed.barrier(job)  # every rank has checked the folder before rank 0 writes to it
    return recorded, data_version


def _setup(
    config: TrainConfig,
    paths: runs.RunPaths,
    data_version: str,
    job: distributed.World,
    *,
    record_config: bool,
) -> _Run:
    """Seed, load the split, record the config (new runs), build the model and its optimiser.

    The order is part of the result: seeding precedes the model's initialisation.
    """
    device = distributed.device_for(config.device, job)
    # Measured before seeding: the timing runs draw random numbers.
    choice = records.tuning(config, device, job)
    dtype = choice.dtype(device)
    requested, config = config, config.model_copy(update={"channels_last": choice.channels_last})
    seed_everything(config.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    data = load_split(
        config.root,
        config.scheme,
        config.magnification,
        config.fold,
        config.image_size,
        config.use_cache,
    )
    if record_config and job.is_main:
        records.record_config(requested, paths, data_version, job, device, data)

    model = build_model(
        config.model, num_classes=2, pretrained=config.pretrained, **config.model_options
    )
    model = model.to(
        device, memory_format=torch.channels_last if config.channels_last else torch.preserve_format
    )
    parallel = distributed.wrap(model, device, job)
    step_model = torch.compile(parallel) if config.compile else parallel
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    criterion = nn.CrossEntropyLoss(weight=class_weights(config, data["train"].labels, device))
    augment = BatchAugment(degrees=config.rotation_degrees)

    train_x, train_y = training_tensors(data["train"], device)
    epoch = EpochContext(
        config=config,
        model=step_model,
        optimizer=optimizer,
        criterion=criterion,
        augment=augment,
        images=train_x,
        labels=train_y,
        device=device,
        dtype=dtype,
        job=job,
    )
    # Last, once nothing in the setup can fail: the MLflow run starts with the config's params.
    tracker = tracking.start(requested, paths, data_version, main=job.is_main)
    return _Run(requested, paths, data_version, data, model, epoch, choice, tracker)


def _resume(run: _Run) -> dict:
    """The loop state: a fresh one, or the checkpoint's (which also restores weights and RNGs)."""
    config = run.config
    if config.resume and storage.exists(run.paths.checkpoint):
        state = restore(run.paths.checkpoint, run.model, run.epoch.optimizer)
        log.info("resuming %s after epoch %d", config.resolved_run_id, state["epoch"])
        return state
    return {
        "epoch": -1,
        "history": [],
        "best": {"epoch": -1, "score": None, "val": {}},
        "train_seconds": 0.0,
    }


def _fit(run: _Run, state: dict, progress: ProgressCallback | None) -> None:
    """Every epoch not yet done: train, validate, keep the best; rank 0 checkpoints and reports."""
    checkpoints = CheckpointWriter(run.paths.checkpoint)
    try:
        for epoch in range(state["epoch"] + 1, run.config.epochs):
            record, val = _run_epoch(run, epoch)
            state["history"].append(record)
            state["epoch"] = epoch
            state["train_seconds"] += record["epoch_seconds"]
            _keep_if_best(run, state, epoch, val)
            if run.job.is_main:  # the other ranks train and validate alike; rank 0 alone writes
                _end_epoch(run, state, record, checkpoints, progress)
    finally:
        checkpoints.close()


def _run_epoch(run: _Run, epoch: int) -> tuple[dict, dict]:
    """Train one epoch and validate; return its history record and the validation metrics."""
    ctx = run.epoch
    config = ctx.config  # as run: the measured memory format filled in
    started = time.perf_counter()
    stats = train_epoch(ctx, epoch)
    train_seconds = time.perf_counter() - started
    if config.recalibrate_bn:
        recalibrate_batchnorm(run.model, ctx.images, config, ctx.device, ctx.dtype)
    val = validate(config, run.model, run.data["val"], ctx.criterion, ctx.device, ctx.dtype)
    record = {
        "epoch": epoch,
        "train_loss": stats.loss,
        "train_acc": stats.accuracy,
        "val_loss": val["loss"],
        "val_acc": val["accuracy"],
        "val_gmean": val["gmean"],
        "lr": ctx.optimizer.param_groups[0]["lr"],
        "images_per_s": stats.seen / train_seconds,
        "epoch_seconds": time.perf_counter() - started,
    }
    return record, val


def _beats(monitor: str, val: dict, best: dict) -> bool:
    """Whether validation metrics ``val`` beat ``best`` (``state["best"]``) under ``monitor``.

    A tie on the monitored metric goes to the lower validation loss: accuracy and G-mean at 0.5
    are coarse on a small validation split and stay flat while the model still improves. Measured
    on the quick profile (24 validation images, AMD EPYC, 2026-12-02): the 100X run called
    every validation image malignant at all 8 epochs (val accuracy 0.750 each time) and kept
    epoch 1 (val_loss 0.53; test G-mean 0.64 at its validation threshold) over epoch 8 (val_loss
    0.38). Ties on the loss keep the earlier epoch."""
    if best["score"] is None:
        return True
    score = monitor_score(monitor, val)
    if score != best["score"]:
        return score > best["score"]
    return float(val["loss"]) < float(best["val"].get("loss", float("inf")))


def _keep_if_best(run: _Run, state: dict, epoch: int, val: dict) -> None:
    """Record ``epoch`` as the best when it beats the best so far (:func:`_beats`)."""
    config = run.config
    if not _beats(config.monitor, val, state["best"]):
        return
    score = monitor_score(config.monitor, val)
    state["best"] = {"epoch": epoch, "score": score, "val": val}
    if run.job.is_main:
        save_model(
            run.model,
            run.paths.best,
            preset=config.preset,
            image_size=config.image_size,
            card=model_card(config, run.data_version, epoch, val),
        )


def _end_epoch(
    run: _Run,
    state: dict,
    record: dict,
    checkpoints: CheckpointWriter,
    progress: ProgressCallback | None,
) -> None:
    """Rank 0: checkpoint, write the history, log the epoch line, report progress."""
    config = run.config
    checkpoints.submit(run.model, run.epoch.optimizer, state)
    storage.write_parquet_atomic(pd.DataFrame(state["history"]), run.paths.history)
    log.info(
        "%s epoch %d/%d train_loss %.4f train_acc %.3f val_loss %.4f val_acc %.3f val_gmean %.3f "
        "%.0f img/s %.1fs",
        config.resolved_run_id,
        record["epoch"] + 1,
        config.epochs,
        record["train_loss"],
        record["train_acc"],
        record["val_loss"],
        record["val_acc"],
        record["val_gmean"],
        record["images_per_s"],
        record["epoch_seconds"],
    )
    run.tracker.epoch(record)
    if progress is not None:
        progress({**record, "epochs": config.epochs, "run_id": config.resolved_run_id})


def _finish(run: _Run, state: dict) -> TrainResult:
    """Rank 0 evaluates the best model on the test split and writes ``run.json``; the rest wait."""
    job = run.job
    if not job.is_main:
        distributed.barrier(job)  # wait for rank 0's test evaluation and run.json
        summary = json.loads(storage.read_bytes(run.paths.summary))
        return _result(summary, run.paths, status="complete")
    summary = records.summarise(run, state)
    storage.write_bytes_atomic(run.paths.summary, records.dumps(summary))
    run.tracker.finish(summary, example=run.data["test"].images[:1])  # guarded: never raises
    result = _result(summary, run.paths, status="complete")
    distributed.barrier(job)
    return result


def _result(summary: dict, paths: runs.RunPaths, status: str) -> TrainResult:
    return TrainResult(
        run_id=summary["run_id"],
        run_uri=paths.folder,
        status=status,
        best_epoch=summary["best_epoch"],
        metrics=summary["metrics"],
        train_seconds=summary["train_seconds"],
        best_model_uri=paths.best,
    )


def completed_summary(config: TrainConfig) -> dict | None:
    """``run.json`` of ``config``'s run if that run already completed, else None.

    Raises :class:`RunConflict` when the run folder holds a run made with another config (say a
    2-epoch run under the same name as a 50-epoch one), so no caller mistakes its results for
    this config's. Reruns of a flow call this to skip finished trainings.
    """
    folder = run_uri(config)
    recorded = _recorded(storage.join(folder, runs.CONFIG))
    if recorded is None:
        return None
    records.check_same_run(recorded["config"], config, folder)
    summary = runs.completed_summary_at(folder)
    if summary is not None and storage.exists(split_uri(config.root, config.scheme)):
        current = split_identity(config.root, config.scheme)
        records.check_same_split(
            summary.get("split") or recorded.get("split"), current, runs.RunPaths.of(folder)
        )
    return summary


def completed_result(config: TrainConfig) -> TrainResult | None:
    """:func:`completed_summary` as the :class:`TrainResult` that ``train`` returned for it."""
    summary = completed_summary(config)
    if summary is None:
        return None
    return _result(summary, runs.RunPaths.of(run_uri(config)), status="complete")


def _recorded(uri: str) -> dict | None:
    return runs.read_json(uri) if storage.exists(uri) else None
