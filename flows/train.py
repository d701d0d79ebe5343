"""`train-breakhis`: [ingest ->] split -> parallel trainings -> promote -> report.

Each (model, magnification[, fold]) trains in its own process from a pool sized to the machine's
device slots (see ``flows/_slots.py`` and docs/ORCHESTRATION.md): processes, not threads, so
trainings do not share a GIL or a CUDA context and one crash cannot take the others down. A
training that fails is retried once (resuming from its checkpoint), then reported; the others'
runs, promotions and the report still complete, and the flow run ends Failed naming what failed.
Running the flow again skips complete runs and resumes unfinished ones.

``protocol`` names a set of TrainConfig values (``engine.config.PROTOCOLS``: ``patient``, the
default, or ``paper``); the training parameters default to empty, meaning "the protocol's value",
so a caller overrides only what it sets (``protocol=paper, epochs=2``).
"""

from __future__ import annotations

import os
import re
import time
from typing import Annotated, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.task_runners import ProcessPoolTaskRunner
from pydantic import BaseModel, Field

from dala_model import storage
from dala_model.data import cache, splits
from dala_model.data.breakhis import check_magnifications
from dala_model.data.manifest import manifest_version, read_manifest
from dala_model.engine.config import TrainConfig, apply_protocol
from dala_model.engine.distributed import World, check_batch_size
from dala_model.engine.launcher import launch_training
from dala_model.engine.train import RunConflict, completed_summary, run_uri, train
from dala_model.paper import paper_name
from dala_model.report.tables import fmt, mag_label, paper_metrics, table6_row
from dala_model.serving import promotion
from flows._common import IO_RETRIES, field_annotation
from flows._dask import DaskAddress
from flows._slots import SlotPlan, claim_slot, pin_process, plan_slots
from flows.ingest import ingest_flow
from flows.report import publish_report, report_task

# Parameters that feed TrainConfig fields take their types and bounds from TrainConfig.
Scheme = field_annotation(TrainConfig, "scheme")
Epochs = field_annotation(TrainConfig, "epochs")
BatchSize = field_annotation(TrainConfig, "batch_size")
ImageSize = field_annotation(TrainConfig, "image_size")
LearningRate = field_annotation(TrainConfig, "lr")
Seed = field_annotation(TrainConfig, "seed")
Pretrained = field_annotation(
    TrainConfig, "pretrained", description="ImageNet weights (true) or a weights URL"
)
Monitor = field_annotation(TrainConfig, "monitor")


class TrainOutcome(BaseModel):
    """What a finished training hands back to the flow: ids, status and headline numbers only."""

    run_id: str
    run_uri: str
    model: str
    magnification: int
    fold: int | None
    status: str
    best_epoch: int
    train_seconds: float
    test: dict[str, float | None]
    slot: str
    pid: int
    started: float
    finished: float


@task(name="ensure-split", **IO_RETRIES)
def ensure_split(root: str, scheme: str, seed: int) -> str:
    """Reuse the stored split when it was made with this seed from the current manifest, so reruns
    train on the same images; otherwise (missing, other seed, new images) make it afresh."""
    uri = splits.split_uri(root, scheme)
    if storage.exists(uri):
        made = splits.read_split(root, scheme).attrs
        if made.get("dala.seed") == str(seed) and made.get(
            "dala.manifest_version"
        ) == manifest_version(root):
            return uri
    return splits.make_split(root, scheme, seed=seed)


@task(name="ensure-cache", **IO_RETRIES)
def ensure_cache(root: str, size: int) -> int:
    """Decode the cache once before the fan-out: the cache allows one writer per (root, size)."""
    ids = read_manifest(root)["image_id"]
    return cache.build_cache(root, size) if cache.missing_from_cache(root, ids, size) else 0


@task(name="finished-run", task_run_name="finished-{config.magnification}x", **IO_RETRIES)
def finished_run(config: TrainConfig) -> TrainOutcome | None:
    """The outcome of an already complete run, so reruns skip it without starting a training process."""
    try:
        summary = completed_summary(config)
    except RunConflict:
        return None  # another config's run: its training task fails alone; the others go on
    if summary is None:
        return None
    return _outcome(
        config,
        summary["run_id"],
        "skipped",
        summary["best_epoch"],
        summary["train_seconds"],
        summary["metrics"],
        slot="none",
        started=time.time(),
    )


@task(
    name="train",
    task_run_name="train-{config.model}-{config.magnification}x",
    retries=1,
    retry_delay_seconds=2,
)
def train_run(config: TrainConfig) -> TrainOutcome:
    """One training in a pool process that holds a device slot; reports per-epoch progress.

    A slot of several GPUs (or CPU processes) trains as a torchrun job launched from here."""
    slot = pin_process()
    started = time.time()
    artifact = create_progress_artifact(
        0.0,
        key=_artifact_key("progress", config.resolved_run_id),
        description=f"{config.resolved_run_id} on {slot.label}: starting",
    )

    def progress(record: dict) -> None:
        update_progress_artifact(
            artifact,
            100.0 * (record["epoch"] + 1) / record["epochs"],
            description=(
                f"{record['run_id']} epoch {record['epoch'] + 1}/{record['epochs']}: "
                f"train_loss {record['train_loss']:.4f} val_acc {record['val_acc']:.3f} "
                f"val_gmean {record['val_gmean']:.3f} ({record['images_per_s']:.0f} img/s)"
            ),
        )

    if slot.processes > 1:
        result = launch_training(
            config, slot.processes, threads_per_process=slot.threads, progress=progress
        )
    else:
        result = train(config, progress=progress)
    update_progress_artifact(artifact, 100.0, description=f"{result.run_id}: {result.status}")
    return _outcome(
        config,
        result.run_id,
        result.status,
        result.best_epoch,
        result.train_seconds,
        result.metrics,
        slot=slot.label,
        started=started,
    )


def _outcome(
    config: TrainConfig,
    run_id: str,
    status: str,
    best_epoch: int,
    train_seconds: float,
    metrics: dict,
    *,
    slot: str,
    started: float,
) -> TrainOutcome:
    test = metrics["test"]["image"]
    return TrainOutcome(
        run_id=run_id,
        run_uri=run_uri(config),
        model=config.model,
        magnification=config.magnification,
        fold=config.fold,
        status=status,
        best_epoch=best_epoch,
        train_seconds=train_seconds,
        test={
            k: test.get(k)
            for k in ("accuracy", "f1_minority", "f1_weighted", "iba_unsquared", "gmean")
        },
        slot=slot,
        pid=os.getpid(),
        started=started,
        finished=time.time(),
    )


@task(name="promote", **IO_RETRIES)
def promote_task(root: str, run_uri: str) -> dict:
    outcome = promotion.promote(root, run_uri, reason="train-breakhis: new best on validation")
    return {
        "promoted": outcome.promoted,
        "reason": outcome.reason,
        "model_version": outcome.record.get("model_version"),
    }


@flow(name="train-breakhis", log_prints=True)
def train_flow(
    root: Annotated[
        str, Field(description="storage root URL (s3://bucket/prefix or a local path)")
    ],
    source: Annotated[str | None, Field(description="ingest this image source first")] = None,
    dask_address: Annotated[
        DaskAddress, Field(description="Dask scheduler (tcp://HOST:8786) to ingest source on")
    ] = None,
    models: Annotated[list[str], Field(min_length=1)] = ["dalaresnet50"],  # noqa: B006 - Prefect copies defaults
    magnifications: Annotated[list[int], Field(min_length=1)] = [40, 100, 200, 400],  # noqa: B006
    protocol: Annotated[
        Literal["patient", "paper"],
        Field(
            description="patient (TrainConfig's defaults) or paper (the published protocol); "
            "a parameter left empty takes the protocol's value"
        ),
    ] = "patient",
    scheme: Scheme | None = None,
    folds: Annotated[list[int] | None, Field(description="fold indices for patient-kfold")] = None,
    epochs: Epochs | None = None,
    batch_size: BatchSize | None = None,
    image_size: ImageSize = 224,
    lr: LearningRate | None = None,
    seed: Seed = 0,
    pretrained: Pretrained | None = None,
    monitor: Monitor | None = None,
    max_parallel: Annotated[
        int | None, Field(ge=1, description="cap on concurrent trainings")
    ] = None,
    retries: Annotated[int, Field(ge=0, description="retries of a failed training")] = 1,
    gpus_per_training: Annotated[
        int,
        Field(
            ge=1,
            description="GPUs per training, as DDP ranks under torchrun (batch_size stays the "
            "global batch); on a machine without GPUs, that many gloo processes",
        ),
    ] = 1,
) -> list[TrainOutcome]:
    """Train every (model, magnification[, fold]) in parallel, promote the best, build the report."""
    logger = get_run_logger()
    check_magnifications(magnifications, what="magnifications")
    chosen = {
        "scheme": scheme,
        "epochs": epochs,
        "batch_size": batch_size,
        "image_size": image_size,
        "lr": lr,
        "seed": seed,
        "pretrained": pretrained,
        "monitor": monitor,
    }
    chosen = {key: value for key, value in chosen.items() if value is not None}
    base = {"root": root, "resume": True, **chosen}
    settings = {model: apply_protocol({**base, "model": model}, protocol) for model in models}
    defaults = {name: info.default for name, info in TrainConfig.model_fields.items()}
    scheme = settings[models[0]].get("scheme", defaults["scheme"])  # the same for every model
    batch_size = settings[models[0]].get("batch_size", defaults["batch_size"])
    if (scheme == "patient-kfold") != (folds is not None):
        raise ValueError("folds is required with scheme 'patient-kfold' and only valid with it")
    check_batch_size(batch_size, World(size=gpus_per_training))
    plan_slots(1, max_parallel, gpus_per_training)  # more GPUs than the node has: refused now
    if source is not None:
        ingest_flow(source=source, root=root, cache_size=image_size, dask_address=dask_address)
    ensure_split(root, scheme, seed)
    ensure_cache(root, image_size)
    configs = [
        TrainConfig(**settings[model], magnification=mag, fold=fold)
        for model in models
        for mag in magnifications
        for fold in (folds or [None])
    ]
    finished = [finished_run(config) for config in configs]
    todo = [config for config, done in zip(configs, finished, strict=True) if done is None]
    outcomes, failures = [done for done in finished if done is not None], []
    if todo:
        plan = plan_slots(len(todo), max_parallel, gpus_per_training)
        logger.info(
            "%d of %d trainings to run on %d %s slot(s) of %d process(es), %d thread(s) each",
            len(todo),
            len(configs),
            len(plan.slots),
            plan.kind,
            plan.processes,
            plan.threads,
        )
        if plan.idle:
            logger.warning(
                "GPU(s) %s stay idle: %d visible GPUs do not divide into groups of %d",
                ", ".join(plan.idle),
                len(plan.idle) + len(plan.slots) * plan.processes,
                plan.processes,
            )
        trained, failures = _fan_out(todo, plan, retries)
        outcomes += trained
    for outcome in outcomes:
        promoted = promote_task(root, outcome.run_uri)
        logger.info(
            "%s: %s (%s)",
            outcome.run_id,
            outcome.status,
            "promoted" if promoted["promoted"] else promoted["reason"],
        )
        _publish_run_table(outcome)
    publish_report(report_task(root), root)
    if failures:
        raise RuntimeError(
            f"{len(failures)} of {len(configs)} trainings failed ({'; '.join(failures)}); the others "
            "completed and were reported. Fix the cause and run the flow again: finished runs are "
            "skipped, unfinished ones resume from their checkpoints"
        )
    return outcomes


def _fan_out(
    configs: list[TrainConfig], plan: SlotPlan, retries: int
) -> tuple[list[TrainOutcome], list[str]]:
    """Submit every training to a pool of ``len(plan.slots)`` slot-holding processes; wait for all."""
    runner = ProcessPoolTaskRunner(
        max_workers=len(plan.slots), initializer=claim_slot, initargs=(plan,)
    )
    task_ = train_run.with_options(retries=retries)
    with runner:
        futures = [runner.submit(task_, parameters={"config": config}) for config in configs]
        for future in futures:
            future.wait()
    states = [future.state for future in futures]
    outcomes, failures = [], []
    for config, state in zip(configs, states, strict=True):
        if state.is_completed():
            outcomes.append(state.result())
        else:
            failures.append(f"{config.resolved_run_id}: {state.message}")
    return outcomes, failures


def _publish_run_table(outcome: TrainOutcome) -> None:
    """The run's test metrics in the paper's Table 6 layout, beside the paper's published values."""
    paper = paper_metrics(outcome.model, outcome.magnification)

    def row(values: dict, rest: dict[str, object]) -> dict[str, object]:
        cells = table6_row(values, lambda value: fmt(value, missing="-"))
        model = {
            "Model": paper_name(outcome.model),
            "Magnification": mag_label(outcome.magnification),
        }
        return {**model, **cells, **rest}

    rows = [
        row(
            outcome.test,
            {
                "Train seconds": f"{outcome.train_seconds:.1f}",
                "Best epoch": outcome.best_epoch + 1,
                "Source": "this run",
            },
        )
    ]
    if paper:
        rows.append(row(paper, {"Train seconds": "-", "Best epoch": "-", "Source": "paper"}))
    create_table_artifact(
        table=rows,
        key=_artifact_key("metrics", outcome.run_id),
        description=f"test metrics of {outcome.run_id} ({outcome.status}) at {outcome.run_uri}",
    )


def _artifact_key(kind: str, run_id: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return f"{kind}-" + re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")
