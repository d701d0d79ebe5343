"""The training engine: one model x one magnification x one split (or fold).

Speed comes from the data path, not from tricks in the model: the split's pixels are one uint8
array (moved to the GPU once when training there), batches are gathered by index, normalised
and augmented on the device, and the loss of every step stays on the device until the epoch
ends, so no step waits on a host sync.

Resumability comes from deriving every random choice of an epoch (order, oversampling,
augmentation) from ``(seed, epoch)`` and checkpointing the rest (weights, optimiser, the global
RNG that dropout uses) atomically at each epoch's end: a resumed run replays exactly the epochs an
uninterrupted one would have run.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import random
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import torch
from imblearn.over_sampling import RandomOverSampler
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from tqdm import tqdm

from dala_model import runs, storage
from dala_model.data.dataset import SplitImages, load_split
from dala_model.data.manifest import manifest_version
from dala_model.device import autocast, resolve_precision, synchronize
from dala_model.engine import distributed
from dala_model.engine.config import TrainConfig
from dala_model.engine.inference import predict_logits
from dala_model.metrics import classification_metrics, evaluate, monitor_score
from dala_model.models.checkpoint import load_model, save_model
from dala_model.models.registry import build_model
from dala_model.models.transforms import BatchAugment, normalize_batch
from dala_model.provenance import code_version, environment

log = logging.getLogger(__name__)

ProgressCallback = Callable[[dict], None]


class NonFiniteLoss(RuntimeError):
    """Training diverged; the run stops and its best model is not promoted."""


class RunConflict(ValueError):
    """A run folder already holds a different run."""


@dataclass
class TrainResult:
    run_id: str
    run_uri: str
    status: str  # "complete", or "skipped" when the run had already completed
    best_epoch: int
    metrics: dict
    train_seconds: float
    best_model_uri: str


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
    folder = run_uri(config)
    paths = {
        name: storage.join(folder, name)
        for name in (
            "config.json",
            "checkpoint.pt",
            "history.parquet",
            "best",
            "test_predictions.parquet",
            "run.json",
        )
    }
    summary = completed_summary(config)
    if summary is not None:
        log.info("run %s is already complete; skipping", config.resolved_run_id)
        return _result(summary, folder, paths["best"], status="skipped")
    recorded = _recorded(paths["config.json"])
    data_version = manifest_version(config.root)
    if recorded is not None:
        if not config.resume and storage.exists(paths["checkpoint.pt"]):
            raise RunConflict(
                f"run folder {storage.redact(folder)} holds an unfinished run; pass resume=True "
                "(--resume) to continue it or choose another run_id/seed"
            )
        if recorded.get("data_version", data_version) != data_version:
            raise RunConflict(
                f"run folder {storage.redact(folder)} was started on data version "
                f"{recorded['data_version']}, but the manifest is now {data_version}: resuming would "
                "mix two datasets; choose another run_id or seed"
            )
    distributed.check_batch_size(config.batch_size, job)
    distributed.barrier(job)  # every rank has checked the folder before rank 0 writes to it

    _seed_everything(config.seed)
    device = distributed.device_for(config.device, job)
    dtype = resolve_precision(config.precision, device)
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
    if recorded is None and job.is_main:
        storage.write_bytes_atomic(
            paths["config.json"],
            _dumps(
                {
                    "config": config.model_dump(mode="json"),
                    "run_id": config.resolved_run_id,
                    "data_version": data_version,
                    "code_version": code_version(),
                    "environment": environment(device),
                    "processes": job.size,
                    "created_at": _now(),
                    "split_sizes": {name: len(split) for name, split in data.items()},
                }
            ),
        )

    model = build_model(
        config.model, num_classes=2, pretrained=config.pretrained, **config.model_options
    )
    model = model.to(
        device, memory_format=torch.channels_last if config.channels_last else torch.preserve_format
    )
    parallel = distributed.wrap(model, device, job)
    step_model = torch.compile(parallel) if config.compile else parallel
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    criterion = nn.CrossEntropyLoss(weight=_class_weights(config, data["train"].labels, device))
    augment = BatchAugment(degrees=config.rotation_degrees)

    state = {
        "epoch": -1,
        "history": [],
        "best": {"epoch": -1, "score": None, "val": {}},
        "train_seconds": 0.0,
    }
    if config.resume and storage.exists(paths["checkpoint.pt"]):
        state = _restore(paths["checkpoint.pt"], model, optimizer, device)
        log.info("resuming %s after epoch %d", config.resolved_run_id, state["epoch"])

    train_x = torch.from_numpy(data["train"].images)
    if device.type == "cuda":  # one copy to device memory; every epoch then gathers on the GPU
        train_x = train_x.to(device)
    train_y = torch.from_numpy(data["train"].labels).to(device)

    checkpoints = _CheckpointWriter(paths["checkpoint.pt"])
    try:
        for epoch in range(state["epoch"] + 1, config.epochs):
            started = time.perf_counter()
            train_loss, train_acc, seen = _train_epoch(
                config,
                epoch,
                step_model,
                optimizer,
                criterion,
                augment,
                train_x,
                train_y,
                device,
                dtype,
                job,
            )
            train_seconds = time.perf_counter() - started
            if config.recalibrate_bn:
                recalibrate_batchnorm(model, train_x, config, device, dtype)
            val = _validate(config, model, data["val"], criterion, device, dtype)
            record = {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_acc": train_acc,
                "val_loss": val["loss"],
                "val_acc": val["accuracy"],
                "val_gmean": val["gmean"],
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": seen / train_seconds,
                "epoch_seconds": time.perf_counter() - started,
            }
            state["history"].append(record)
            state["epoch"] = epoch
            state["train_seconds"] += record["epoch_seconds"]
            score = monitor_score(config.monitor, val)
            if state["best"]["score"] is None or score > state["best"]["score"]:
                state["best"] = {"epoch": epoch, "score": score, "val": val}
                if job.is_main:
                    save_model(
                        model,
                        paths["best"],
                        preset=config.preset,
                        image_size=config.image_size,
                        card=_card(config, data_version, epoch, val),
                    )
            if not job.is_main:
                continue  # the other ranks train and validate alike; rank 0 alone writes and reports
            checkpoints.submit(model, optimizer, state)
            storage.write_parquet_atomic(pd.DataFrame(state["history"]), paths["history.parquet"])
            log.info(
                "%s epoch %d/%d train_loss %.4f train_acc %.3f val_loss %.4f val_acc %.3f val_gmean %.3f "
                "%.0f img/s %.1fs",
                config.resolved_run_id,
                epoch + 1,
                config.epochs,
                train_loss,
                train_acc,
                val["loss"],
                val["accuracy"],
                val["gmean"],
                record["images_per_s"],
                record["epoch_seconds"],
            )
            if progress is not None:
                progress({**record, "epochs": config.epochs, "run_id": config.resolved_run_id})
    finally:
        checkpoints.close()

    if not job.is_main:
        distributed.barrier(job)  # wait for rank 0's test evaluation and run.json
        summary = json.loads(storage.read_bytes(paths["run.json"]))
        return _result(summary, folder, paths["best"], status="complete")
    result = _finish(config, paths, folder, state, device, dtype, data)
    distributed.barrier(job)
    return result


def _train_epoch(
    config, epoch, model, optimizer, criterion, augment, train_x, train_y, device, dtype, job
):
    model.train()
    order = epoch_order(train_y.cpu().numpy(), config.seed, epoch, config.imbalance)
    batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2 * job.size:
        batches.pop()  # BatchNorm cannot train on a single image (per rank)
    batches = [distributed.shard(batch, job) for batch in batches]
    # Ranks draw different augmentations (rank 0, and a single process, keep the original seed).
    augment_seed = _epoch_seed(config.seed, epoch, salt=1) ^ job.rank
    generator = torch.Generator(device=device).manual_seed(augment_seed)
    losses = torch.zeros(len(batches), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    # The epoch's indices go to the pixels' device in one copy: a copy per step from pageable
    # memory would make the host wait for the GPU every step, so it could never queue ahead.
    sizes = [len(batch) for batch in batches]
    indices = torch.from_numpy(np.concatenate(batches)).to(train_x.device).split(sizes)
    label_indices = indices if train_y.device == train_x.device else [i.to(device) for i in indices]
    for b, (index, label_index) in enumerate(
        tqdm(
            zip(indices, label_indices, strict=True),
            total=len(sizes),
            desc=f"epoch {epoch + 1}",
            leave=False,
            disable=not (sys.stderr.isatty() and job.is_main),
        )
    ):
        xb = train_x.index_select(0, index).to(device, non_blocking=True)
        yb = train_y.index_select(0, label_index)
        x = augment(
            normalize_batch(xb, config.preset, channels_last=config.channels_last),
            generator=generator,
        )
        with autocast(device, dtype):
            logits = model(x)
        loss = criterion(logits.float(), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses[b] = loss.detach()
        correct += (logits.argmax(dim=1) == yb).sum()
    seen = sum(sizes)
    synchronize(device)
    if job.size > 1:  # epoch totals over all ranks, so every rank logs and checks the same numbers
        losses = distributed.sum_over_ranks(losses, job) / job.size
        distributed.sum_over_ranks(correct, job)
        seen = int(distributed.sum_over_ranks(torch.tensor(seen, device=device), job))
    finite = torch.isfinite(losses)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0, 0])
        raise NonFiniteLoss(
            f"{config.resolved_run_id}: loss became {losses[bad].item()} at epoch {epoch + 1}, batch {bad + 1}; "
            "the run stopped and its best model was not promoted (try a lower learning rate)"
        )
    return float(losses.mean()), int(correct) / seen, seen


def epoch_order(labels: np.ndarray, seed: int, epoch: int, imbalance: str) -> np.ndarray:
    """The training index order for one epoch, a pure function of (seed, epoch) for exact resume."""
    rng = np.random.default_rng(_epoch_seed(seed, epoch, salt=0))
    index = np.arange(len(labels))
    if imbalance == "oversample" and len(np.unique(labels)) > 1:
        sampler = RandomOverSampler(random_state=int(rng.integers(2**31 - 1)))
        index, _ = sampler.fit_resample(index.reshape(-1, 1), labels)
        index = index.ravel()
    return rng.permutation(index)


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


def _logits(
    config: TrainConfig, model: nn.Module, split: SplitImages, device, dtype
) -> torch.Tensor:
    """Scores of a split with the run's preset, precision and memory format (val and test alike)."""
    return predict_logits(
        model, split.images, preset=config.preset, device=device, dtype=dtype,
        channels_last=config.channels_last,
    )  # fmt: skip


def _validate(config, model, split: SplitImages, criterion, device, dtype) -> dict:
    logits = _logits(config, model, split, device, dtype)
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


def _finish(config, paths, folder, state, device, dtype, data) -> TrainResult:
    best = load_model(paths["best"], map_location=device)
    if config.channels_last:
        best = best.to(memory_format=torch.channels_last)
    test = data["test"]
    logits = _logits(config, best, test, device, dtype)
    prob = torch.softmax(logits, dim=1)[:, 1].numpy()
    predictions = test.frame[["image_id", "patient_id", "magnification"]].assign(
        y_true=test.labels, prob_malignant=prob, y_pred=(prob >= 0.5).astype(np.int64)
    )
    storage.write_parquet_atomic(predictions, paths["test_predictions.parquet"])
    summary = {
        "status": "complete",
        "run_id": config.resolved_run_id,
        "model": config.model,
        "magnification": config.magnification,
        "scheme": config.scheme,
        "fold": config.fold,
        "seed": config.seed,
        "parameters": sum(p.numel() for p in best.parameters()),
        "train_seconds": state["train_seconds"],
        "epochs": config.epochs,
        "best_epoch": state["best"]["epoch"],
        "metrics": {
            "val": state["best"]["val"],
            "test": evaluate(test.labels, prob, patient_ids=test.frame["patient_id"].to_numpy()),
        },
        "data_version": json.loads(storage.read_bytes(paths["config.json"]))["data_version"],
        "code_version": code_version(),
        "config": config.model_dump(mode="json"),
        "processes": distributed.world().size,
        "finished_at": _now(),
    }
    storage.write_bytes_atomic(paths["run.json"], _dumps(summary))
    return _result(summary, folder, paths["best"], status="complete")


def _result(summary: dict, folder: str, best_uri: str, status: str) -> TrainResult:
    return TrainResult(
        run_id=summary["run_id"],
        run_uri=folder,
        status=status,
        best_epoch=summary["best_epoch"],
        metrics=summary["metrics"],
        train_seconds=summary["train_seconds"],
        best_model_uri=best_uri,
    )


class _CheckpointWriter:
    """Serialises and stores the per-epoch checkpoint on a background thread.

    DALAResNet50 with its Adam state is about 300 MB: writing that synchronously costs about as
    much as a whole BreakHis epoch on a modern GPU. The snapshot (a CPU copy of every tensor, and
    of the small state dict) is taken synchronously, so training may move on at once; one write is
    in flight at a time, so checkpoints land in epoch order, and ``close`` waits for the last one
    and raises its error, if any. Each write is atomic, so a crash leaves the previous checkpoint.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future | None = None

    def submit(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        payload = {
            "model": _to_cpu(model.state_dict()),
            "optimizer": _to_cpu(optimizer.state_dict()),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "state": copy.deepcopy(state),
        }
        self._wait()
        self._pending = self._pool.submit(self._write, payload)

    def close(self) -> None:
        try:
            self._wait()
        finally:
            self._pool.shutdown()

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _write(self, payload: dict) -> None:
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        storage.write_bytes_atomic(self.uri, buffer.getvalue())


def _to_cpu(obj):
    """A CPU copy of every tensor in a (nested) state dict, so later steps cannot change it."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: _to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(value) for value in obj)
    return obj


def _restore(uri: str, model: nn.Module, optimizer, device: torch.device) -> dict:
    payload = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["rng_cpu"])
    if payload["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng_cuda"])
    return payload["state"]


def _class_weights(
    config: TrainConfig, labels: np.ndarray, device: torch.device
) -> torch.Tensor | None:
    if config.imbalance != "class_weight":
        return None
    weights = compute_class_weight("balanced", classes=np.array([0, 1]), y=labels)
    return torch.tensor(weights, dtype=torch.float32, device=device)


def _card(config: TrainConfig, data_version: str, epoch: int, val: dict) -> dict:
    return {
        "run_id": config.resolved_run_id,
        "magnification": config.magnification,
        "scheme": config.scheme,
        "fold": config.fold,
        "seed": config.seed,
        "epoch": epoch,
        "val_metrics": val,
        "data_version": data_version,
        "code_version": code_version(),
        "train_config": config.model_dump(mode="json"),
    }


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
    _check_same_run(recorded["config"], config, folder)
    return runs.completed_summary_at(folder)


def completed_result(config: TrainConfig) -> TrainResult | None:
    """:func:`completed_summary` as the :class:`TrainResult` that ``train`` returned for it."""
    summary = completed_summary(config)
    if summary is None:
        return None
    folder = run_uri(config)
    return _result(summary, folder, storage.join(folder, "best"), status="complete")


def _recorded(uri: str) -> dict | None:
    return runs.read_json(uri) if storage.exists(uri) else None


def _check_same_run(recorded: dict, config: TrainConfig, folder: str) -> None:
    ignore = {"resume", "device", "workers"}
    ours = config.model_dump(mode="json")
    changed = sorted(k for k in ours if k not in ignore and recorded.get(k) != ours[k])
    if changed:
        raise RunConflict(
            f"run folder {storage.redact(folder)} was started with a different config "
            f"({', '.join(changed)} differ); "
            "choose another run_id or seed"
        )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int, salt: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, salt]).generate_state(1)[0])


def _dumps(obj: dict) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=float).encode()


def _now() -> str:
    return datetime.now(UTC).isoformat()
