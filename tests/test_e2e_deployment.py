"""End to end as an operator runs it: Prefect server + process worker + `prefect deploy --all`.

Real parts only: moto's standalone S3 server (tests/conftest.py) holds the source images and
every output; `prefect server start` runs on a free port with its own PREFECT_HOME; a process work
pool and worker execute the deployments from prefect.yaml through its pull step. Every process
this test starts is stopped with its children at the end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from dala_model import storage
from dala_model.data import synth
from dala_model.data.manifest import read_manifest
from dala_model.models.checkpoint import load_model
from dala_model.serving import promotion
from dala_model.serving.predictions import read_predictions

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MAGS = [40, 100]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """Terminate a started process and everything it spawned (flow runs, pool workers)."""
    try:
        family = psutil.Process(process.pid).children(recursive=True) + [
            psutil.Process(process.pid)
        ]
    except psutil.NoSuchProcess:
        return
    for member in family:
        try:
            member.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=15)
    for member in alive:
        member.kill()


@pytest.fixture
def prefect_env(tmp_path, s3_bucket) -> dict[str, str]:
    port = free_port()
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_UI_ENABLED": "false",
        "DALA_ROOT": f"{s3_bucket}/root",
        "DALA_CHECKOUT": str(REPO),
        "DALA_SLOT_DIR": str(tmp_path / "slots"),
    }


def prefect(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(BIN / "prefect"), "--no-prompt", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, (
        f"prefect {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done


def wait_healthy(api_url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, "prefect server exited during startup"
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"prefect server at {api_url} not healthy after {timeout}s")


def api_logs(api_url: str, logger: str, text: str) -> list[str]:
    """The messages the API holds from ``logger`` that contain ``text`` (any flow or task run)."""
    request = urllib.request.Request(
        f"{api_url}/logs/filter",
        data=json.dumps({"logs": {"text": {"query": text}}, "limit": 200}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return [log["message"] for log in json.load(response) if log["name"] == logger]


@pytest.mark.slow
def test_deployments_train_and_score_into_the_bucket(tmp_path, s3_bucket, prefect_env):
    env, root = prefect_env, prefect_env["DALA_ROOT"]
    local = tmp_path / "source"
    count = synth.generate(str(local), patients=8, images_per_patient=2, seed=5, size=(128, 96))
    source = f"{s3_bucket}/source"
    for png in local.rglob("*.png"):
        storage.write_bytes_atomic(
            storage.join(source, png.relative_to(local).as_posix()), png.read_bytes()
        )

    started: list[subprocess.Popen] = []
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        server = subprocess.Popen(
            [
                str(BIN / "prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                env["PREFECT_SERVER_API_PORT"],
            ],
            cwd=tmp_path,
            env=env,
            stdout=open(logs / "server.log", "w"),
            stderr=subprocess.STDOUT,
        )
        started.append(server)
        wait_healthy(env["PREFECT_API_URL"], server)
        prefect(env, "work-pool", "create", "dala-process", "--type", "process")
        prefect(env, "deploy", "--all")
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "dala-process"],
            cwd=tmp_path,
            env=env,
            stdout=open(logs / "worker.log", "w"),
            stderr=subprocess.STDOUT,
        )
        started.append(worker)

        watch = ("--watch", "--watch-interval", "2", "--watch-timeout", "400")
        prefect(
            env,
            "deployment",
            "run",
            "train-breakhis/breakhis",
            *watch,
            "-p",
            f"source={source}",
            "-p",
            f"magnifications={MAGS}",
            "-p",
            "epochs=1",
            "-p",
            "batch_size=8",
            "-p",
            "image_size=32",
            timeout=450,
        )
        engine_logs = api_logs(env["PREFECT_API_URL"], "dala_model.engine.train", "epoch")
        prefect(env, "deployment", "run", "batch-inference/nightly", *watch, timeout=450)
        first = read_predictions(root, "dalaresnet50", dedupe=False)
        prefect(env, "deployment", "run", "batch-inference/nightly", *watch, timeout=450)
        second = read_predictions(root, "dalaresnet50", dedupe=False)
    finally:
        for process in reversed(started):
            stop(process)
    for process in started:
        assert process.poll() is not None

    # The deployments forward the library's log lines (prefect.yaml's job variables).
    for mag in MAGS:
        assert any(f"dalaresnet50-{mag}x-patient-seed0 epoch 1/1" in m for m in engine_logs)
    manifest = read_manifest(root)
    assert len(manifest) == count and manifest["uri"].str.startswith(source).all()
    for mag in MAGS:
        record = promotion.current(root, "dalaresnet50", mag)
        assert record["run_id"] == f"dalaresnet50-{mag}x-patient-seed0" and record["data_version"]
        model = load_model(record["checkpoint_uri"])
        assert sum(p.numel() for p in model.parameters()) == 25_611_842
        assert record["metrics"]["test"]["image"]["n"] > 0
    report = storage.read_bytes(f"{root}/reports/report.html").decode()
    assert all(f"dalaresnet50-{mag}x-patient-seed0" in report for mag in MAGS)
    expected = manifest[manifest["magnification"].isin(MAGS)]
    assert len(first) == len(expected) and set(first["image_id"]) == set(expected["image_id"])
    assert len(second) == len(first) and not second.duplicated(["image_id", "model_version"]).any()
    assert ((first["prob_malignant"] >= 0.5).astype(int) == first["pred_label"]).all()
