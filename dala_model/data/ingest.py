"""Ingest: list a source of BreakHis images, verify each, and write the manifests (and the cache).

Decisions, so every later step can trust the manifest:

- Files: anything ending in .png/.jpg/.jpeg/.tif/.tiff is an image candidate; other files (READMEs,
  ``.DS_Store``) are not images by name and are skipped, counted as ``ignored`` in the result and
  the manifest metadata. Candidates are decoded by content (PNG, JPEG or TIFF decoders only, to
  keep the decoder surface small): JPEG or TIFF content under a ``.png`` name is accepted, because
  the pixels are valid, and its real format is recorded in the ``format`` column.
- Colour: 8-bit modes (RGB, RGBA, L, LA, P, PA) are converted to RGB when decoded and the original
  Pillow mode is recorded in ``mode``, so grayscale or alpha inputs can be found and filtered.
  Other modes (16-bit ``I;16``, 32-bit ``I``/``F``, CMYK, bilevel ``1``) are quarantined as
  ``unsupported_mode``: converting them silently clips or reinterprets values.
- Quarantine reasons (``quarantine.parquet``: uri, reason, detail): ``unsafe_key`` (a key with
  ``.``/``..`` segments), ``unparseable_name`` (see ``dala_model.data.breakhis``), ``zero_bytes``,
  ``too_large`` (more than ``MAX_FILE_BYTES`` bytes or ``MAX_PIXELS`` pixels, the
  decompression-bomb guard, checked from the header before any pixel is decoded),
  ``not_an_image``, ``truncated``, ``corrupt`` (bad checksums or data stream), ``unsupported_mode``.
- Duplicates: the same sha256 under several paths keeps the first path in sorted relpath order in
  the manifest; the others go to ``duplicates.parquet`` (sha256, uri, kept_uri), counted once.
- ``image_id`` is the first 16 hex digits of the content sha256: stable across re-ingests, moves and
  renames, and a changed file gets a new id.
- Incremental: rows of the previous manifest of the same source whose uri, size and version
  (S3 ETag or local mtime) are unchanged are reused without reading the file; everything else is
  read. Files no longer in the source are dropped from the manifest. The output depends only on
  the source's current content, so re-running is idempotent and equals a fresh ingest (reused rows
  keep their ``ingested_at``).
- After listing and before anything is read, a probe write under ``root`` proves it is writable; a store that stays
  unreachable after storage's bounded retries ends the run with ``storage.StorageError`` (nothing
  is committed, and a rerun starts over from the previous manifest).
- Commit order: cache shards, then quarantine and duplicates, then ``manifest.parquet`` last; each
  is an atomic write, so an ingest killed at any point leaves the previous manifest (or none) and
  a rerun completes the work.
- Verification (format, mode and size from the header, ``verify()``'s chunk checksums) is
  Pillow's; the full decode is ``dala_model.data._decode.decode_rgb``: libspng (imagecodecs) for
  the 8-bit PNGs where it is proven pixel-identical to Pillow and as strict about damaged data,
  Pillow for everything else and for any file libspng refuses, so a bad file's quarantine reason
  and detail are Pillow's whichever decoder ran. Manifest rows and cached pixels are the same as
  with Pillow alone (tests/test_ingest.py checks both).
- Reading, hashing, decoding and resizing run in a bounded thread pool: libspng (imagecodecs),
  Pillow's decoders and resize and hashlib release the GIL, the S3 reads are I/O, so one file's
  GET overlaps other files' decode and resize; at most a few tasks per worker are in flight, so
  memory does not grow with the dataset.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from dala_model import storage
from dala_model.data._decode import decode_rgb, resize_rgb
from dala_model.data._pool import bounded_map, default_workers
from dala_model.data.breakhis import (
    IMAGE_SUFFIXES,
    BreakHisName,
    UnparseableName,
    parse_breakhis_path,
)
from dala_model.data.cache import ShardWriter, build_cache
from dala_model.data.manifest import (
    DUPLICATES_SCHEMA,
    MANIFEST_SCHEMA,
    QUARANTINE_SCHEMA,
    SCHEMA_VERSION,
    data_version,
    duplicates_uri,
    manifest_uri,
    quarantine_uri,
)

log = logging.getLogger(__name__)

IMAGE_FORMATS = ("PNG", "JPEG", "TIFF")
RGB_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA")
MAX_PIXELS = 40_000_000  # about 125 BreakHis images (700x460); far beyond any slide tile we expect
MAX_FILE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class IngestResult:
    source: str
    root: str
    images: int  # rows in the manifest
    read: int  # files read and decoded this run
    reused: int  # unchanged files taken from the previous manifest without reading
    removed: int  # previous manifest rows whose file is gone from the source
    quarantined: int
    duplicates: int
    ignored: int  # files without an image suffix
    cached: int  # images added to the decoded cache
    seconds: float
    images_per_s: float  # read+verify+decode throughput of this run
    manifest_version: str


@dataclass(frozen=True)
class _Outcome:
    """What reading one file gave: a manifest row (and its resized pixels) or a quarantine row."""

    row: dict[str, Any] | None = None
    pixels: np.ndarray | None = None
    reason: str = ""
    detail: str = ""


def ingest(
    source: str, root: str, workers: int | None = None, cache_size: int | None = 224
) -> IngestResult:
    """Ingest every image under ``source`` into ``root`` (see the module docstring).

    The steps: list the source, sort its files into quarantined / unchanged / to read, read the
    rest in parallel (``_read``), then commit (``_commit``: quarantine, duplicates, manifest last)."""
    started = time.perf_counter()
    source = canonical_source(source)
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if cache_size is not None and cache_size < 0:
        raise ValueError(f"cache_size must be >= 0 (0 skips the cache), got {cache_size}")
    listing = storage.list_file_infos(source)
    files = [f for f in listing if f.relpath.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        raise ValueError(
            f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {storage.redact(source)}: "
            "check the source URL"
        )
    storage.check_writable(root)  # fail in a second, not after reading the whole source
    previous = _previous_rows(root, source)
    rows, quarantine, todo = _sort_files(files, previous)
    reused = len(rows)
    log.info(
        "ingest %s: %d image files, %d unchanged, reading %d",
        storage.redact(source),
        len(files),
        reused,
        len(todo),
    )
    workers = workers or default_workers()
    writer = ShardWriter(root, cache_size) if cache_size else None
    images_per_s = _read(todo, rows, quarantine, writer, workers)
    cached = writer.close() if writer is not None else 0
    manifest, duplicates, quarantine_frame, version = _commit(
        root, source, rows, quarantine, ignored=len(listing) - len(files)
    )
    if cache_size:
        cached += build_cache(root, cache_size, workers)  # unchanged images not cached yet
    result = IngestResult(
        source=storage.redact(source),
        root=storage.redact(root),
        images=len(manifest),
        read=len(todo),
        reused=reused,
        removed=len(set(previous) - {f.url for f in files}),
        quarantined=len(quarantine_frame),
        duplicates=len(duplicates),
        ignored=len(listing) - len(files),
        cached=cached,
        seconds=time.perf_counter() - started,
        images_per_s=images_per_s,
        manifest_version=version,
    )
    log.info("ingest done: %s", result)
    return result


def _sort_files(
    files: list[storage.StoredFile], previous: dict[str, dict[str, Any]]
) -> tuple[
    list[dict[str, Any]], list[dict[str, str]], list[tuple[storage.StoredFile, BreakHisName]]
]:
    """Rows reused unchanged from the previous manifest, files rejected by name, files to read."""
    rows: list[dict[str, Any]] = []
    quarantine: list[dict[str, str]] = []
    todo: list[tuple[storage.StoredFile, BreakHisName]] = []
    for file in files:
        reason, detail, name = _precheck(file)
        if reason:
            quarantine.append({"uri": file.url, "reason": reason, "detail": detail})
        elif (old := previous.get(file.url)) and (old["bytes"], old["source_version"]) == (
            file.size,
            file.version,
        ):
            rows.append(old)
        else:
            todo.append((file, name))
    return rows, quarantine, todo


def _read(
    todo: list[tuple[storage.StoredFile, BreakHisName]],
    rows: list[dict[str, Any]],
    quarantine: list[dict[str, str]],
    writer: ShardWriter | None,
    workers: int,
) -> float:
    """Read, hash, verify and decode ``todo`` on a thread pool, in order; return images/s."""
    now = pd.Timestamp.now(tz="UTC").floor("us")

    def inspect(item: tuple[storage.StoredFile, BreakHisName]) -> _Outcome:
        file, name = item
        return _inspect(file, name, now, writer)

    read_started = time.perf_counter()
    with ThreadPoolExecutor(workers, thread_name_prefix="ingest") as pool:
        outcomes = bounded_map(pool, inspect, todo, window=4 * workers)
        for (file, _), outcome in zip(
            todo,
            tqdm(outcomes, total=len(todo), desc="ingest", unit="img", disable=None),
            strict=True,
        ):
            if outcome.row is None:
                quarantine.append(
                    {"uri": file.url, "reason": outcome.reason, "detail": outcome.detail}
                )
                continue
            rows.append(outcome.row)
            if writer is not None and outcome.pixels is not None:
                writer.add(outcome.row["image_id"], outcome.pixels)
    read_seconds = time.perf_counter() - read_started
    images_per_s = len(todo) / read_seconds if todo and read_seconds > 0 else 0.0
    if todo:
        log.info("read, verified and decoded %d images at %.1f images/s", len(todo), images_per_s)
    return images_per_s


def _commit(
    root: str,
    source: str,
    rows: list[dict[str, Any]],
    quarantine: list[dict[str, str]],
    ignored: int,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, str]:
    """Write quarantine, duplicates, then the manifest (last, so a reader sees all or nothing)."""
    manifest, duplicates = _deduplicate(rows)
    quarantine_frame = pd.DataFrame(quarantine, columns=QUARANTINE_SCHEMA.names)
    counts = {
        "images": len(manifest),
        "labels": {k: int(v) for k, v in Counter(manifest["label"]).items()},
        "quarantined": {k: int(v) for k, v in Counter(quarantine_frame["reason"]).items()},
        "duplicates": len(duplicates),
        "ignored": ignored,
    }
    storage.write_parquet_atomic(quarantine_frame, quarantine_uri(root), schema=QUARANTINE_SCHEMA)
    storage.write_parquet_atomic(duplicates, duplicates_uri(root), schema=DUPLICATES_SCHEMA)
    version = data_version(manifest)
    storage.write_parquet_atomic(
        manifest,
        manifest_uri(root),
        schema=MANIFEST_SCHEMA,
        metadata={
            "dala.schema_version": SCHEMA_VERSION,
            "dala.source": storage.redact(source),
            "dala.counts": json.dumps(counts, sort_keys=True),
            "dala.manifest_version": version,
        },
    )
    return manifest, duplicates, quarantine_frame, version


def _precheck(file: storage.StoredFile) -> tuple[str, str, BreakHisName | None]:
    """Reasons to quarantine a file that need no read: its key, name and listed size."""
    try:
        storage.check_relative_key(file.relpath)
    except ValueError as exc:
        return "unsafe_key", str(exc), None
    try:
        name = parse_breakhis_path(file.relpath)
    except UnparseableName as exc:
        return "unparseable_name", str(exc), None
    if file.size == 0:
        return "zero_bytes", "the file is empty", None
    if file.size > MAX_FILE_BYTES:
        return "too_large", f"{file.size} bytes > MAX_FILE_BYTES={MAX_FILE_BYTES}", None
    return "", "", name


def _inspect(
    file: storage.StoredFile, name: BreakHisName, now: pd.Timestamp, writer: ShardWriter | None
) -> _Outcome:
    """Read, hash, verify and fully decode one file; resize it for the cache while decoded."""
    data = storage.read_bytes(file.url)
    if not data:
        return _Outcome(reason="zero_bytes", detail="the file is empty")
    sha = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            fmt, mode, (width, height) = image.format, image.mode, image.size
            if width * height > MAX_PIXELS:
                return _Outcome(
                    reason="too_large",
                    detail=f"{width}x{height} pixels > MAX_PIXELS={MAX_PIXELS} (decompression-bomb guard)",
                )
            if mode not in RGB_MODES:
                return _Outcome(
                    reason="unsupported_mode",
                    detail=f"mode {mode}: convert to 8-bit RGB (accepted: {', '.join(RGB_MODES)})",
                )
            image.verify()  # chunk checksums, without decoding
        pixels = None
        rgb = decode_rgb(data, IMAGE_FORMATS)  # full decode: the only proof every pixel is there
        if writer is not None and writer.wants(sha[:16]):
            pixels = resize_rgb(rgb, writer.size)
    except Image.DecompressionBombError as exc:
        return _Outcome(reason="too_large", detail=str(exc))
    except UnidentifiedImageError:
        return _Outcome(reason="not_an_image", detail=f"not a {'/'.join(IMAGE_FORMATS)} image")
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        truncated = isinstance(exc, EOFError) or "truncated" in str(exc).lower()
        return _Outcome(reason="truncated" if truncated else "corrupt", detail=str(exc))
    row = {
        "image_id": sha[:16],
        "uri": file.url,
        "relpath": file.relpath,
        "sha256": sha,
        "bytes": len(data),
        "width": width,
        "height": height,
        "format": fmt,
        "mode": mode,
        "label": name.label,
        "label_id": name.label_id,
        "subtype": name.subtype,
        "subtype_code": name.subtype_code,
        "patient_id": name.patient_id,
        "slide_id": name.slide_id,
        "magnification": name.magnification,
        "seq": name.seq,
        "procedure": name.procedure,
        "source_version": file.version,
        "ingested_at": now,
    }
    return _Outcome(row=row, pixels=pixels)


def _deduplicate(rows: list[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep the first relpath of each sha256; list the others with the uri that was kept."""
    frame = pd.DataFrame(rows, columns=MANIFEST_SCHEMA.names).sort_values("relpath")
    frame = frame.reset_index(drop=True)
    repeated = frame.duplicated("sha256", keep="first")
    kept = frame[~repeated].set_index("sha256")["uri"]
    duplicates = pd.DataFrame(
        {
            "sha256": frame.loc[repeated, "sha256"],
            "uri": frame.loc[repeated, "uri"],
            "kept_uri": frame.loc[repeated, "sha256"].map(kept),
        }
    )
    return frame[~repeated].reset_index(drop=True), duplicates.reset_index(drop=True)


def canonical_source(source: str) -> str:
    """The form a source is recorded in: URLs as given, local paths absolute."""
    return source if "://" in source else os.path.abspath(source)


def manifest_source(root: str) -> str | None:
    """The (redacted) source recorded in ``ROOT``'s manifest, or None when there is no manifest."""
    uri = manifest_uri(root)
    return storage.read_parquet(uri).attrs.get("dala.source") if storage.exists(uri) else None


def _previous_rows(root: str, source: str) -> dict[str, dict[str, Any]]:
    """Rows of the previous manifest of this source by uri, or nothing if there is none to reuse."""
    uri = manifest_uri(root)
    if not storage.exists(uri):
        return {}
    frame = storage.read_parquet(uri)
    if frame.attrs.get("dala.schema_version") != SCHEMA_VERSION:
        log.warning("previous manifest has another schema version: re-reading every file")
        return {}
    if frame.attrs.get("dala.source") != storage.redact(source):
        log.warning(
            "previous manifest came from %s, not %s: it will be replaced",
            frame.attrs.get("dala.source"),
            storage.redact(source),
        )
        return {}
    return {row["uri"]: row for row in frame.to_dict("records")}
