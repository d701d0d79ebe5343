"""End to end as an operator runs it: Prefect server + process worker + `prefect deploy --all`.

Real parts only: moto's standalone S3 server (tests/conftest.py) holds the source images and
every output; `prefect server start` runs on a free port with its own PREFECT_HOME; a process work
pool and worker execute the deployments from prefect.yaml through its pull step. Every process
this test starts is stopped with its children at the end.

``batch-inference/nightly`` is deployed twice, as an operator might: first without
``DALA_INCOMING`` (``prefect deploy`` stores an empty ``source``, and the flow re-scores the
root's manifest), then with it pointing at an incoming prefix in the bucket holding an unlabelled
case-folder drop, which two runs score into ``DALA_ROOT/scoring`` once.
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
from dala_model.layout import RootLayout
from dala_model.models.checkpoint import load_model
from dala_model.serving import promotion
from dala_model.serving.outputs import read_case_predictions, read_image_predictions
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


def api_get(api_url: str, path: str) -> dict:
    with urllib.request.urlopen(f"{api_url}/{path}", timeout=30) as response:
        return json.load(response)


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
    out = RootLayout(root).scoring()  # the nightly deployment's scoring root
    local = tmp_path / "source"
    count = synth.generate(str(local), patients=8, images_per_patient=2, seed=5, size=(128, 96))
    source = f"{s3_bucket}/source"
    for png in local.rglob("*.png"):
        storage.write_bytes_atomic(
            storage.join(source, png.relative_to(local).as_posix()), png.read_bytes()
        )

    # The incoming prefix: an unlabelled drop named as a scanner names it, not the BreakHis way.
    incoming = f"{s3_bucket}/incoming/"
    drop = synth.generate_cases(
        incoming, cases=3, images_per_magnification=2, seed=11, size=(128, 96), magnifications=MAGS
    )
    unset = {key: value for key, value in env.items() if key != "DALA_INCOMING"}

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
        prefect(unset, "deploy", "--all")
        unset_parameters = api_get(
            env["PREFECT_API_URL"], "deployments/name/batch-inference/nightly"
        )["parameters"]
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
        # Deployed without DALA_INCOMING: no drop, so nightly re-scores the root's manifest.
        prefect(unset, "deployment", "run", "batch-inference/nightly", *watch, timeout=450)
        rescored = read_predictions(root, "dalaresnet50", dedupe=False)
        fallback_logs = api_logs(env["PREFECT_API_URL"], "prefect.flow_runs", "DALA_INCOMING")
        prefect({**env, "DALA_INCOMING": incoming}, "deploy", "--name", "nightly")
        parameters = api_get(env["PREFECT_API_URL"], "deployments/name/batch-inference/nightly")[
            "parameters"
        ]
        prefect(env, "deployment", "run", "batch-inference/nightly", *watch, timeout=450)
        first = read_image_predictions(out, "dalaresnet50", dedupe=False)
        cases = read_case_predictions(out, "dalaresnet50")
        prefect(env, "deployment", "run", "batch-inference/nightly", *watch, timeout=450)
        second = read_image_predictions(out, "dalaresnet50", dedupe=False)
        after = read_predictions(root, "dalaresnet50", dedupe=False)
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
    # Unset at deploy time, the parameter is an empty string, read as "no drop".
    assert unset_parameters["source"] == ""
    assert any("DALA_INCOMING unset" in m for m in fallback_logs), fallback_logs
    expected = manifest[manifest["magnification"].isin(MAGS)]
    assert len(rescored) == len(expected)
    assert set(rescored["image_id"]) == set(expected["image_id"])
    assert ((rescored["prob_malignant"] >= 0.5).astype(int) == rescored["pred_label"]).all()
    # With DALA_INCOMING: one row per drop image under ROOT/scoring, none added by the rerun.
    assert parameters["source"] == incoming and parameters["root"] == root
    assert len(first) == len(drop) and first["sha256"].is_unique
    assert sorted(u.split("/incoming/", 1)[1] for u in first["uri"]) == drop
    assert set(first["magnification"]) == set(MAGS) and first["flow_run_id"].nunique() == 1
    assert (
        (first["prob_malignant"] >= first["threshold"]).astype(int) == first["pred_label"]
    ).all()
    assert len(second) == len(first) and not second.duplicated(["sha256", "model_version"]).any()
    per_magnification = cases[cases["magnification"].notna()]
    assert len(per_magnification) == 3 * len(MAGS) and (per_magnification["n_images"] == 2).all()
    assert cases["magnification"].isna().sum() == 3  # one row per case across its magnifications
    assert len(after) == len(rescored)  # scoring a drop adds nothing to the root's predictions
