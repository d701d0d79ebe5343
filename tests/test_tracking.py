"""MLflow mirroring against a real ``mlflow server`` (SQLite backend, local artifacts) on 127.0.0.1.

One tiny real run (32 px, two epochs) is trained with ``tracking_uri`` and read back through
``MlflowClient``: params, the per-epoch metric history, the test metrics with their intervals,
tags, the logged model with its signature and input example, the run files and plots. Promotion
sets ``champion``; ``models:/dalaresnet50@champion`` then resolves to checkpoint folders that
score a drop exactly as the storage registry does. MLflow being down never fails a training or
a promotion: a dead port is logged (credentials redacted) and survived, and a server that comes
up before the run ends receives the queued calls (through a TCP forwarder that starts listening
mid-run).
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dala_model import runs, storage
from dala_model.data import synth
from dala_model.data.ingest import ingest
from dala_model.data.splits import make_split
from dala_model.engine.config import TrainConfig, config_hash
from dala_model.engine.records import check_same_run, recorded_config
from dala_model.engine.train import train
from dala_model.serving import promotion

pytestmark = pytest.mark.slow

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

SIZE = 32
MLFLOW = Path(sys.executable).with_name("mlflow")
# MLflow's own retries of a refused connection (bounded to 2 by dala unless set) only cost
# sleep here; one test below keeps them to check the bound.
NO_RETRIES = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server_process(module_tmp):
    """``mlflow server`` starting in the background (it takes a while: data is made meanwhile)."""
    base = module_tmp("mlflow")
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log_file = open(base / "server.log", "wb")  # noqa: SIM115 - closed at teardown
    process = subprocess.Popen(
        [str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{base}/mlflow.db",
         "--artifacts-destination", str(base / "artifacts"), "--serve-artifacts",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    yield process, f"http://127.0.0.1:{port}", base / "server.log"
    os.killpg(process.pid, signal.SIGTERM)  # the server and the uvicorn worker it started
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    log_file.close()


@pytest.fixture(scope="module")
def mlflow_server(server_process) -> str:
    """The tracking URI, once ``/health`` answers."""
    process, uri, log_file = server_process
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited: {log_file.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    return uri
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server not healthy after 180 s: {log_file.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def root(server_process, module_tmp) -> str:
    """A tiny synthetic training root (manifest, 32 px cache, patient split)."""
    base = module_tmp("tracking")
    synth.generate(str(base / "source"), patients=8, images_per_patient=2, seed=1, size=(128, 96))
    ingest(str(base / "source"), str(base / "root"), cache_size=SIZE)
    make_split(str(base / "root"), "patient", seed=0)
    return str(base / "root")


def _config(root: str, **overrides) -> TrainConfig:
    fields = dict(root=root, magnification=40, epochs=1, batch_size=8, image_size=SIZE)
    return TrainConfig(**{**fields, "device": "cpu", **overrides})


@pytest.fixture(scope="module")
def tracked(root, mlflow_server):
    """A 40X run trained with tracking_uri, then promoted into a storage registry (= ROOT)."""
    result = train(_config(root, epochs=2, tracking_uri=mlflow_server))
    promoted = promotion.promote(root, result.run_uri, tracking_uri=mlflow_server)
    return result, promoted


@pytest.fixture(scope="module")
def dead_run(root):
    """A 100X run whose tracking URI (with credentials) points at a port nobody listens on."""
    dead = f"http://dala:s3cret-token@127.0.0.1:{_free_port()}"
    handler = _Capture()
    logging.getLogger("dala_model").addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(*NO_RETRIES)
            started = time.perf_counter()
            result = train(_config(root, magnification=100, tracking_uri=dead))
            seconds = time.perf_counter() - started
    finally:
        logging.getLogger("dala_model").removeHandler(handler)
    return result, handler.text(), seconds


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")

    def text(self) -> str:
        return "\n".join(self.lines)


def _mlflow_run(uri: str, run_id: str):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("dala-breakhis")
    found = client.search_runs([experiment.experiment_id], f"tags.`dala.run_id` = '{run_id}'")
    assert len(found) == 1, f"{len(found)} MLflow runs for {run_id}"
    return client, found[0]


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_training_run_is_mirrored(tracked, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # for mlflow.models.get_model_info
    result, _ = tracked
    client, run = _mlflow_run(mlflow_server, result.run_id)
    summary = json.loads(storage.read_bytes(storage.join(result.run_uri, runs.SUMMARY)))
    assert run.info.status == "FINISHED" and run.info.run_name == result.run_id

    # Params: the TrainConfig flattened; the tracking URI is not one of them.
    params = run.data.params
    assert params["epochs"] == "2" and params["image_size"] == str(SIZE)
    assert params["model"] == "dalaresnet50" and params["lr"] == "0.0001"
    assert "tracking_uri" not in params

    # Tags naming the run, its data and its split.
    tags = run.data.tags
    assert tags["dala.run_id"] == result.run_id and tags["dala.magnification"] == "40"
    assert tags["dala.split_hash"] == summary["split"]["hash"]
    assert tags["dala.data_version"] == summary["data_version"]
    assert tags["dala.config_hash"] == summary["config_hash"]
    sha = promotion.model_version(result.best_model_uri)
    assert tags["dala.model_version"] == sha

    # Per-epoch metrics with step = epoch, equal to history.parquet.
    history = storage.read_parquet(storage.join(result.run_uri, runs.HISTORY))
    for name in ("train_loss", "val_loss", "val_acc"):
        logged = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in logged] == [0, 1]
        assert [m.value for m in logged] == pytest.approx(history[name].tolist())

    # Test metrics with their intervals, equal to run.json.
    metrics, test = run.data.metrics, summary["metrics"]["test"]
    assert metrics["test_gmean"] == pytest.approx(test["image"]["gmean"])
    assert [metrics["test_gmean_ci_low"], metrics["test_gmean_ci_high"]] == pytest.approx(
        test["ci"]["gmean"]
    )
    by_patient = next(
        i for i in test["intervals"]
        if (i["metric"], i["scope"], i["unit"]) == ("accuracy", "image", "patient")
    )  # fmt: skip
    assert metrics["test_accuracy_ci_by_patient_low"] == pytest.approx(by_patient["low"])
    assert metrics["test_patient_accuracy"] == pytest.approx(test["patient"]["accuracy"])
    assert metrics["best_epoch"] == summary["best_epoch"]

    # Run files, plots and the report as artifacts; the plots are real PNGs.
    files = _artifacts(client, run.info.run_id)
    assert {"run/run.json", "run/config.json", "run/history.parquet"} <= files
    assert {"plots/learning_curves.png", "report.md"} <= files
    local = client.download_artifacts(run.info.run_id, "plots/learning_curves.png")
    assert Image.open(local).size[0] > 100
    report = Path(client.download_artifacts(run.info.run_id, "report.md")).read_text()
    assert result.run_id in report and "gmean" in report

    # The best model: our checkpoint folder, with a signature and an input example.
    info = mlflow.models.get_model_info(tags["dala.logged_model"])
    inputs = info.signature.inputs.inputs[0]
    assert inputs.type == np.dtype(np.uint8) and inputs.shape == (-1, SIZE, SIZE, 3)
    assert info.saved_input_example_info is not None
    logged = client.get_logged_model(info.model_id)
    assert logged.experiment_id == run.info.experiment_id
    assert logged.source_run_id == run.info.run_id


def test_promotion_registers_the_version_at_champion(tracked, mlflow_server):
    result, promoted = tracked
    assert promoted.promoted
    # The storage registry committed first and stays the source of truth.
    current = promotion.current_record(result_root(result), "dalaresnet50", 40)
    assert current is not None and current.model_version == promoted.current.model_version
    client = MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias("dalaresnet50-40x", "champion")
    assert version.tags["dala.model_version"] == current.model_version
    assert version.tags["dala.promoted_at"] == current.promoted_at
    _, run = _mlflow_run(mlflow_server, result.run_id)
    assert version.run_id == run.info.run_id  # the training run's own logged model
    # A no-op re-promotion registers nothing new.
    again = promotion.promote(result_root(result), result.run_uri, tracking_uri=mlflow_server)
    assert not again.promoted
    assert len(client.search_model_versions("name = 'dalaresnet50-40x'")) == 1


def result_root(result) -> str:
    return result.run_uri.rsplit("/runs/", 1)[0]


def test_a_dead_tracking_server_never_fails_a_training(dead_run):
    result, logged, seconds = dead_run
    assert result.status == "complete"
    assert runs.load_summary(result.run_uri).complete
    assert "is unreachable" in logged and "not mirrored" in logged
    assert "s3cret-token" not in logged and "***@127.0.0.1" in logged
    # The credentials never reach the run folder either.
    recorded = storage.read_bytes(storage.join(result.run_uri, runs.CONFIG)).decode()
    assert "s3cret-token" not in recorded and "***@127.0.0.1" in recorded
    assert seconds < 300


def test_promotion_survives_a_dead_server_and_logs_untracked_runs_when_up(
    dead_run, mlflow_server, tmp_path, caplog, monkeypatch
):
    result, _, _ = dead_run
    monkeypatch.setenv(*NO_RETRIES)
    registry = str(tmp_path / "registry")
    dead = f"http://127.0.0.1:{_free_port()}"
    with caplog.at_level(logging.WARNING, logger="dala_model"):
        promoted = promotion.promote(registry, result.run_uri, tracking_uri=dead)
    assert promoted.promoted
    assert promotion.current_record(registry, "dalaresnet50", 100) is not None
    assert "unreachable" in caplog.text

    # The run was never tracked: its first promotion with MLflow up logs the model itself.
    promotion.promote(result_root(result), result.run_uri, tracking_uri=mlflow_server)
    client = MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias("dalaresnet50-100x", "champion")
    sha = promotion.model_version(result.best_model_uri)
    assert version.tags["dala.model_version"] == sha
    run = client.get_run(version.run_id)
    assert run.data.tags["dala.logged_at"] == "promotion"
    assert run.data.params["magnification"] == "100" and "test_gmean" in run.data.metrics


def test_models_uri_resolves_to_checkpoints_that_score_like_the_storage_registry(
    tracked, dead_run, mlflow_server, tmp_path, monkeypatch
):
    result, _ = tracked
    root = result_root(result)
    if promotion.current_record(root, "dalaresnet50", 100) is None:
        promotion.promote(root, dead_run[0].run_uri, tracking_uri=mlflow_server)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("DALA_MLFLOW_CACHE", str(tmp_path / "cache"))

    records = promotion.current_records("models:/dalaresnet50@champion")
    ours = promotion.current_records(root)
    assert [(r.magnification, r.model_version) for r in records] == [
        (r.magnification, r.model_version) for r in ours
    ]
    for record in records:
        assert record.checkpoint_uri.startswith(str(tmp_path / "cache"))
        assert promotion.model_version(record.checkpoint_uri) == record.model_version
    single = promotion.current_records("models:/dalaresnet50-40x@champion")
    assert [r.magnification for r in single] == [40]

    # MLflow's own loader gives the same probabilities as our checkpoint.
    from dala_model.engine.inference import predict_proba
    from dala_model.models.checkpoint import load_model

    pixels = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    # dst_path: without it MLflow downloads the model into a fresh system temp folder it never
    # removes (about 100 MB per run of this test)
    (tmp_path / "pyfunc").mkdir()  # MLflow refuses a destination that does not exist
    served = mlflow.pyfunc.load_model(
        "models:/dalaresnet50-40x@champion", dst_path=str(tmp_path / "pyfunc")
    )
    import torch

    ours40 = load_model(promotion.current_record(root, "dalaresnet50", 40).checkpoint_uri)
    want = predict_proba(ours40, pixels, preset="paper", device=torch.device("cpu"))
    assert served.predict(pixels) == pytest.approx(want, abs=1e-5)

    # Batch inference from models:/ scores a drop as it does from the storage registry.
    drop = tmp_path / "drop"
    rng = np.random.default_rng(1)
    for relpath in ("case-0001/40X/a.png", "case-0001/100X/b.png", "case-0002/40X/c.png"):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
        storage.write_bytes_atomic(str(drop / relpath), buffer.getvalue())
    from dala_model.serving.outputs import read_image_predictions
    from dala_model.serving.scoring import score_source

    kwargs = {"device": "cpu", "precision": "fp32"}
    via_mlflow = score_source(
        str(drop), "models:/dalaresnet50@champion", str(tmp_path / "a"), **kwargs
    )
    score_source(str(drop), root, str(tmp_path / "b"), **kwargs)
    assert sum(m.scored for m in via_mlflow.magnifications) == 3
    a = read_image_predictions(str(tmp_path / "a"), "dalaresnet50").set_index("sha256")
    b = read_image_predictions(str(tmp_path / "b"), "dalaresnet50").set_index("sha256")
    assert (a["model_version"] == b.loc[a.index, "model_version"]).all()
    assert a["prob_malignant"].to_numpy() == pytest.approx(
        b.loc[a.index, "prob_malignant"].to_numpy(), abs=1e-6
    )


class _LateForwarder:
    """A TCP port that refuses connections until :meth:`open`, then forwards to ``target``."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.port = _free_port()
        self.server: socket.socket | None = None

    def open(self) -> None:
        if self.server is not None:
            return
        self.server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def test_a_server_that_comes_up_before_the_end_gets_the_queued_calls(
    root, mlflow_server, caplog, monkeypatch
):
    monkeypatch.setenv(*NO_RETRIES)
    forwarder = _LateForwarder(mlflow_server)
    uri = f"http://127.0.0.1:{forwarder.port}"
    try:
        with caplog.at_level(logging.INFO, logger="dala_model"):
            result = train(
                _config(root, seed=1, tracking_uri=uri), progress=lambda _: forwarder.open()
            )
    finally:
        forwarder.close()
    assert result.status == "complete"
    assert "is unreachable" in caplog.text and "retrying" in caplog.text
    assert "not mirrored" not in caplog.text
    client, run = _mlflow_run(mlflow_server, result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["seed"] == "1"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [0]
    assert "test_gmean_ci_high" in run.data.metrics and "dala.logged_model" in run.data.tags


def test_tracking_uri_is_not_part_of_the_run_identity(tmp_path):
    plain = TrainConfig(root=str(tmp_path), magnification=40)
    tracked = plain.model_copy(update={"tracking_uri": "https://user:pw@mlflow.example:5000"})
    assert config_hash(plain, "patient") == config_hash(tracked, "patient")
    check_same_run(plain.model_dump(mode="json"), tracked, str(tmp_path))  # no RunConflict
    assert recorded_config(tracked)["tracking_uri"] == "https://***@mlflow.example:5000"


def test_a_tracking_uri_without_mlflow_installed_names_the_extra(tmp_path, monkeypatch):
    from dala_model.tracking import training

    monkeypatch.setitem(sys.modules, "mlflow", None)  # what an install without the extra sees
    config = TrainConfig(root=str(tmp_path), magnification=40, tracking_uri="http://x:5000")
    with pytest.raises(ImportError, match=r"pip install '\.\[tracking\]'"):
        training.start(config, runs.RunPaths.of(str(tmp_path / "run")), "v1")
    # Without a URI nothing is imported and the tracker is the no-op one.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    plain = config.model_copy(update={"tracking_uri": None})
    assert not training.start(plain, runs.RunPaths.of(str(tmp_path / "run")), "v1").enabled


def test_models_uri_needs_a_tracking_server(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI"):
        promotion.current_records("models:/dalaresnet50@champion")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(ValueError, match="models:/<model>@champion"):
        promotion.current_records("models:/dalaresnet50")
    # Unreachable: batch inference fails naming the URI (it cannot score without its models).
    started = time.perf_counter()
    with pytest.raises(LookupError, match=r"cannot resolve models:/dalaresnet50@champion on http"):
        promotion.current_records("models:/dalaresnet50@champion")
    assert time.perf_counter() - started < 60  # MLflow's own retries are bounded
