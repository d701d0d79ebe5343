"""Shared fixtures: a real S3 endpoint (moto's standalone server on 127.0.0.1), storage roots and
a temporary Prefect API.

Tests that take ``storage_root`` run once against a local folder and once against the S3
endpoint through s3fs, so every storage path is exercised on both backends.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SHARED_SAMPLE_PARTS = ("shared", "breakhis-sample", "histology_slides")
MAX_WORKERS = 4  # pytest-xdist workers at most: each holds torch and a training's memory


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: plain `pytest` runs without xdist
def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (``make test``): one worker per core, at most :data:`MAX_WORKERS`.

    On two cores the suite spends about 40% of its time waiting (servers starting, processes
    polled, flows handing off), so a second worker fills that time; beyond four, memory, not
    cores, is the limit."""
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


def pytest_configure(config) -> None:
    """Under pytest-xdist, split the cores between the workers and give each worker its own
    device-slot locks (``flows._slots``), so two workers' flows never queue on each other's
    slots (a test that asserts two trainings overlap would otherwise wait for another test)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # processes the tests start inherit it
    os.environ["DALA_SLOT_DIR"] = tempfile.mkdtemp(prefix=f"dala-slots-{worker}-")

    import torch

    torch.set_num_threads(threads)


def pytest_unconfigure(config) -> None:
    """Remove the worker's slot-lock folder (its locks died with the flows that held them)."""
    slots = os.environ.get("DALA_SLOT_DIR", "")
    if os.environ.get("PYTEST_XDIST_WORKER") and os.path.basename(slots).startswith("dala-slots-"):
        shutil.rmtree(slots, ignore_errors=True)


# Disk: a training run's folder holds a float checkpoint and a resumable one with its optimizer
# state, about 400 MB at DALAResNet50's full width, and the suite makes dozens. Kept to the end of
# the session, as pytest keeps `tmp_path_factory` folders, one suite run wrote 11-19 GB, and CI
# ran out of disk 22 minutes in (stop 24: "No space left on device"). A passed test's `tmp_path`
# goes when it ends (`tmp_path_retention_policy = "failed"` in pyproject.toml); a module's shared
# folders go with the module (`module_tmp`). Whatever a failure touched stays, to read.
_FAILED_MODULES: set[Path] = set()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        _FAILED_MODULES.add(item.path)
    return report


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory) -> Iterator[Callable[[str], Path]]:
    """``tmp_path_factory.mktemp`` for a module's shared fixtures: each folder it made is removed
    when the module ends with no test, setup or teardown failed (else kept, to read)."""
    made: list[Path] = []

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    if request.path not in _FAILED_MODULES:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """Start moto's standalone S3 server once per session and point the AWS env at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    mp = pytest.MonkeyPatch()
    for key, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        mp.setenv(key, value)
    mp.delenv("AWS_PROFILE", raising=False)
    yield endpoint
    mp.undo()
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh, empty bucket; returns its ``s3://`` URL."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    _clear_s3fs_cache()
    return f"s3://{name}"


def _clear_s3fs_cache() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(params=["local", "s3"])
def storage_root(request, tmp_path) -> str:
    """A writable storage root URL: a local folder, then an S3 bucket prefix."""
    if request.param == "local":
        return str(tmp_path / "root")
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/root"


@pytest.fixture(scope="module")
def prefect_api():
    """A temporary Prefect API on its own SQLite database for one test module.

    Every start creates and migrates a fresh database, which can take longer than Prefect's
    default wait on a slow machine; it waits as long as ``make run`` does (flows/_common.py)."""
    from prefect.testing.utilities import prefect_test_harness

    from flows._common import api_startup_timeout

    with prefect_test_harness(server_startup_timeout=api_startup_timeout()):
        yield


@pytest.fixture(scope="session")
def breakhis_sample():
    """The real BreakHis sample in ../shared, or a skip that says why."""
    from pathlib import Path

    here = Path(__file__).resolve().parents[1]
    for base in (here.parent, here):
        candidate = base.joinpath(*SHARED_SAMPLE_PARTS)
        if candidate.is_dir():
            return candidate
    pytest.skip("real BreakHis sample not found at ../shared/breakhis-sample/histology_slides")


# The longest modules by the suite's own --durations (2 cores, 2026-12-02; each well over a minute),
# beside every module with a `slow` test. `make test` hands whole modules to workers in collection
# order (--dist loadfile --no-loadscope-reorder), so putting these first keeps one long module from
# starting last and running alone while the other worker idles.
LONG_MODULES = (
    "test_e2e_deployment.py",
    "reliability/test_flow_faults.py",
    "test_flows.py",
    "test_train.py",
    "test_distributed.py",
    "test_dask_scoring.py",
    "test_dask_flows.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    """:data:`LONG_MODULES` first, in that order, then the other modules with a `slow` test, then
    the rest; the order within a module is unchanged (the sort is stable)."""
    rank: dict = {}
    for item in items:
        path = item.path.as_posix()
        named = [i for i, name in enumerate(LONG_MODULES) if path.endswith("/tests/" + name)]
        slow = (
            len(LONG_MODULES)
            if item.get_closest_marker("slow") is not None
            else len(LONG_MODULES) + 1
        )
        rank[item.path] = min(rank.get(item.path, slow), named[0] if named else slow)
    items.sort(key=lambda item: rank[item.path])
