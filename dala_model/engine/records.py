"""What a run folder records about itself, and the checks that keep one folder one run.

``config.json`` (written before the first epoch: the config as asked, data and code versions, the
split's identity and the config hash), ``run.json`` (written last: the best model's test
evaluation at 0.5 and at the threshold chosen on validation, calibration, per-subtype recall, the
measured precision and layout), the best model's card (the threshold and the ``metadata`` block of
``dala_model.modelcard``, put into ``best/config.json`` in one atomic rewrite once the test
metrics are known, so the card always describes the weights beside it), and the refusals: a folder started with another config, or on
another split (its content hash), is never resumed or counted as done. The training loop
(``engine.train``) calls these; the run folder's file names are ``dala_model.runs.RunPaths``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
import torch
from torch import nn

from dala_model import modelcard, runs, storage
from dala_model.calibration import calibration_summary, choose_threshold
from dala_model.data.dataset import SplitImages
from dala_model.data.splits import split_identity
from dala_model.device import resolve_precision
from dala_model.engine import autotune, distributed
from dala_model.engine.config import TrainConfig, config_hash
from dala_model.engine.epoch import split_logits
from dala_model.evaluation import evaluate, subtype_recall
from dala_model.models.checkpoint import load_model
from dala_model.provenance import code_version, environment


class RunConflict(ValueError):
    """A run folder already holds a different run."""


def check_same_split(recorded: dict | None, current: dict, paths: runs.RunPaths) -> None:
    """A run continues, or counts as done, only on the split it started on (same content hash)."""
    if recorded and recorded.get("hash") and recorded["hash"] != current.get("hash"):
        raise RunConflict(
            f"run folder {storage.redact(paths.folder)} was trained on split {recorded['hash']} "
            f"({recorded.get('scheme')}, seed {recorded.get('seed')}), but the split file is now "
            f"{current.get('hash')} (seed {current.get('seed')}): continuing would mix two splits. "
            "Re-split with the run's seed, or choose another run_id or seed"
        )


def check_same_run(recorded: dict, config: TrainConfig, folder: str) -> None:
    # How a run executes, not what it computes: a memory layout (measured or fixed) gives the same
    # numbers, so folders from before layouts were measured (channels_last=True) stay the same run.
    # Where the run is mirrored (tracking_uri, recorded redacted) is not what it computes either.
    ignore = {"resume", "device", "workers", "channels_last", "tracking_uri"}
    ours = config.model_dump(mode="json")
    changed = sorted(k for k in ours if k not in ignore and recorded.get(k) != ours[k])
    if changed:
        raise RunConflict(
            f"run folder {storage.redact(folder)} was started with a different config "
            f"({', '.join(changed)} differ); "
            "choose another run_id or seed"
        )


def recorded_config(config: TrainConfig) -> dict:
    """The config as ``config.json`` and ``run.json`` record it: the tracking URI redacted."""
    data = config.model_dump(mode="json")
    if data.get("tracking_uri"):
        data["tracking_uri"] = storage.redact(data["tracking_uri"])
    return data


def tuning(config: TrainConfig, device: torch.device, job: distributed.World) -> autotune.Choice:
    """Precision and memory format: what the config fixes, the rest measured on this machine.

    A single process measures on first use and caches the choice (``engine.autotune``). Ranks of
    a DDP job must agree and must not time while competing for the cores, so they take the
    static choice instead: fp32 (bf16 on CUDA) unless fixed, channels_last on CUDA only.
    """
    if job.size > 1:
        precision = config.precision if config.precision != "auto" else None
        layout = config.channels_last
        static = resolve_precision(precision or "auto", device)
        return autotune.Choice(
            precision or ("bf16" if static is not None else "fp32"),
            device.type == "cuda" if layout is None else layout,
            None,
        )
    return autotune.choose(
        "train",
        config.model,
        config.image_size,
        device,
        precision=config.precision,
        channels_last=config.channels_last,
        batch_size=config.batch_size,  # probed at the run's batch: the layout's win depends on it
        model=None,
    )


def record_config(
    config: TrainConfig,
    paths: runs.RunPaths,
    data_version: str,
    job: distributed.World,
    device: torch.device,
    data: dict[str, SplitImages],
) -> None:
    """Write ``config.json``: what the run is, on which data, code and machine."""
    recorded = {
        "config": recorded_config(config),
        "run_id": config.resolved_run_id,
        "data_version": data_version,
        "code_version": code_version(),
        "environment": environment(device),
        "processes": job.size,
        "created_at": now(),
        "split_sizes": {name: len(split) for name, split in data.items()},
        "split": (split := split_identity(config.root, config.scheme)),
        "config_hash": config_hash(config, split["group_by"]),
    }
    storage.write_bytes_atomic(paths.config, dumps(recorded))


def summarise(run, state: dict) -> dict:
    """Write the best model's test predictions and card; return the run's summary (``run.json``).

    The card (threshold and model card) is written after the test evaluation it records, in one
    rewrite of ``best/config.json``; ``run.json``, which the caller writes next, stays the last
    file of a run, so a crash before it leaves a run that is not complete and is retrained.
    """
    config, ctx, paths = run.config, run.epoch, run.paths
    best = load_model(paths.best, map_location=ctx.device)
    if ctx.config.channels_last:
        best = best.to(memory_format=torch.channels_last)
    test, val = run.data["test"], run.data["val"]
    prob = probabilities(ctx.config, best, test, ctx)
    chosen = choose_threshold(val.labels, probabilities(ctx.config, best, val, ctx))
    threshold = chosen["threshold"]
    predictions = test.frame[["image_id", "patient_id", "magnification"]].assign(
        y_true=test.labels, prob_malignant=prob, y_pred=(prob >= 0.5).astype(np.int64)
    )
    storage.write_parquet_atomic(predictions, paths.test_predictions)
    patients = test.frame["patient_id"].to_numpy()
    split = split_identity(config.root, config.scheme)
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
            "test": evaluate(test.labels, prob, patient_ids=patients),
            "test_at_threshold": evaluate(test.labels, prob, patients, threshold=threshold),
            "calibration": calibration_summary(test.labels, prob),
            "subtypes": subtype_recall(
                test.frame["subtype"].to_numpy(), test.labels, (prob >= threshold).astype(int)
            ),
        },
        "threshold": chosen,
        "tuning": run.tuning.record(),
        "split": split,
        "config_hash": config_hash(config, split["group_by"]),
        "data_version": json.loads(storage.read_bytes(paths.config))["data_version"],
        "code_version": code_version(),
        "config": recorded_config(config),
        "processes": distributed.world().size,
        "finished_at": now(),
    }
    counts = modelcard.split_counts({name: images.frame for name, images in run.data.items()})
    manifest = modelcard.manifest_facts(config.root)
    store_threshold(
        paths.best,
        chosen,
        metadata=lambda checkpoint: modelcard.card_json(
            modelcard.build_card(checkpoint, summary, counts, manifest)
        ),
    )
    return summary


def probabilities(config: TrainConfig, model: nn.Module, split: SplitImages, ctx) -> np.ndarray:
    """The malignant-class probability of every image of ``split`` under ``model``."""
    logits = split_logits(config, model, split, ctx.device, ctx.dtype)
    return torch.softmax(logits, dim=1)[:, 1].numpy()


def store_threshold(
    best: str, chosen: dict, metadata: Callable[[dict], dict | None] | None = None
) -> None:
    """Put the validation-chosen threshold on the best model's card, where serving reads it.

    ``metadata(config)`` builds the model card block from the checkpoint's config as read here
    (its weights hash, input size and preset); it lands in the same atomic write.
    """
    uri = storage.join(best, "config.json")
    config = json.loads(storage.read_bytes(uri))
    config.setdefault("card", {})
    config["card"]["threshold"] = chosen["threshold"]
    config["card"]["threshold_choice"] = chosen
    if metadata is not None:
        config[modelcard.METADATA_KEY] = metadata(config)
    storage.write_bytes_atomic(uri, json.dumps(config, indent=2, sort_keys=True).encode())


def dumps(obj: dict) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=float).encode()


def now() -> str:
    return datetime.now(UTC).isoformat()
