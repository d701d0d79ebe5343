"""Object-store faults injected with real processes: a dead endpoint, and a proxy in front of the
moto server answering 500/503 or dropping and resetting connections.

Outcomes checked: transient faults are retried (bounded, with backoff) and the run succeeds, or
it fails with ``StorageError`` naming the URL; nothing partial is ever visible; a rerun produces
exactly the manifest an uninterrupted run does (ingest timestamps aside).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest
import s3fs

from dala_model import storage
from dala_model.data.ingest import ingest
from dala_model.data.manifest import duplicates_uri, quarantine_uri, read_manifest
from tests.reliability.conftest import direct_s3, upload
from tests.reliability.faulty_proxy import after, always, every


def _outputs(root: str) -> dict[str, pd.DataFrame]:
    """What an ingest commits, minus the per-run timestamp: the comparison for 'same output'."""
    manifest = read_manifest(root).drop(columns="ingested_at")
    return {
        "manifest": manifest.sort_values("relpath", ignore_index=True),
        "quarantine": storage.read_parquet(quarantine_uri(root)),
        "duplicates": storage.read_parquet(duplicates_uri(root)),
    }


def _assert_same(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame]) -> None:
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_like=False)


def _keys(url: str) -> list[str]:
    try:
        return [f.relpath for f in storage.list_file_infos(url)]
    except FileNotFoundError:
        return []


@pytest.fixture
def s3_source(s3_bucket, dataset_files) -> str:
    source = f"{s3_bucket}/source"
    upload(source, dataset_files)
    return source


@pytest.fixture
def reference(s3_source, tmp_path_factory) -> dict[str, pd.DataFrame]:
    """The output of an uninterrupted ingest of the same source (no faults)."""
    root = f"{s3_source.rsplit('/', 1)[0]}/reference"
    ingest(s3_source, root, workers=2, cache_size=16)
    return _outputs(root)


def test_store_unavailable_at_start_fails_cleanly_and_writes_nothing(
    s3_source, faulty_s3, monkeypatch, s3_endpoint
):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # the failure path, not the backoff, is under test
    root = f"{s3_source.rsplit('/', 1)[0]}/root"
    proxy = faulty_s3(always("503"))
    started = time.perf_counter()
    with pytest.raises(storage.StorageError) as error:
        ingest(s3_source, root, workers=2, cache_size=16)
    seconds = time.perf_counter() - started
    message = str(error.value)
    assert message.startswith(f"cannot list {s3_source}: HTTP 503"), message
    assert proxy.faults["503"] >= 2, "the request was not retried"
    assert seconds < 30
    direct_s3(monkeypatch, s3_endpoint)
    assert _keys(root) == []


def test_endpoint_not_listening_fails_cleanly(s3_bucket, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(storage.StorageError, match=r"cannot list s3://.*Could not connect"):
        ingest(f"{s3_bucket}/source", str(tmp_path / "root"))
    assert not (tmp_path / "root").exists()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.slow
@pytest.mark.parametrize("kinds", [("500", "503"), ("drop", "reset")])
def test_transient_faults_mid_ingest_are_retried_to_the_same_output(
    s3_source, reference, faulty_s3, kinds
):
    root = f"{s3_source.rsplit('/', 1)[0]}/root"
    proxy = faulty_s3(every(5, kinds))  # one request in five fails, all through the run
    result = ingest(s3_source, root, workers=2, cache_size=16)
    assert sum(proxy.faults.values()) >= 10, proxy.faults
    assert set(proxy.faults) == set(kinds)
    assert result.images == len(reference["manifest"])
    _assert_same(_outputs(root), reference)


@pytest.mark.slow
def test_store_dying_mid_ingest_fails_cleanly_and_a_rerun_completes(
    s3_source, reference, faulty_s3, monkeypatch, s3_endpoint
):
    root = f"{s3_source.rsplit('/', 1)[0]}/root"
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    proxy = faulty_s3(after(60, "503"))  # probe + listing + some reads succeed, then nothing does
    with pytest.raises(storage.StorageError, match=r"cannot read s3://.*source/.*\.png.*503"):
        ingest(s3_source, root, workers=2, cache_size=16)
    assert proxy.faults["503"] > 0
    direct_s3(monkeypatch, s3_endpoint)
    assert not storage.exists(f"{root}/manifests/manifest.parquet"), "a partial manifest is visible"
    ingest(s3_source, root, workers=2, cache_size=16)
    _assert_same(_outputs(root), reference)


def test_store_dying_during_a_reingest_keeps_the_previous_manifest(
    s3_source, reference, faulty_s3, monkeypatch, s3_endpoint, dataset_files
):
    root = f"{s3_source.rsplit('/', 1)[0]}/root"
    ingest(s3_source, root, workers=2, cache_size=16)
    before = storage.read_bytes(f"{root}/manifests/manifest.parquet")
    # A changed file forces reads on the rerun; the store then fails on every write.
    relpath = next(iter(dataset_files))
    storage.write_bytes_atomic(f"{s3_source}/{relpath}", dataset_files[relpath][:-40] + b"\0" * 40)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    faulty_s3(lambda number, method, path: "500" if method == "PUT" and "/root/" in path else None)
    with pytest.raises(storage.StorageError):
        ingest(s3_source, root, workers=2, cache_size=16)
    direct_s3(monkeypatch, s3_endpoint)
    assert storage.read_bytes(f"{root}/manifests/manifest.parquet") == before
    _assert_same(_outputs(root), reference)


_WRITE_UNDER_FSIZE_LIMIT = textwrap.dedent(
    """
    import resource, signal, sys
    import pandas as pd
    from dala_model import storage
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit: EFBIG, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    frame = pd.DataFrame({"image_id": [f"{i:016x}" for i in range(20000)]})
    try:
        storage.write_parquet_atomic(frame, sys.argv[1])
    except storage.StorageError as exc:
        print("StorageError:", exc)
        sys.exit(3)
    """
)


def test_parquet_write_failing_in_the_kernel_keeps_the_previous_file(tmp_path):
    """A real write failure: the file-size limit (RLIMIT_FSIZE) makes write(2) fail with EFBIG."""
    url = str(tmp_path / "manifests" / "manifest.parquet")
    good = pd.DataFrame({"image_id": ["a", "b"]})
    storage.write_parquet_atomic(good, url)
    done = subprocess.run(
        [sys.executable, "-c", _WRITE_UNDER_FSIZE_LIMIT, url],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.getcwd(),
    )
    assert done.returncode == 3, done.stderr
    assert "File too large" in done.stdout and url in done.stdout
    pd.testing.assert_frame_equal(storage.read_parquet(url), good)
    assert sorted(os.listdir(tmp_path / "manifests")) == ["manifest.parquet"]  # no temp file left
    assert resource.getrlimit(resource.RLIMIT_FSIZE)  # the limit only applied to the child


def test_parquet_put_failing_on_s3_keeps_the_previous_object(
    s3_bucket, faulty_s3, monkeypatch, s3_endpoint
):
    url = f"{s3_bucket}/manifests/manifest.parquet"
    good = pd.DataFrame({"image_id": ["a", "b"]})
    storage.write_parquet_atomic(good, url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    faulty_s3(lambda number, method, path: "drop" if method == "PUT" else None)
    with pytest.raises(storage.StorageError, match="cannot write s3://.*manifest.parquet"):
        storage.write_parquet_atomic(pd.DataFrame({"image_id": ["c"] * 1000}), url)
    direct_s3(monkeypatch, s3_endpoint)
    pd.testing.assert_frame_equal(storage.read_parquet(url), good)
