"""`batch-inference`: score new images with each magnification's current model.

With ``source`` (the nightly deployment: ``DALA_INCOMING``), the drop is scored through
``dala_model.serving.scoring``, the path of ``dala predict``: its own manifest, quarantine and
image- and case-level Parquet under ``out`` (default ``ROOT/scoring``), models from ``registry``
(default ``root``); the training manifest is never touched. Without ``source`` the flow
re-scores the root's own manifest (``dala_model.serving.predictions``), as before.

The nightly deployment fills ``source`` from ``DALA_INCOMING`` at ``prefect deploy`` time; when
that variable is unset then, ``prefect deploy`` stores an empty string (after warning that the
placeholder has no value). An empty ``source`` means "no drop": the flow logs a warning naming
the variable and re-scores the root's manifest, the deployment's behaviour before it had a
source (tests/test_e2e_deployment.py deploys it both ways).

Both paths are incremental and idempotent (see those modules' docstrings): only images without a
prediction from the same model version are scored, and part files are keyed by their content,
so reruns and retries never add a row twice.

``explain=True`` (with ``explain_method``) applies to a source drop only: it writes Grad-CAM
overlays of the images called malignant or uncertain and names them in ``heatmap_uri``
(``dala_model.serving.scoring``). The re-scoring of a root's own manifest writes no heatmaps, so
``explain=True`` without a source (or with an empty one) is refused before any work, rather than
silently ignored; a run's test images are explained with ``dala explain ROOT --run RUN_ID``.

``precision`` is passed to both: ``auto`` (measured once per machine, ``engine.autotune``) or
``int8`` for CPU workers (the promoted model's int8 sibling, quantized on first use from its
validation images and saved beside it; refused on CUDA). ``batch_size`` unset lets a CPU measure
it.

``dask_address`` (with a source) scores a large drop on that Dask cluster. The drop's ingest
runs there first: the flow checks the request and lists the drop here (``plan-drop``: unchanged
files reused, the rest cut into partitions of ``chunk_size`` files), sends one ``check-drop``
task per partition (read, hash, check; nothing written) and commits the drop's manifest,
quarantine and duplicates here (``commit-drop``, the single writer), the records the default
path writes (``dala_model.serving.drop``). Then it plans the scoring here
(``plan-scoring``: each magnification's model and threshold, the pending
images cut into deterministic chunks of ``chunk_size``), sends one ``score-chunk`` task per
chunk to the cluster through prefect-dask (``flows/_dask.py``), then finishes here
(``finish-scoring``: batch reports and the case table, one writer). A chunk's part key is fixed
by the plan, so a chunk rerun after a lost worker, or retried, rewrites the same part: nothing is
lost or written twice. Each worker loads a magnification's model once for all its chunks
(``scoring.cached_tools``). Without ``dask_address`` one task scores the whole drop here, as
before; both give the same predictions and parts (tests/test_dask_scoring.py).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Literal

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import Field

from dala_model import storage
from dala_model.data.breakhis import check_magnifications
from dala_model.layout import RootLayout
from dala_model.serving import drop as drop_lib
from dala_model.serving import predictions, promotion, scoring
from flows._common import IO_RETRIES
from flows._dask import DaskAddress, dask_runner, run_on_dask

CASE_ROWS = 200  # case rows shown in the artifact; the full table is the Parquet file


@task(name="score", task_run_name="score-{model}-{magnification}x", **IO_RETRIES)
def score_task(
    root: str,
    model: str,
    magnification: int,
    flow_run_id: str,
    threshold: float,
    batch_size: int | None,
    device: str,
    precision: str,
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
            precision=precision,
        )
    )


@task(name="score-source", task_run_name="score-{model}-drop", **IO_RETRIES)
def score_source_task(
    source: str,
    registry: str,
    out: str,
    model: str,
    threshold: float | None,
    batch_size: int | None,
    device: str,
    precision: str,
    flow_run_id: str,
    explain: bool = False,
    explain_method: str = "gradcam",
    chunk_size: int = scoring.DEFAULT_CHUNK_SIZE,
) -> dict:
    """Check, record and score one drop; safe to retry: scored images are skipped by content
    (heatmaps are content-keyed too, written before the part that names them)."""
    result = scoring.score_source(
        source,
        registry,
        out,
        model=model,
        threshold=threshold,
        batch_size=batch_size,
        device=device,
        precision=precision,
        flow_run_id=flow_run_id,
        chunk_size=chunk_size,
        explain=explain,
        explain_method=explain_method,
    )
    return asdict(result)


@task(name="plan-scoring", **IO_RETRIES)
def plan_scoring_task(
    source: str,
    registry: str,
    out: str,
    model: str,
    threshold: float | None,
    batch_size: int | None,
    device: str,
    precision: str,
    flow_run_id: str,
    explain: bool,
    explain_method: str,
    chunk_size: int,
    drop: drop_lib.DropResult | None = None,
) -> scoring.ScoringPlan:
    """Ingest the drop (unless ``drop`` is its committed ingest) and cut its pending images
    into chunks; safe to retry (incremental)."""
    return scoring.plan_scoring(
        source,
        registry,
        out,
        model=model,
        threshold=threshold,
        batch_size=batch_size,
        device=device,
        precision=precision,
        flow_run_id=flow_run_id,
        chunk_size=chunk_size,
        explain=explain,
        explain_method=explain_method,
        drop=drop,
    )


@task(name="plan-drop", **IO_RETRIES)
def plan_drop_task(
    source: str,
    registry: str,
    out: str,
    model: str,
    threshold: float | None,
    device: str,
    precision: str,
    explain: bool,
    explain_method: str,
    chunk_size: int,
) -> drop_lib.DropPlan:
    """Check the request and list the drop into partitions of files to read; reads no image."""
    return scoring.plan_drop_ingest(
        source,
        registry,
        out,
        model=model,
        threshold=threshold,
        device=device,
        precision=precision,
        chunk_size=chunk_size,
        explain=explain,
        explain_method=explain_method,
    )


@task(name="check-drop", task_run_name="check-drop-{partition.index}", **IO_RETRIES)
def check_drop_task(partition: drop_lib.DropPartition) -> drop_lib.CheckedPartition:
    """Read, hash and check one partition of the drop on a Dask worker; writes nothing."""
    return drop_lib.check_partition(partition)


@task(name="commit-drop", **IO_RETRIES)
def commit_drop_task(
    plan: drop_lib.DropPlan, checked: list[drop_lib.CheckedPartition]
) -> drop_lib.DropResult:
    """Write the drop's manifest, quarantine and duplicates, once, here; safe to retry."""
    return drop_lib.commit_drop(plan, checked)


@task(
    name="score-chunk",
    task_run_name="score-chunk-{chunk.magnification}x-{chunk.index}",
    **IO_RETRIES,
)
def score_chunk_task(chunk: scoring.Chunk) -> scoring.ChunkResult:
    """Score one chunk on a Dask worker (its model loaded once per worker); safe to rerun: the
    part and heatmaps are written under the chunk's own keys."""
    return scoring.run_chunk(chunk)


@task(name="finish-scoring", **IO_RETRIES)
def finish_scoring_task(plan: scoring.ScoringPlan, results: list[scoring.ChunkResult]) -> dict:
    """Batch reports and the case table, written once, here; safe to retry (both rebuilt)."""
    return asdict(scoring.finish_scoring(plan, results))


def score_on_dask(dask_address: str, *plan_args) -> dict:
    """Ingest the drop and score every chunk on the cluster; plan, commit and finish here (see
    the module docstring).

    The cluster is reached once before the plan, so a wrong address fails in seconds rather than
    after the drop has been listed."""
    with dask_runner(dask_address):
        pass
    source, registry, out, model, threshold, _, device, precision = plan_args[:8]
    _, explain, explain_method, chunk_size = plan_args[8:]
    request = (model, threshold, device, precision, explain, explain_method, chunk_size)
    drop_plan = plan_drop_task(source, registry, out, *request)
    checked = []
    if drop_plan.partitions:  # a rerun re-reads only changed (and quarantined) files
        checked = run_on_dask(
            dask_address,
            check_drop_task,
            [{"partition": partition} for partition in drop_plan.partitions],
            what="drop partitions",
        )
    drop = commit_drop_task(drop_plan, checked)
    plan = plan_scoring_task(*plan_args, drop=drop)
    results = []
    if plan.chunks:  # a rerun with nothing pending sends nothing
        results = run_on_dask(
            dask_address,
            score_chunk_task,
            [{"chunk": chunk} for chunk in plan.chunks],
            what="scoring chunks",
        )
    return finish_scoring_task(plan, results)


@flow(name="batch-inference", log_prints=True)
def inference_flow(
    root: Annotated[
        str, Field(description="storage root URL (s3://bucket/prefix or a local path)")
    ],
    source: Annotated[
        str | None,
        Field(description="a drop of new images to score (case folders, sidecar, BreakHis)"),
    ] = None,
    registry: Annotated[
        str | None, Field(description="root holding the promoted models; default: root")
    ] = None,
    out: Annotated[
        str | None, Field(description="scoring root for a source; default: ROOT/scoring")
    ] = None,
    model: str = "dalaresnet50",
    magnifications: Annotated[
        list[int] | None,
        Field(description="without source: default every one with a current model"),
    ] = None,
    threshold: Annotated[
        float | None, Field(gt=0, lt=1, description="default: the model card's, else 0.5")
    ] = None,
    batch_size: Annotated[
        int | None, Field(gt=0, description="default: measured on CPU (int8: 16), 128 on CUDA")
    ] = None,
    device: Annotated[str, Field(description="auto, cpu, cuda or cuda:N")] = "auto",
    precision: Annotated[
        Literal["auto", "fp32", "bf16", "fp16", "int8"],
        Field(description="auto: measured per machine; int8: CPU workers only"),
    ] = "auto",
    explain: Annotated[
        bool,
        Field(description="with source: Grad-CAM overlays of malignant and uncertain calls"),
    ] = False,
    explain_method: Literal["gradcam", "gradcam++"] = "gradcam",
    dask_address: DaskAddress = None,
    chunk_size: Annotated[
        int,
        Field(gt=0, description="with source: images per part file (a Dask task each)"),
    ] = scoring.DEFAULT_CHUNK_SIZE,
) -> list[dict] | dict:
    """Score new images with the registry's current models; write Parquet."""
    if explain and not (source or "").strip():
        raise ValueError(
            "explain=True writes heatmaps for a source drop (source=<prefix>); re-scoring the "
            "root's own manifest writes none. Pass source, or explain a training run's test "
            "images with `dala explain ROOT --run RUN_ID`"
        )
    logger = get_run_logger()
    run_id = str(runtime.flow_run.id)
    source = _drop_or_none(source, logger)
    if source is not None:
        if magnifications:
            raise ValueError(
                "magnifications applies to re-scoring the root's manifest; a source is scored "
                "at every magnification it holds, each with its own model"
            )
        out = out or RootLayout(root).scoring()
        args = (source, registry or root, out, model, threshold, batch_size, device, precision)
        args += (run_id, explain, explain_method, chunk_size)
        if dask_address:
            result = score_on_dask(dask_address, *args)
        else:
            result = score_source_task.submit(*args).result()
        _publish_scoring(result)
        return result
    if dask_address:
        raise ValueError(
            "dask_address scores a source drop on the cluster (source=<prefix>); re-scoring the "
            "root's own manifest runs here. Pass source, or leave dask_address empty"
        )
    threshold = 0.5 if threshold is None else threshold
    serving = {r.magnification: r for r in promotion.current_records(root) if r.model == model}
    wanted = check_magnifications(magnifications or sorted(serving), what="magnifications")
    missing = [m for m in wanted if m not in serving]
    if not wanted or missing:
        raise LookupError(
            f"no current {model} model for {missing or 'any magnification'} under {storage.redact(root)}: "
            "run train-breakhis first or pin one with `dala promote`"
        )
    futures = [
        score_task.submit(root, model, m, run_id, threshold, batch_size, device, precision)
        for m in wanted
    ]
    results = [f.result() for f in futures]
    for r in results:
        logger.info(
            "%dX: scored %d, already scored %d, model %s (%s)",
            r["magnification"],
            r["scored"],
            r["skipped"],
            r["model_version"][:12],
            (r["tuning"] or {}).get("label", "nothing scored"),
        )
    _publish(results, root, model)
    return results


def _drop_or_none(source: str | None, logger) -> str | None:
    """``source``, or None for "no drop"; an empty one (DALA_INCOMING unset at deploy) is logged."""
    if source is not None and not source.strip():
        logger.warning(
            "source is empty (was DALA_INCOMING unset when this deployment was created?), so "
            "there is no drop to score: re-scoring the root's manifest instead; redeploy with "
            "DALA_INCOMING=<prefix>, or run with -p source=<prefix>"
        )
    return (source or "").strip() or None


def _publish(results: list[dict], root: str, model: str) -> None:
    from dala_model.report.tables import markdown_table

    lines = [
        f"## Batch inference with {model}",
        "",
        f"Predictions: **{storage.redact(predictions.predictions_uri(root, model))}** (Parquet, one part per chunk)",
        "",
        markdown_table(_COLUMNS, [_row(r) for r in results]),
    ]
    create_markdown_artifact(
        markdown="\n".join(lines),
        key="batch-inference",
        description="rows written per magnification and the batch's IBA/G-mean",
    )


_COLUMNS = (
    "magnification",
    "model version",
    "scored now",
    "already scored",
    "precision",
    "accuracy",
    "IBA",
    "G-mean",
    "batch report",
)


def _row(result: dict) -> list:
    """One magnification's line of the batch-inference artifact, in ``_COLUMNS`` order."""
    from dala_model.report.tables import MISSING, fmt

    metrics = result["metrics"] or {}
    return [
        f"{result['magnification']}X",
        f"`{result['model_version'][:12]}`",
        result["scored"],
        result["skipped"],
        (result["tuning"] or {}).get("label", MISSING),
        *(fmt(metrics.get(key)) for key in ("accuracy", "iba_unsquared", "gmean")),
        storage.redact(result["report_uri"]) if result["report_uri"] else MISSING,
    ]


def _publish_scoring(result: dict) -> None:
    """Table artifacts: counts per magnification, and the drop's case-level predictions."""
    # Imported here, not at the top: Dask workers import this module for score-chunk alone, and
    # the report package would add to their start-up.
    from dala_model.report.tables import MISSING, fmt

    rows = []
    for m in result["magnifications"]:
        report = m["report"] or {}
        image = (report.get("metrics") or {}).get("image") or {}
        rows.append(
            {
                "magnification": f"{m['magnification']}X",
                "images": m["images"],
                "scored": m["scored"],
                "skipped": m["skipped"],
                "quarantined": m["quarantined"],
                "unscored": m["unscored"],
                "model version": (m["model_version"] or MISSING)[:12],
                "threshold": fmt(m["threshold"]),
                "precision": (m["tuning"] or {}).get("label", MISSING),
                "heatmaps": m["explained"] if m["explain"] else MISSING,
                "labelled": report.get("labelled", 0),
                "evaluated": report.get("evaluated", 0),
                "excluded": ", ".join(f"{k} {v}" for k, v in report.get("excluded", {}).items())
                or MISSING,
                "accuracy": fmt(image.get("accuracy")),
                "G-mean": fmt(image.get("gmean")),
            }
        )
    unknown = sum(result["quarantined"].values()) - sum(
        m["quarantined"] for m in result["magnifications"]
    )
    if unknown:
        rows.append({"magnification": "unknown", "quarantined": unknown})
    create_table_artifact(
        table=rows,
        key="batch-scoring",
        description=(
            f"{result['source']} -> {result['out']}: {result['images']} images, "
            f"quarantined {result['quarantined'] or 'none'}; image predictions "
            f"{storage.redact(result['images_uri'])}"
        ),
    )
    cases = [
        {
            "case": c["case_id"],
            "magnification": f"{c['magnification']}X" if c["magnification"] else "all",
            "images": c["n_images"],
            "prob_malignant": fmt(c["prob_malignant"]),
            "prediction": "malignant" if c["pred_label"] else "benign",
        }
        for c in result["cases"][:CASE_ROWS]
    ]
    create_table_artifact(
        table=cases or [{"case": MISSING}],
        key="batch-scoring-cases",
        description=f"case-level predictions of this drop (all: {storage.redact(result['cases_uri'])})",
    )
