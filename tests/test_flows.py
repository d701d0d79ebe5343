"""The Prefect flows on tiny synthetic data under a real (temporary) Prefect API.

One module-scoped pipeline drives the flows in the order an operator would: a training run in
which one magnification fails for a real reason (a stale run folder from another config), the
rerun that completes only that one (as a two-process DDP job: ``gpus_per_training=2``), then
batch inference twice, batch inference of an unlabelled case-folder drop (``source``) and the
report flow.
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

from dala_model import storage
from dala_model.data import synth
from dala_model.engine.config import TrainConfig
from dala_model.layout import RootLayout
from dala_model.serving import promotion
from dala_model.serving.outputs import read_image_predictions
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
def pipeline(module_tmp, prefect_api) -> dict:
    base = module_tmp("flows")
    source, root = str(base / "source"), str(base / "root")
    synth.generate(source, patients=8, images_per_patient=2, seed=3, size=(128, 96))
    # A stale folder of another config under 400X's run id: train() refuses to mix them (RunConflict).
    stale = Path(root) / "runs" / "dalaresnet50-400x-patient-seed0"
    stale.mkdir(parents=True)
    other = TrainConfig(root=root, magnification=400, epochs=7, batch_size=8, image_size=32)
    (stale / "config.json").write_text(json.dumps({"config": other.model_dump(mode="json")}))
    # As the deployments do: the library's log lines go to the run logs (read back below).
    with pytest.MonkeyPatch.context() as env:
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
        # An unlabelled case-folder drop (non-BreakHis names) scored into ROOT/scoring.
        drop = str(base / "incoming")
        drop_files = synth.generate_cases(drop, cases=3, images_per_magnification=1, seed=9)
        foreign_source = inference_flow(root=root, source=drop, return_state=True)
        manifest_after = storage.read_bytes(f"{root}/manifests/manifest.parquet")
        report = report_flow(root=root, return_state=True)
        artifacts = {
            key: Artifact.get(key)
            for key in (
                "ingest-summary",
                "metrics-dalaresnet50-40x-patient-seed0",
                "progress-dalaresnet50-400x-patient-seed0",
                "breakhis-report",
                "breakhis-report-link",
                "batch-inference",
                "batch-scoring",
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
            "drop": drop,
            "drop_files": drop_files,
            "foreign_source": foreign_source,
            "manifest_before": manifest_before,
            "manifest_after": manifest_after,
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


def test_batch_inference_scores_a_foreign_source_into_its_own_root(pipeline):
    root, drop, files = pipeline["root"], pipeline["drop"], pipeline["drop_files"]
    state = pipeline["foreign_source"]
    assert state.is_completed(), state.message
    result = state.result()
    scoring_root = RootLayout(root).scoring()
    assert result["out"] == storage.redact(scoring_root) and result["layout"] == "case_folders"
    assert result["images"] == len(files) and not result["quarantined"]
    assert {m["magnification"]: m["scored"] for m in result["magnifications"]} == {
        m: 3 for m in MAGS
    }
    table = read_image_predictions(scoring_root, "dalaresnet50", dedupe=False)
    assert sorted(table["uri"]) == sorted(storage.join(drop, f) for f in files)
    assert table["sha256"].is_unique and set(table["case_id"]) == {f.split("/")[0] for f in files}
    assert set(table["flow_run_id"]) == {str(state.state_details.flow_run_id)}
    assert result["images_uri"].startswith(scoring_root)
    # The training manifest is byte-for-byte what it was, and its predictions gained no row.
    assert pipeline["manifest_after"] == pipeline["manifest_before"]
    assert len(read_predictions(root, "dalaresnet50", dedupe=False)) == pipeline["rows_after_first"]
    assert "400X" in pipeline["artifacts"]["batch-scoring"].data


def test_artifacts_and_report(pipeline):
    art, root = pipeline["artifacts"], pipeline["root"]
    files = pipeline["report"].result()
    assert files["report.html"] == storage.join(root, "reports", "report.html")
    assert root in art["breakhis-report"].data and "report.html" in art["breakhis-report"].data
    assert (
        art["breakhis-report-link"].data == f"[report.html]({Path(files['report.html']).as_uri()})"
    )
    rows = json.loads(art["metrics-dalaresnet50-40x-patient-seed0"].data)
    assert [r["Source"] for r in rows] == ["this run", "paper"] and rows[1]["Accuracy"] == "0.985"
    summary = json.loads(storage.read_bytes(f"{root}/runs/dalaresnet50-40x-patient-seed0/run.json"))
    assert rows[0]["Accuracy"] == f"{summary['metrics']['test']['image']['accuracy']:.3f}"
    assert float(art["progress-dalaresnet50-400x-patient-seed0"].data) == 100.0
    assert "| manifest images |" in art["ingest-summary"].data
    assert "400X" in art["batch-inference"].data


def test_unknown_magnifications_are_refused_before_any_work(prefect_api, tmp_path):
    root = tmp_path / "root"
    for flow_, parameters in (
        (train_flow, {"magnifications": [40, 50]}),
        (inference_flow, {"magnifications": [7]}),
    ):
        state = flow_(root=str(root), **parameters, return_state=True)
        assert state.is_failed()
        assert "magnifications must be one of (40, 100, 200, 400), got " in state.message
    assert not root.exists()
