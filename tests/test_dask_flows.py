"""`ingest-breakhis` with ``dask_address`` on a real Dask cluster, under a real Prefect API.

The cluster is a ``distributed.LocalCluster`` of 2 worker processes (one thread each); the flow
reaches it only through its scheduler address, as it would reach ``tcp://dask-scheduler:8786``.
The source is real synthetic PNGs plus a truncated file, a byte-identical copy and a README, and
the Dask path's manifest, quarantine, duplicates and cache are compared with the default path's
on the same source. A lost worker is a real SIGKILL of a worker process, at a fixed point of a
partition's work (its ingest has committed, its result has not been returned), chosen by a log
record rather than a timer, so the test is deterministic.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import dask
import distributed
import numpy as np
import pandas as pd
import pytest

from dala_model import storage
from dala_model.data import cache, synth
from dala_model.data.ingest_distributed import ingest_partitions
from dala_model.data.manifest import duplicates_uri, quarantine_uri, read_manifest
from flows.ingest import ingest_flow
from flows.train import train_flow
from tests._dask_support import one_worker_killed_at_log, task_runs

SIZE = 32
# What the two paths may differ in: timing, and how many files each run itself read or reused.
RUN_FIELDS = {"seconds", "images_per_s", "read", "reused", "cached", "root"}


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def messy_source(module_tmp) -> str:
    """2 slides x 4 magnifications x 2 PNGs, a truncated PNG, a copy in another folder, a README."""
    source = module_tmp("dask") / "source"
    synth.generate(str(source), patients=2, images_per_patient=2, seed=5, size=(96, 64))
    pngs = sorted(source.rglob("*.png"))
    first, other = pngs[0], pngs[-1]

    def renamed(path: Path, seq: int) -> Path:
        return path.with_name(f"{path.stem.rsplit('-', 1)[0]}-{seq}.png")

    renamed(first, 901).write_bytes(first.read_bytes()[:200])  # truncated
    renamed(other, 902).write_bytes(first.read_bytes())  # a duplicate, in another partition
    (source / "README.txt").write_text("not an image")
    return str(source)


@pytest.fixture(scope="module")
def default_ingest(prefect_api, messy_source, module_tmp) -> tuple[str, dict]:
    root = str(module_tmp("default") / "root")
    state = ingest_flow(source=messy_source, root=root, cache_size=SIZE, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert (result["quarantined"], result["duplicates"], result["ignored"]) == (1, 1, 1)
    return root, result


def assert_same_ingest(root: str, result: dict, default_root: str, default: dict) -> None:
    """The same manifest (every column but ``ingested_at``), lists, cache pixels and counts."""
    got, want = read_manifest(root), read_manifest(default_root)
    assert got.columns.tolist() == want.columns.tolist()
    pd.testing.assert_frame_equal(got.drop(columns="ingested_at"), want.drop(columns="ingested_at"))
    assert got["image_id"].is_unique and got["uri"].is_unique and got["sha256"].is_unique
    for uri in (quarantine_uri, duplicates_uri):
        pd.testing.assert_frame_equal(
            storage.read_parquet(uri(root)), storage.read_parquet(uri(default_root))
        )
    assert storage.read_parquet(quarantine_uri(root))["reason"].tolist() == ["truncated"]
    assert {k: v for k, v in result.items() if k not in RUN_FIELDS} == {
        k: v for k, v in default.items() if k not in RUN_FIELDS
    }
    ids = want["image_id"].tolist()
    assert np.array_equal(
        cache.load_images(root, ids, SIZE), cache.load_images(default_root, ids, SIZE)
    )
    assert not Path(root, "staging").exists() or not any(Path(root, "staging").iterdir())


def test_dask_path_gives_the_default_manifest(cluster, messy_source, default_ingest, tmp_path):
    default_root, default = default_ingest
    root = str(tmp_path / "root")
    partitions = ingest_partitions(messy_source)
    with distributed.Client(cluster, set_as_default=False) as client:
        before = client.run(lambda dask_worker: dask_worker.state.executed_count)

        state = ingest_flow(
            source=messy_source,
            root=root,
            cache_size=SIZE,
            dask_address=cluster.scheduler_address,
            return_state=True,
        )

        after = client.run(lambda dask_worker: dask_worker.state.executed_count)
    assert state.is_completed(), state.message
    assert_same_ingest(root, state.result(), default_root, default)
    # One Prefect task run per partition, and the cluster's worker processes ran them all.
    assert len(partitions) == 8
    runs = task_runs(state, "stage-partition-", len(partitions))
    assert sorted(run.name for run in runs) == sorted(
        f"stage-partition-{k}" for k in range(len(partitions))
    )
    assert all(run.state.is_completed() for run in runs)
    assert sum(after.values()) - sum(before.values()) == len(partitions)


def test_unreachable_cluster_is_a_clear_error_before_any_work(prefect_api, messy_source, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens once closed
    root = tmp_path / "root"
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        ingest = ingest_flow(
            source=messy_source, root=str(root), dask_address=address, return_state=True
        )
        train = train_flow(
            root=str(tmp_path / "train-root"),
            source=messy_source,
            dask_address=address,
            magnifications=[40],
            epochs=1,
            batch_size=8,
            image_size=SIZE,
            return_state=True,
        )
    for state in (ingest, train):
        assert state.is_failed()
        assert f"dask_address={address}: no Dask scheduler answered" in state.message, state.message
    assert not (root / "manifests").exists() and not any((root / "staging").glob("*"))
    assert not (tmp_path / "train-root" / "runs").exists()


def test_a_failed_partition_fails_the_run_naming_it_after_the_others_finish(
    prefect_api, cluster, messy_source, tmp_path
):
    from dala_model.data import ingest_distributed as lib
    from flows._dask import run_on_dask
    from flows.ingest import stage_task

    source = tmp_path / "source"
    shutil.copytree(messy_source, source)
    plan = lib.plan_ingest(str(source), str(tmp_path / "root"), cache_size=SIZE)
    gone = 3
    shutil.rmtree(source / plan.folders[gone])  # vanished between plan and stage: a real failure
    try:
        with pytest.raises(RuntimeError) as failed:
            run_on_dask(
                cluster.scheduler_address,
                stage_task.with_options(retries=0),
                [{"plan": plan, "index": k} for k in range(len(plan))],
                what="ingest partitions",
            )
        attempts = sorted(p.name for p in Path(plan.staging, "parts").iterdir())
    finally:
        lib.discard_staging(plan)
    message = str(failed.value)
    assert message.startswith(
        f"1 of {len(plan)} ingest partitions failed on the Dask cluster at "
        f"{cluster.scheduler_address}: stage-partition #{gone} ("
    )
    assert f"{plan.folders[gone]} does not exist" in message
    # Every other partition ran to the end before the error; the failed one wrote nothing.
    assert attempts == sorted(str(k) for k in range(len(plan)) if k != gone)


def test_a_worker_lost_mid_run_loses_and_duplicates_nothing(
    cluster, messy_source, default_ingest, tmp_path
):
    default_root, default = default_ingest
    root, marker = str(tmp_path / "root"), tmp_path / "killed-pid"
    with one_worker_killed_at_log(cluster, marker, "dala_model.data.ingest", "ingest done"):
        state = ingest_flow(
            source=messy_source,
            root=root,
            cache_size=SIZE,
            dask_address=cluster.scheduler_address,
            return_state=True,
        )
    assert state.is_completed(), state.message
    assert_same_ingest(root, state.result(), default_root, default)
    partitions = len(ingest_partitions(messy_source))
    runs = task_runs(state, "stage-partition-", partitions)
    assert len(runs) == partitions == len({run.name for run in runs})
    assert all(run.state.is_completed() for run in runs)


def test_partition_attempts_never_share_a_folder(messy_source, default_ingest, tmp_path):
    """The library steps alone: a partition staged twice (as after a lost worker) gets two
    folders with the same rows; the commit reads only the attempt it is given, and refuses an
    attempt of another partition."""
    from dataclasses import asdict

    from dala_model.data import ingest_distributed as lib

    root = str(tmp_path / "root")
    plan = lib.plan_ingest(messy_source, root, cache_size=SIZE)
    try:
        first, again = lib.stage_partition(plan, 0), lib.stage_partition(plan, 0)
        assert first != again
        pd.testing.assert_frame_equal(
            read_manifest(first).drop(columns="ingested_at"),
            read_manifest(again).drop(columns="ingested_at"),
        )
        staged = [again] + [lib.stage_partition(plan, k) for k in range(1, len(plan))]
        with pytest.raises(ValueError, match=r"staged\[1\]"):
            lib.commit_ingest(plan, [staged[0], staged[0], *staged[2:]])
        result = lib.commit_ingest(plan, staged)
    finally:
        lib.discard_staging(plan)
    assert not Path(plan.staging).exists() and result.root == root
    assert_same_ingest(root, asdict(result), *default_ingest)
