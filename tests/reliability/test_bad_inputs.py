"""Every bad input the issue lists, through the real code on real files (local and S3).

Each bad file gets a quarantine row with the right reason (or is accepted, converted, as
documented in ``dala_model.data.ingest``), and every good file still lands in the manifest: for every
run, each listed image is in exactly one of manifest, quarantine or duplicates (zero rows lost).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from dala_model import storage
from dala_model.data.breakhis import IMAGE_SUFFIXES
from dala_model.data.ingest import ingest
from dala_model.data.manifest import duplicates_uri, quarantine_uri, read_manifest
from dala_model.data.splits import make_split
from dala_model.engine.config import TrainConfig
from tests.reliability.conftest import upload


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _rgb(good: bytes) -> Image.Image:
    return Image.open(io.BytesIO(good)).convert("RGB")


def _flip_middle_byte(good: bytes) -> bytes:
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` RGB pixels, with one tiny data chunk."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


NAME = "SOB_B_A-14-70001-40-001.png"  # a BreakHis name no good file uses


@dataclass(frozen=True)
class Case:
    """One bad input: where it goes, how its bytes derive from a good PNG, what must happen."""

    relpath: str
    make: Callable[[bytes], bytes]
    reason: str = ""  # expected quarantine reason; "" means accepted
    mode: str = ""  # for accepted files: the Pillow mode recorded before conversion to RGB
    fmt: str = "PNG"
    duplicate: bool = False


CASES = {
    "truncated_png": Case(f"bad/{NAME}", lambda g: g[: len(g) // 2], reason="truncated"),
    "zero_byte_file": Case(f"bad/{NAME}", lambda g: b"", reason="zero_bytes"),
    "text_named_png": Case(f"bad/{NAME}", lambda g: b"patient notes\n", reason="not_an_image"),
    "corrupt_png_data": Case(f"bad/{NAME}", _flip_middle_byte, reason="corrupt"),
    "jpeg_content_named_png": Case(
        f"odd/{NAME}", lambda g: _encode(_rgb(g), "JPEG"), mode="RGB", fmt="JPEG"
    ),
    "tiff_content_named_png": Case(
        f"odd/{NAME}", lambda g: _encode(_rgb(g), "TIFF"), mode="RGB", fmt="TIFF"
    ),
    "grayscale_png": Case(f"odd/{NAME}", lambda g: _encode(_rgb(g).convert("L")), mode="L"),
    "rgba_png": Case(f"odd/{NAME}", lambda g: _encode(_rgb(g).convert("RGBA")), mode="RGBA"),
    "16_bit_png": Case(
        f"bad/{NAME}",
        lambda g: _encode(Image.fromarray(np.full((20, 30), 40000, np.uint16))),
        reason="unsupported_mode",
    ),
    "far_larger_than_breakhis": Case(
        f"bad/{NAME}", lambda g: _encode(Image.new("1", (7000, 6000))), reason="too_large"
    ),
    "decompression_bomb_header": Case(
        f"bad/{NAME}", lambda g: _png_header_only(100_000, 100_000), reason="too_large"
    ),
    "unparseable_name": Case("bad/slide_0001.png", lambda g: g, reason="unparseable_name"),
    "folder_contradicts_name": Case(
        f"breast/malignant/SOB/ductal_carcinoma/{NAME}",
        lambda g: _encode(_rgb(g).rotate(90)),
        reason="unparseable_name",
    ),
    "key_with_spaces": Case(
        f"slides from lab 2/{NAME}", lambda g: _encode(_rgb(g).rotate(90)), mode="RGB"
    ),
    "non_ascii_key": Case(
        f"données/échantillon/{NAME}", lambda g: _encode(_rgb(g).rotate(90)), mode="RGB"
    ),
    "same_content_two_names": Case(f"zz-copy/{NAME}", lambda g: g, duplicate=True),
}
# A local folder cannot hold a file named '..'; an object store can hold the literal key.
S3_ONLY = {"dotdot_key": Case(f"evil/../{NAME}", lambda g: g, reason="unsafe_key")}


def _params() -> list:
    params = [pytest.param("local", name, id=f"local-{name}") for name in CASES]
    params += [pytest.param("s3", name, id=f"s3-{name}") for name in {**CASES, **S3_ONLY}]
    return params


def _put(base: str, relpath: str, data: bytes) -> None:
    """Upload one file; the raw fsspec call keeps a '..' key literal (storage.join refuses it)."""
    fs, path = storage.filesystem(base)
    if base.startswith("s3://"):
        fs.pipe_file(f"{path}/{relpath}", data)
    else:
        storage.write_bytes_atomic(f"{base}/{relpath}", data)


@pytest.mark.parametrize(("kind", "case_name"), _params())
def test_bad_input_is_quarantined_and_good_data_still_ingested(
    kind, case_name, good_files, tmp_path, monkeypatch, request
):
    monkeypatch.setenv("DALA_CACHE_DIR", str(tmp_path / "shards"))
    base = str(tmp_path) if kind == "local" else request.getfixturevalue("s3_bucket")
    case = {**CASES, **S3_ONLY}[case_name]
    first_rel, first = next(iter(good_files.items()))
    source, root = f"{base}/source", f"{base}/root"
    upload(source, good_files)
    _put(source, case.relpath, case.make(first))

    result = ingest(source, root, workers=2, cache_size=16)

    manifest = read_manifest(root)
    quarantine = storage.read_parquet(quarantine_uri(root))
    duplicates = storage.read_parquet(duplicates_uri(root))
    bad_uri = f"{source}/{case.relpath}"
    assert set(good_files) <= set(manifest["relpath"]), "a good image was lost"
    if case.reason:
        assert quarantine[["uri", "reason"]].values.tolist() == [[bad_uri, case.reason]]
        assert quarantine["detail"].str.len().min() > 0, "a quarantine row must say why"
        assert sorted(manifest["relpath"]) == sorted(good_files)
    elif case.duplicate:
        assert quarantine.empty
        assert duplicates[["uri", "kept_uri"]].values.tolist() == [
            [bad_uri, f"{source}/{first_rel}"]
        ]
        assert sorted(manifest["relpath"]) == sorted(good_files)
    else:
        assert quarantine.empty and duplicates.empty
        row = manifest.set_index("relpath").loc[case.relpath]
        assert (row["mode"], row["format"]) == (case.mode, case.fmt)
    # Zero rows lost: every listed image is in exactly one of the three tables.
    listed = [
        f.url for f in storage.list_file_infos(source) if f.url.lower().endswith(IMAGE_SUFFIXES)
    ]
    accounted = [*manifest["uri"], *quarantine["uri"], *duplicates["uri"]]
    assert sorted(accounted) == sorted(listed)
    assert (result.images, result.quarantined, result.duplicates) == (
        len(manifest),
        len(quarantine),
        len(duplicates),
    )


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_empty_source_prefix_is_a_clear_error_and_writes_nothing(kind, tmp_path, request):
    base = str(tmp_path) if kind == "local" else request.getfixturevalue("s3_bucket")
    source, root = f"{base}/empty", f"{base}/root"
    if kind == "local":
        (tmp_path / "empty").mkdir()
        storage.write_bytes_atomic(f"{source}/README.txt", b"no images here")
        expected: type[Exception] = ValueError
    else:  # an object store has no empty folders: an unused prefix simply does not exist
        expected = FileNotFoundError
    with pytest.raises(expected, match="empty"):
        ingest(source, root)
    assert not storage.exists(f"{root}/manifests/manifest.parquet")
    assert [f for f in _all_files(root)] == []


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_missing_source_url_is_a_clear_error(kind, tmp_path, request):
    base = str(tmp_path) if kind == "local" else request.getfixturevalue("s3_bucket")
    with pytest.raises(FileNotFoundError, match=r"nowhere.*does not exist"):
        ingest(f"{base}/nowhere", f"{base}/root")
    assert _all_files(f"{base}/root") == []


def test_source_in_a_missing_bucket_is_a_clear_error(s3_bucket, tmp_path):
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket-dala/x does not exist"):
        ingest("s3://no-such-bucket-dala/x", str(tmp_path / "root"))


def _all_files(url: str) -> list[str]:
    try:
        return storage.list_files(url)
    except FileNotFoundError:
        return []


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_unwritable_root_is_rejected_before_the_source_is_read(kind, tmp_path, good_files, request):
    upload(str(tmp_path / "source"), good_files)
    if kind == "local":  # root is running these tests, so a chmod would not stop it: use a file
        (tmp_path / "a-file").write_bytes(b"not a folder")
        root = str(tmp_path / "a-file" / "root")
    else:
        request.getfixturevalue("s3_bucket")
        root = "s3://no-such-bucket-dala/root"
    with pytest.raises(storage.StorageError, match="storage root .*root is not writable") as error:
        ingest(str(tmp_path / "source"), root)
    assert "give a root you can write to" in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "field", "fragment"),
    [
        ({"model": "resnet9000"}, "model", "unknown model 'resnet9000'"),
        ({"magnification": 50}, "magnification", "must be one of (40, 100, 200, 400)"),
        ({"magnification": 0}, "magnification", "must be one of"),
        ({"epochs": 0}, "epochs", "greater than 0"),
        ({"epochs": -3}, "epochs", "greater than 0"),
        ({"lr": 0.0}, "lr", "greater than 0"),
        ({"scheme": "random"}, "scheme", "'paper', 'patient' or 'patient-kfold'"),
    ],
)
def test_bad_training_parameters_are_rejected_naming_the_field(
    tmp_path, overrides, field, fragment
):
    fields = {"root": str(tmp_path / "root"), "magnification": 40, **overrides}
    with pytest.raises(ValidationError) as error:
        TrainConfig(**fields)
    errors = error.value.errors()
    assert [e["loc"][0] for e in errors] == [field]
    assert fragment in str(error.value)
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize(
    ("fractions", "fragment"),
    [
        ((0.6, 0.1, 0.1), "must sum to 1"),
        ((0.7, 0.2, 0.2), "must sum to 1"),
        ((0.6, -0.1, 0.5), "non-negative"),
        ((0.5, 0.5), "three non-negative numbers"),
        ((float("nan"), 0.5, 0.5), "non-negative"),
    ],
)
def test_bad_split_fractions_are_rejected_before_reading_anything(tmp_path, fractions, fragment):
    root = str(tmp_path / "root")  # holds no manifest: the fractions must be refused first
    with pytest.raises(ValueError, match=fragment) as error:
        make_split(root, "patient", fractions=fractions)
    assert "fractions" in str(error.value)
    assert not (tmp_path / "root").exists()


def test_unknown_split_scheme_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown split scheme 'random'"):
        make_split(str(tmp_path / "root"), "random")
