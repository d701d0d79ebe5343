"""Secrets never leak and outputs stay under the root: real CLI processes against the moto server.

A unique secret is planted in ``AWS_SECRET_ACCESS_KEY`` (moto accepts any), the pipeline runs
through the ``dala`` CLI (ingest, split, train) plus one run that fails against a store answering
500, and everything the runs printed or wrote is searched for it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import boto3
import pytest
from pydantic import ValidationError

from dala_model import storage
from dala_model.engine.config import TrainConfig
from tests.reliability.faulty_proxy import FaultyProxy, always


def _dala(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dala_model.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.slow
def test_planted_secret_never_reaches_output_or_any_written_file(
    s3_bucket, s3_endpoint, dataset_files, tmp_path
):
    secret = f"planted-{uuid.uuid4().hex}"
    key_id = f"AKIAPLANTED{uuid.uuid4().hex[:8].upper()}"
    env = {
        **os.environ,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_ENDPOINT_URL": s3_endpoint,
        "DALA_CACHE_DIR": str(tmp_path / "shards"),
        "AWS_MAX_ATTEMPTS": "2",
    }
    for relpath, data in dataset_files.items():
        storage.write_bytes_atomic(str(tmp_path / "source" / relpath), data)
    root = f"{s3_bucket}/root"
    runs = [
        _dala(["ingest", str(tmp_path / "source"), "--out", root, "--cache-size", "32"], env),
        _dala(["split", root, "--scheme", "patient"], env),
        _dala(
            [
                "train",
                root,
                "--magnification",
                "40",
                "--epochs",
                "1",
                "--image-size",
                "32",
                "--batch-size",
                "8",
                "--device",
                "cpu",
            ],
            env,
        ),
    ]
    assert [r.returncode for r in runs] == [0, 0, 0], [r.stderr[-2000:] for r in runs]
    with FaultyProxy(s3_endpoint, always("500")) as proxy:  # an induced error, with a traceback
        failed = _dala(
            ["ingest", str(tmp_path / "source"), "--out", f"{s3_bucket}/other"],
            {**env, "AWS_ENDPOINT_URL": proxy.url},
        )
    assert failed.returncode != 0 and "StorageError" in failed.stderr
    assert "HTTP 500" in failed.stderr

    printed = "".join(r.stdout + r.stderr for r in [*runs, failed])
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = s3_bucket.removeprefix("s3://")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    written = {key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}
    written.update(
        {str(p): p.read_bytes() for p in (tmp_path / "shards").rglob("*") if p.is_file()}
    )
    assert any(k.startswith("root/runs/") for k in written), "the training run wrote nothing"
    for needle in (secret, key_id):
        assert needle not in printed
        leaked = [name for name, data in written.items() if needle.encode() in data]
        assert leaked == [], f"{needle} found in {leaked}"
    # Outputs only under the root (the bucket holds nothing else; the probe left nothing behind).
    assert sorted({k.split("/")[0] for k in keys}) == ["root"]
    assert not [k for k in keys if ".write-probe-" in k]


@pytest.mark.parametrize(
    "key", ["../escape.parquet", "a/../../b", "/etc/passwd", "s3://other/x", "a\\..\\b", "./a", ""]
)
def test_keys_that_could_escape_the_root_are_refused(key, tmp_path):
    with pytest.raises(ValueError, match="unsafe storage key"):
        storage.join(str(tmp_path), "runs", key) if key else storage.check_relative_key(key)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("run_id", ["../other-run", "a/b", "/abs", ".hidden"])
def test_run_ids_that_could_escape_the_runs_folder_are_refused(run_id, tmp_path):
    with pytest.raises(ValidationError, match="run_id"):
        TrainConfig(root=str(tmp_path), magnification=40, run_id=run_id)


def test_redact_removes_url_credentials_and_environment_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-123")
    text = storage.redact("https://user:pa55@host/x failed with s3cr3t-value-123")
    assert text == "https://***@host/x failed with ***"
