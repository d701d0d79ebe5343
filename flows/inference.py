"""`batch-inference`: [ingest new images ->] score them with each magnification's current model.

Incremental and idempotent by construction of ``dala_model.serving.predictions`` (see its docstring):
only images without a prediction from the same model version are scored, and part files are
keyed by their content, so reruns and retries never add a row twice.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact
from pydantic import Field

from dala_model import storage
from dala_model.data.ingest import canonical_source, manifest_source
from dala_model.engine.config import MAGNIFICATIONS
from dala_model.serving import predictions, promotion
from flows.ingest import IO_RETRIES, ingest_flow


@task(name="score", task_run_name="score-{model}-{magnification}x", **IO_RETRIES)
def score_task(
    root: str,
    model: str,
    magnification: int,
    flow_run_id: str,
    threshold: float,
    batch_size: int,
    device: str,
) -> dict:
    """Score one magnification; safe to retry because already-written parts are skipped."""
    return asdict(
        predictions.score_magnification(
            root,
            model,
            magnification,
            flow_run_id=flow_run_id,
            threshold=threshold,
            batch_size=batch_size,
            device=device,
        )
    )


@flow(name="batch-inference", log_prints=True)
def inference_flow(
    root: Annotated[
        str, Field(description="storage root URL (s3://bucket/prefix or a local path)")
    ],
    source: Annotated[str | None, Field(description="ingest new images from here first")] = None,
    model: str = "dalaresnet50",
    magnifications: Annotated[
        list[int] | None, Field(description="default: every one with a current model")
    ] = None,
    threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5,
    batch_size: Annotated[int, Field(gt=0)] = 64,
    device: Annotated[str, Field(description="auto, cpu, cuda or cuda:N")] = "auto",
) -> list[dict]:
    """Score unscored images per magnification with the registry's current model; write Parquet."""
    logger = get_run_logger()
    if source is not None:
        recorded = manifest_source(root)
        if recorded not in (None, storage.redact(canonical_source(source))):
            raise ValueError(
                f"source {storage.redact(source)} is not the source of {storage.redact(root)}'s manifest "
                f"({recorded}): ingesting it would replace the training manifest; score images from "
                "another source under their own root"
            )
        ingest_flow(source=source, root=root)
    serving = {r["magnification"]: r for r in promotion.list_current(root) if r["model"] == model}
    wanted = magnifications or sorted(serving)
    unknown = sorted(set(wanted) - set(MAGNIFICATIONS))
    if unknown:
        raise ValueError(
            f"magnifications {unknown} are not BreakHis magnifications {MAGNIFICATIONS}"
        )
    missing = [m for m in wanted if m not in serving]
    if not wanted or missing:
        raise LookupError(
            f"no current {model} model for {missing or 'any magnification'} under {storage.redact(root)}: "
            "run train-breakhis first or pin one with `dala promote`"
        )
    run_id = str(runtime.flow_run.id)
    futures = [
        score_task.submit(root, model, m, run_id, threshold, batch_size, device) for m in wanted
    ]
    results = [f.result() for f in futures]
    for r in results:
        logger.info(
            "%dX: scored %d, already scored %d, model %s",
            r["magnification"],
            r["scored"],
            r["skipped"],
            r["model_version"][:12],
        )
    _publish(results, root, model)
    return results


def _publish(results: list[dict], root: str, model: str) -> None:
    lines = [
        f"## Batch inference with {model}",
        "",
        f"Predictions: **{storage.redact(predictions.predictions_uri(root, model))}** (Parquet, one part per chunk)",
        "",
        "| magnification | model version | scored now | already scored | accuracy | IBA | G-mean | batch report |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r["metrics"] or {}
        lines.append(
            f"| {r['magnification']}X | `{r['model_version'][:12]}` | {r['scored']} | {r['skipped']} | "
            f"{_num(m.get('accuracy'))} | {_num(m.get('iba_unsquared'))} | {_num(m.get('gmean'))} | "
            f"{storage.redact(r['report_uri']) if r['report_uri'] else '-'} |"
        )
    create_markdown_artifact(
        markdown="\n".join(lines),
        key="batch-inference",
        description="rows written per magnification and the batch's IBA/G-mean",
    )


def _num(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "-"
