"""The Prefect flows on tiny synthetic data under a real (temporary) Prefect API.

One module-scoped pipeline drives the flows in the order an operator would: a training run in
which one magnification fails for a real reason (a stale run folder from another config), the
rerun that completes only that one (as a two-process DDP job: ``gpus_per_training=2``), then
batch inference twice and the report flow.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from prefect.artifacts import Artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.testing.utilities import prefect_test_harness

from dala_model import storage
from dala_model.data import synth
from dala_model.engine.config import TrainConfig
from dala_model.serving import promotion
from dala_model.serving.predictions import predictions_uri, read_predictions
from flows.inference import inference_flow
from flows.report import report_flow
from flows.train import train_flow

MAGS = [40, 100, 200, 400]
TINY = {"epochs": 1, "batch_size": 8, "image_size": 32}


def task_runs(flow_run_id) -> list:
    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


def run_logs(flow_run_id) -> list[tuple[str, str]]:
    """(logger, message) of every log line of one flow run and its task runs."""
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
    return [(log.name, log.message) for log in logs]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("flows")
    source, root = str(base / "source"), str(base / "root")
    synth.generate(source, patients=8, images_per_patient=2, seed=3, size=(128, 96))
    # A stale folder of another config under 400X's run id: train() refuses to mix them (RunConflict).
    stale = Path(root) / "runs" / "dalaresnet50-400x-patient-seed0"
    stale.mkdir(parents=True)
    other = TrainConfig(root=root, magnification=400, epochs=7, batch_size=8, image_size=32)
    (stale / "config.json").write_text(json.dumps({"config": other.model_dump(mode="json")}))
    # As the deployments do: the library's log lines go to the run logs (read back below).
    with (
        pytest.MonkeyPatch.context() as env,
        prefect_test_harness(server_startup_timeout=120),
    ):
        env.setenv("PREFECT_LOGGING_EXTRA_LOGGERS", "dala_model")
        failed = train_flow(
            root=root, source=source, magnifications=MAGS, **TINY, return_state=True
        )
        finished_before = {
            m: json.loads(
                storage.read_bytes(f"{root}/runs/dalaresnet50-{m}x-patient-seed0/run.json")
            )["finished_at"]
            for m in MAGS[:3]
        }
        failed_tasks = task_runs(failed.state_details.flow_run_id)
        shutil.rmtree(stale)
        # The rerun trains its one missing magnification as a 2-process torchrun job (gloo here).
        rerun = train_flow(
            root=root, magnifications=MAGS, **TINY, gpus_per_training=2, return_state=True
        )
        first_scoring = inference_flow(root=root, return_state=True)
        rows_after_first = len(read_predictions(root, "dalaresnet50", dedupe=False))
        second_scoring = inference_flow(root=root, return_state=True)
        manifest_before = storage.read_bytes(f"{root}/manifests/manifest.parquet")
        rerun_logs = run_logs(rerun.state_details.flow_run_id)
        foreign_source = inference_flow(
            root=root, source=str(base / "elsewhere"), return_state=True
        )
        manifest_after = storage.read_bytes(f"{root}/manifests/manifest.parquet")
        report = report_flow(root=root, return_state=True)
        artifacts = {
            key: Artifact.get(key)
            for key in (
                "ingest-summary",
                "metrics-dalaresnet50-40x-patient-seed0",
                "progress-dalaresnet50-400x-patient-seed0",
                "breakhis-report",
                "batch-inference",
            )
        }
        yield {
            "root": root,
            "failed": failed,
            "failed_tasks": failed_tasks,
            "finished_before": finished_before,
            "rerun": rerun,
            "rerun_logs": rerun_logs,
            "first_scoring": first_scoring,
            "second_scoring": second_scoring,
            "rows_after_first": rows_after_first,
            "foreign_source": foreign_source,
            "manifest_unchanged": manifest_before == manifest_after,
            "report": report,
            "artifacts": artifacts,
        }


def test_trainings_run_concurrently(pipeline):
    trains = [
        t
        for t in pipeline["failed_tasks"]
        if t.name.startswith("train-") and t.state.is_completed()
    ]
    assert len(trains) == 3
    spans = sorted((t.start_time, t.end_time) for t in trains)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False)), (
        spans
    )


def test_failed_magnification_is_retried_reported_and_isolated(pipeline):
    failed, root = pipeline["failed"], pipeline["root"]
    assert failed.is_failed() and "dalaresnet50-400x-patient-seed0" in failed.message
    broken = next(t for t in pipeline["failed_tasks"] if t.name == "train-dalaresnet50-400x")
    assert broken.state.is_failed() and broken.run_count == 2  # first try + one retry
    for mag in MAGS[:3]:
        assert (
            promotion.current(root, "dalaresnet50", mag)["run_id"]
            == f"dalaresnet50-{mag}x-patient-seed0"
        )
    assert storage.exists(f"{root}/reports/report.html")  # built from the runs that succeeded


def test_rerun_completes_only_the_missing_magnification(pipeline):
    rerun, root = pipeline["rerun"], pipeline["root"]
    assert rerun.is_completed()
    status = {o.magnification: o.status for o in rerun.result()}
    assert status == {40: "skipped", 100: "skipped", 200: "skipped", 400: "complete"}
    for mag, finished in pipeline["finished_before"].items():
        summary = json.loads(
            storage.read_bytes(f"{root}/runs/dalaresnet50-{mag}x-patient-seed0/run.json")
        )
        assert summary["finished_at"] == finished
    assert promotion.current(root, "dalaresnet50", 400) is not None
    # The ranks' output reaches the run's logs through the launcher, epoch lines included.
    launched = [m for name, m in pipeline["rerun_logs"] if name == "dala_model.engine.launcher"]
    assert any("launching 2 ranks with torchrun" in m for m in launched)
    assert any("dalaresnet50-400x-patient-seed0 epoch 1/1" in m for m in launched)
    (trained,) = [o for o in rerun.result() if o.status == "complete"]
    assert trained.slot.endswith("x 2 processes)")
    summary = json.loads(storage.read_bytes(f"{trained.run_uri}/run.json"))
    assert summary["processes"] == 2 and trained.test["accuracy"] == pytest.approx(
        summary["metrics"]["test"]["image"]["accuracy"]
    )
    trains = [t for t in task_runs(rerun.state_details.flow_run_id) if t.name.startswith("train-")]
    assert [t.name for t in trains] == ["train-dalaresnet50-400x"]


def test_batch_inference_is_incremental(pipeline):
    root = pipeline["root"]
    first, second = pipeline["first_scoring"].result(), pipeline["second_scoring"].result()
    assert sorted(r["magnification"] for r in first) == MAGS
    assert all(r["scored"] > 0 and r["metrics"]["n"] == r["scored"] for r in first)
    assert all(r["scored"] == 0 and r["skipped"] > 0 for r in second)
    table = read_predictions(root, "dalaresnet50", dedupe=False)
    assert len(table) == pipeline["rows_after_first"] == sum(r["scored"] for r in first)
    assert set(table["flow_run_id"]) == {str(pipeline["first_scoring"].state_details.flow_run_id)}
    for r in first:
        assert (
            r["model_version"]
            == promotion.current(root, "dalaresnet50", r["magnification"])["model_version"]
        )
    assert storage.exists(predictions_uri(root, "dalaresnet50"))


def test_batch_inference_refuses_a_source_that_would_replace_the_manifest(pipeline):
    state = pipeline["foreign_source"]
    assert state.is_failed() and "would replace the training manifest" in state.message
    assert pipeline["manifest_unchanged"]


def test_artifacts_and_report(pipeline):
    art, root = pipeline["artifacts"], pipeline["root"]
    files = pipeline["report"].result()
    assert files["report.html"] == storage.join(root, "reports", "report.html")
    assert root in art["breakhis-report"].data and "report.html" in art["breakhis-report"].data
    rows = json.loads(art["metrics-dalaresnet50-40x-patient-seed0"].data)
    assert [r["Source"] for r in rows] == ["this run", "paper"] and rows[1]["Accuracy"] == "0.985"
    summary = json.loads(storage.read_bytes(f"{root}/runs/dalaresnet50-40x-patient-seed0/run.json"))
    assert rows[0]["Accuracy"] == f"{summary['metrics']['test']['image']['accuracy']:.3f}"
    assert float(art["progress-dalaresnet50-400x-patient-seed0"].data) == 100.0
    assert "| manifest images |" in art["ingest-summary"].data
    assert "400X" in art["batch-inference"].data
