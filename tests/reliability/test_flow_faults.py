"""Faults around the flows, with real processes: a worker SIGKILLed mid flow run, the object store
failing mid batch inference, two batch-inference processes racing, and registry/prediction-merge
reads at 1,000,000 rows.

Why real processes: the guarantees under test (atomic writes, content-keyed prediction parts,
run folders that resume) only matter when a process dies or races for real; an in-process mock
would hide exactly the interleavings that break them. docs/RELIABILITY.md records the outcomes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from urllib.parse import unquote

import fsspec
import pandas as pd
import pytest
import torch

from dala_model import storage
from dala_model.data import synth
from dala_model.data.ingest import ingest
from dala_model.data.splits import make_split
from dala_model.engine.config import TrainConfig
from dala_model.engine.train import train
from dala_model.models.checkpoint import load_model
from dala_model.serving import predictions, promotion
from tests.reliability.faulty_proxy import Schedule

MODEL = "dalaresnet50"
RUN_40X = f"{MODEL}-40x-patient-seed0"
REPO = Path(__file__).resolve().parents[2]


def _env(tmp: Path) -> dict[str, str]:
    """Child environment: the repo importable, a private Prefect home and device-slot folder, so a
    CI run beside this one never shares a Prefect database or waits for this test's CPU slot."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO),
        PREFECT_HOME=str(tmp / "prefect-home"),
        DALA_SLOT_DIR=str(tmp / "slots"),
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    return env


@pytest.fixture(scope="module")
def trained_root(module_tmp) -> str:
    """A local root: 8 patients x 3 images per magnification, 32 px cache, one promoted 40X run
    and the predictions of an uninterrupted batch inference (the reference)."""
    base = module_tmp("flow-faults")
    source, root = str(base / "source"), str(base / "root")
    synth.generate(source, patients=8, images_per_patient=3, seed=7, size=(128, 96))
    ingest(source, root, cache_size=32)
    make_split(root, "patient", seed=0)
    train(
        TrainConfig(
            root=root, magnification=40, epochs=1, batch_size=8, image_size=32, device="cpu"
        )
    )
    promotion.promote(root, storage.join(root, "runs", RUN_40X))
    # The reference: an uninterrupted batch inference on the local root, 4 images per part.
    predictions.score_magnification(
        root, MODEL, 40, flow_run_id="clean", chunk_size=4, device="cpu"
    )
    return root


def serve(trained_root: str, root: str) -> str:
    """Copy what inference needs (manifest, cache, the run's summary and best model) to ``root``
    on any backend and promote the run there. The 300 MB training checkpoint stays behind."""
    local = fsspec.filesystem("file")
    for name in ("manifests", "cache", f"runs/{RUN_40X}/best"):
        for file in local.find(f"{trained_root}/{name}"):
            storage.write_bytes_atomic(
                storage.join(root, file[len(trained_root) + 1 :]), local.cat_file(file)
            )
    for name in ("config.json", "run.json"):
        rel = f"runs/{RUN_40X}/{name}"
        storage.write_bytes_atomic(storage.join(root, rel), local.cat_file(f"{trained_root}/{rel}"))
    promotion.promote(root, storage.join(root, "runs", RUN_40X))
    return root


def parts(root: str) -> dict[str, pd.DataFrame]:
    """Every prediction part file under ``root``, by file name: the raw rows, before any dedupe."""
    try:
        uris = storage.list_files(predictions.predictions_uri(root, MODEL), suffixes=(".parquet",))
    except FileNotFoundError:
        return {}
    return {u.rsplit("/", 1)[1]: storage.read_parquet(u) for u in uris}


def scores(table: pd.DataFrame) -> pd.DataFrame:
    """The part of a prediction table that must not depend on which run wrote it."""
    return table[["image_id", "prob_malignant", "pred_label", "model_version"]].sort_values(
        "image_id", ignore_index=True
    )


# 1. Worker killed in the middle of a flow run -----------------------------------------------

_TRAIN_FLOW = textwrap.dedent(
    """
    import json, sys
    from prefect.testing.utilities import prefect_test_harness
    from flows.train import train_flow
    with prefect_test_harness(server_startup_timeout=120):
        state = train_flow(root=sys.argv[1], magnifications=[40, 100], epochs=int(sys.argv[2]),
                           batch_size=8, image_size=32, max_parallel=1, return_state=True)
        print(json.dumps({"completed": state.is_completed(),
                          "status": {o.magnification: o.status for o in state.result()}}))
    """
)


def _run_dir(root: Path, mag: int) -> Path:
    return root / "runs" / f"{MODEL}-{mag}x-patient-seed0"


@pytest.mark.slow
def test_flow_worker_killed_mid_run_then_rerun_finishes_only_what_was_missing(tmp_path):
    """SIGKILL the whole flow-run process group (flow, Prefect server, training pool) once 40X has
    finished and 100X has checkpointed at least one epoch but not finished; rerun the flow."""
    source, root = tmp_path / "source", tmp_path / "root"
    synth.generate(str(source), patients=8, images_per_patient=3, seed=9, size=(128, 96))
    ingest(str(source), str(root), cache_size=32)
    epochs = 3
    args = [sys.executable, "-c", _TRAIN_FLOW, str(root), str(epochs)]
    child = subprocess.Popen(
        args,
        env=_env(tmp_path),
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    done40, run100 = _run_dir(root, 40) / "run.json", _run_dir(root, 100)
    deadline = time.monotonic() + 240
    try:
        while not (done40.exists() and (run100 / "checkpoint.pt").exists()):
            assert child.poll() is None, (
                f"flow ended before the kill:\n{child.stdout.read()[-3000:]}"
            )
            assert time.monotonic() < deadline, "the flow never reached the kill point"
            time.sleep(0.05)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    assert not (run100 / "run.json").exists(), "100X finished before the kill: raise epochs"
    finished40 = json.loads(done40.read_text())["finished_at"]
    created100 = json.loads((run100 / "config.json").read_text())["created_at"]
    at_kill = torch.load(run100 / "checkpoint.pt", weights_only=True)["state"]
    killed_after = at_kill["epoch"]
    assert 0 <= killed_after < epochs
    assert promotion.list_current(str(root)) == []  # promotion comes after the fan-out: not reached

    rerun = subprocess.run(
        args, env=_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    outcome = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert outcome == {"completed": True, "status": {"40": "skipped", "100": "complete"}}
    assert json.loads(done40.read_text())["finished_at"] == finished40  # not retrained
    summary100 = json.loads((run100 / "run.json").read_text())
    assert summary100["status"] == "complete"
    assert json.loads((run100 / "config.json").read_text())["created_at"] == created100

    # Resumed, not restarted: the epochs checkpointed before the kill are the very same records
    # (their measured seconds included), and every epoch appears exactly once.
    history = pd.read_parquet(run100 / "history.parquet")
    assert history["epoch"].tolist() == list(range(epochs))
    before = pd.DataFrame(at_kill["history"])
    pd.testing.assert_frame_equal(history.iloc[: len(before)].reset_index(drop=True), before)

    # No duplicate or corrupted outputs: one promotion per magnification, loadable best models,
    # and nothing but the run's own files (plus, at most, an orphan temp file of a write the kill
    # cut short, never under a real name).
    for mag in (40, 100):
        assert len(promotion.promotions(str(root), MODEL, mag)) == 1
        record = promotion.current(str(root), MODEL, mag)
        assert record["run_id"] == f"{MODEL}-{mag}x-patient-seed0"
        load_model(record["checkpoint_uri"])
        names = {p.name for p in _run_dir(root, mag).iterdir()}
        expected = {
            "config.json",
            "checkpoint.pt",
            "history.parquet",
            "best",
            "test_predictions.parquet",
            "run.json",
        }
        assert expected <= names and all(".tmp-" in n for n in names - expected), names
    leftovers = sorted(str(p.relative_to(root)) for p in root.rglob("*.tmp-*"))
    print(f"killed after 100X epoch {killed_after}; temp files left by the kill: {leftovers}")


# 2. Object store failing in the middle of batch inference ---------------------------------


def _window(kind: str, healed: threading.Event) -> Schedule:
    """Forward until the second prediction-part PUT, then fail every request until ``healed``."""
    puts = 0
    lock = threading.Lock()

    def schedule(number: int, method: str, path: str) -> str | None:
        nonlocal puts
        if healed.is_set():
            return None
        with lock:
            if method == "PUT" and "/predictions/model=" in unquote(path):
                puts += 1
            return kind if puts >= 2 else None

    return schedule


@pytest.mark.parametrize("kind", ["500", "503", "drop"])
def test_store_failing_mid_inference_fails_cleanly_and_a_rerun_equals_a_clean_run(
    kind, trained_root, s3_bucket, faulty_s3, monkeypatch
):
    clean = parts(trained_root)  # the uninterrupted run, in 4-image chunks
    assert sum(len(f) for f in clean.values()) == 24 and len(clean) == 6
    root = serve(trained_root, f"{s3_bucket}/root")

    # Two attempts per request: the bounded failure is under test here, not the backoff.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    healed = threading.Event()
    proxy = faulty_s3(_window(kind, healed))
    started = time.perf_counter()
    with pytest.raises(
        storage.StorageError, match=r"cannot write s3://.*/part-[0-9a-f]+\.parquet"
    ) as error:
        predictions.score_magnification(
            root, MODEL, 40, flow_run_id="faulty", chunk_size=4, device="cpu"
        )
    seconds = time.perf_counter() - started
    healed.set()
    assert proxy.faults[kind] >= 2, "the failing request was not retried"
    assert "testing-secret-key" not in str(error.value)
    assert seconds < 60, seconds

    # Nothing partial: only whole parts are visible, each identical to the clean run's part.
    visible = parts(root)
    assert list(visible) == [next(iter(sorted(visible)))] and set(visible) <= set(clean)
    for name, frame in visible.items():
        pd.testing.assert_frame_equal(scores(frame), scores(clean[name]))

    rerun = predictions.score_magnification(
        root, MODEL, 40, flow_run_id="rerun", chunk_size=4, device="cpu"
    )
    assert (rerun.scored, rerun.skipped) == (20, 4)
    assert set(parts(root)) == set(clean)
    got = predictions.read_predictions(root, MODEL, dedupe=False)
    assert not got.duplicated(["image_id", "model_version"]).any()
    want = scores(predictions.read_predictions(trained_root, MODEL, dedupe=False))
    pd.testing.assert_frame_equal(scores(got), want, check_exact=False, atol=1e-6)
    print(f"{kind}: {dict(proxy.faults)} injected, StorageError after {seconds:.1f} s")


# 3. Two batch-inference processes at once for the same model version ------------------------

_SCORE = textwrap.dedent(
    """
    import json, os, sys, time
    from dala_model.serving import predictions
    root, name, go = sys.argv[1:4]
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.005)
    r = predictions.score_magnification(root, "dalaresnet50", 40, flow_run_id=name, chunk_size=2,
                                        device="cpu")
    print(json.dumps({"scored": r.scored, "skipped": r.skipped, "metrics_n": (r.metrics or {}).get("n")}))
    """
)


@pytest.mark.slow
def test_two_inference_processes_at_once_write_no_duplicate_rows(trained_root, s3_bucket, tmp_path):
    """On S3, where an overwrite is a plain PUT (the local rename path is the same code, and
    ran the same way when tried: 24 raw rows, no duplicate)."""
    root = serve(trained_root, f"{s3_bucket}/root")
    go = tmp_path / "go"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _SCORE, root, name, str(go)],
            env=_env(tmp_path),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("left", "right")
    ]
    for child in children:  # both have imported torch and are waiting: start them together
        assert child.stdout.readline().strip() == "ready", child.stderr.read()[-3000:]
    go.touch()
    results = {}
    for name, child in zip(("left", "right"), children, strict=True):
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err[-3000:]
        results[name] = json.loads(out.strip().splitlines()[-1])

    raw = pd.concat(parts(root).values(), ignore_index=True)
    assert raw["image_id"].nunique() == 24  # every 40X image scored
    assert len(raw) == 24 and not raw.duplicated(["image_id", "model_version"]).any()
    table = predictions.read_predictions(root, MODEL, dedupe=False)
    assert len(table) == 24 and not table.duplicated(["image_id", "model_version"]).any()
    assert all(r["scored"] + r["skipped"] == 24 for r in results.values())
    overlap = results["left"]["scored"] + results["right"]["scored"] - 24
    print(f"s3: {results}; images scored by both processes: {overlap}; raw rows {len(raw)}")


# 4. Registry and prediction-merge reads on 1,000,000 prediction rows ------------------------

_MILLION = textwrap.dedent(
    """
    import json, resource, sys, time
    from datetime import UTC, datetime, timedelta
    import numpy as np, pandas as pd
    from dala_model import storage
    from dala_model.serving import predictions, promotion
    root, n, per_part = sys.argv[1], 1_000_000, 50_000
    rng = np.random.default_rng(0)
    versions = ["a" * 64, "b" * 64]
    ids = pd.Series(rng.permutation(n // 2).astype(np.int64)).map("{:016x}".format).to_numpy()
    for p in range(n // per_part):  # each version scores every id once, 4 magnifications
        version, chunk = versions[p % 2], ids[(p // 2) * per_part:(p // 2 + 1) * per_part]
        mag = (40, 100, 200, 400)[(p // 2) % 4]
        frame = pd.DataFrame({
            "image_id": chunk, "uri": "s3://b/src/" + chunk + ".png", "magnification": mag,
            "patient_id": "14-1", "prob_malignant": rng.random(per_part, dtype=np.float32),
            "pred_label": np.int8(1), "threshold": 0.5, "model_name": "dalaresnet50",
            "model_version": version, "flow_run_id": f"run-{p}",
            "scored_at": pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(seconds=p),
        })
        frame["pred_label"] = (frame["prob_malignant"] >= 0.5).astype(np.int8)
        uri = predictions.predictions_uri(root, "dalaresnet50", version, mag)
        storage.write_parquet_atomic(frame, f"{uri}/part-{p:04d}.parquet", schema=predictions.PREDICTION_SCHEMA)
    # A racing run that chunked differently: 10,000 rows scored twice, later.
    racer = frame.iloc[:10_000].assign(flow_run_id="racer", scored_at=frame["scored_at"] + pd.Timedelta(hours=1))
    storage.write_parquet_atomic(racer, f"{uri}/part-racer.parquet", schema=predictions.PREDICTION_SCHEMA)
    # 1,000 promotions of 40X in the registry log, the last one current.
    base = promotion.registry_uri(root, "dalaresnet50", 40)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(1000):
        now = start + timedelta(minutes=i)
        record = {"model": "dalaresnet50", "magnification": 40, "model_version": f"{i:064x}",
                  "promoted_at": now.isoformat(), "metrics": {"val": {"accuracy": i / 1000}}}
        payload = json.dumps(record).encode()
        storage.write_bytes_atomic(storage.join(base, "promotions", f"{now:%Y%m%dT%H%M%S%fZ}-{i:012x}.json"), payload)
    storage.write_bytes_atomic(storage.join(base, "current.json"), payload)
    times, out = {}, {}
    def timed(name, fn):
        started = time.perf_counter(); value = fn(); times[name] = round(time.perf_counter() - started, 2)
        return value
    raw = timed("read_predictions_raw", lambda: predictions.read_predictions(root, "dalaresnet50", dedupe=False))
    table = timed("read_predictions_dedupe", lambda: predictions.read_predictions(root, "dalaresnet50"))
    done = timed("scored_ids_one_part_set", lambda: predictions.scored_ids(root, "dalaresnet50", versions[1], mag))
    current = timed("registry_current", lambda: promotion.current(root, "dalaresnet50", 40))
    serving = timed("registry_list_current", lambda: promotion.list_current(root))
    log = timed("registry_promotions_1000", lambda: promotion.promotions(root, "dalaresnet50", 40))
    out.update(raw_rows=len(raw), rows=len(table), duplicates=int(table.duplicated(["image_id", "model_version"]).sum()),
               racer_rows_kept=int((table["flow_run_id"] == "racer").sum()), scored_ids=len(done),
               current=current["model_version"][-3:], serving=len(serving),
               promotions=len(log), promotions_ordered=[r["model_version"] for r in log] == sorted(r["model_version"] for r in log))
    print(json.dumps({"times_s": times, **out,
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
    """
)


@pytest.mark.slow
def test_registry_and_prediction_merge_on_a_million_rows(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", _MILLION, str(tmp_path / "root")],
        env=_env(tmp_path),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"1M prediction rows: {json.dumps(result)}")
    assert result["raw_rows"] == 1_010_000 and result["rows"] == 1_000_000
    assert result["duplicates"] == 0 and result["racer_rows_kept"] == 0  # the earliest row wins
    assert result["scored_ids"] == 150_000  # 3 parts of 50,000 (+ the racer's repeats)
    assert result["current"] == "3e7" and result["serving"] == 1  # 999 = 0x3e7, the last promoted
    assert result["promotions"] == 1000 and result["promotions_ordered"]
    assert sum(result["times_s"].values()) < 60, result
    assert result["peak_rss_mb"] < 4096, result
