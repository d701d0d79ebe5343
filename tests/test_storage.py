"""Storage on both backends: listing, atomic writes, Parquet metadata, safety of keys and URLs."""

from __future__ import annotations

import os

import pandas as pd
import pyarrow as pa
import pytest

from dala_model import storage


def test_write_read_list_and_exists(storage_root):
    files = {"a/b/x.png": b"one", "a/y.PNG": b"two", "a/readme.txt": b"three", "z.png": b""}
    for key, data in files.items():
        storage.write_bytes_atomic(storage.join(storage_root, key), data)
    for key, data in files.items():
        assert storage.read_bytes(storage.join(storage_root, key)) == data
    listed = storage.list_file_infos(storage_root, (".png",))
    assert [f.relpath for f in listed] == ["a/b/x.png", "a/y.PNG", "z.png"]
    assert [f.size for f in listed] == [3, 3, 0]
    assert all(f.version for f in listed)
    assert storage.list_files(storage_root) == [
        storage.join(storage_root, k) for k in sorted(files)
    ]
    assert storage.exists(storage.join(storage_root, "a/y.PNG"))
    assert not storage.exists(storage.join(storage_root, "a/missing.png"))


def test_overwrite_is_atomic_and_leaves_no_temporary_files(storage_root):
    url = storage.join(storage_root, "m/manifest.parquet")
    storage.write_bytes_atomic(url, b"old")
    storage.write_bytes_atomic(url, b"new content")
    assert storage.read_bytes(url) == b"new content"
    assert storage.list_files(storage.join(storage_root, "m")) == [url]


def test_parquet_round_trip_keeps_schema_and_metadata(storage_root):
    schema = pa.schema([pa.field("image_id", pa.string()), pa.field("n", pa.int16())])
    url = storage.join(storage_root, "t.parquet")
    storage.write_parquet_atomic(
        pd.DataFrame({"image_id": ["a", "b"], "n": [1, 2]}),
        url,
        schema=schema,
        metadata={"dala.seed": "7"},
    )
    frame = storage.read_parquet(url)
    assert frame["n"].dtype == "int16"
    assert frame["image_id"].tolist() == ["a", "b"]
    assert frame.attrs == {"dala.seed": "7"}


def test_local_copy_yields_a_readable_local_file(storage_root):
    url = storage.join(storage_root, "c/blob.bin")
    storage.write_bytes_atomic(url, b"payload")
    with storage.local_copy(url) as path:
        assert os.path.isfile(path)
        with open(path, "rb") as handle:
            assert handle.read() == b"payload"


def test_missing_source_is_a_clear_error(storage_root):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.list_file_infos(storage.join(storage_root, "nowhere"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.read_bytes(storage.join(storage_root, "nowhere.png"))


def test_missing_bucket_is_a_clear_error(s3_endpoint):
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket-here/x does not exist"):
        storage.list_files("s3://no-such-bucket-here/x")


@pytest.mark.parametrize(
    "key", ["../x", "a/../../x", "/etc/passwd", "a/./b", "s3://b/k", "a\\b", ""]
)
def test_unsafe_keys_are_refused(key):
    with pytest.raises(ValueError, match="unsafe storage key"):
        storage.check_relative_key(key)
    if key:
        with pytest.raises(ValueError):
            storage.join("s3://bucket/root", key)


def test_keys_with_spaces_and_non_ascii_are_fine(storage_root):
    url = storage.join(storage_root, "données patients/é 1.png")
    storage.write_bytes_atomic(url, b"x")
    assert storage.list_files(storage_root) == [url]


def test_redact_strips_url_credentials_and_env_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "planted-secret-value")
    text = storage.redact("s3://AKIA:pass@bucket/k failed with planted-secret-value")
    assert "pass" not in text and "planted-secret-value" not in text and "AKIA" not in text
    assert text.startswith("s3://***@bucket/k")
    with pytest.raises(ValueError) as info:
        storage.filesystem("nosuchproto://user:planted-secret-value@host/x")
    assert "planted-secret-value" not in str(info.value)
