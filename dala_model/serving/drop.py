"""The scoring ingest: check every image of a drop and record it under OUT, never under ROOT.

``ingest_drop(source, out)`` writes ``OUT/manifests/manifest.parquet`` (one row per image
content, :data:`DROP_MANIFEST_SCHEMA`), ``quarantine.parquet`` and ``duplicates.parquet``. The
training root's manifest is not read or written: scoring data never becomes training data.

The per-file checks are ingest's (``dala_model.data.ingest``): the same size limits
(``MAX_FILE_BYTES``, ``MAX_PIXELS``), decoders (PNG, JPEG, TIFF by content) and quarantine
reasons (``zero_bytes``, ``too_large``, ``not_an_image``, ``truncated``, ``corrupt``,
``unsupported_mode``), plus the source's own (``dala_model.data.sources``). They are written
here rather than called through ingest's private ``_inspect`` for two reasons: scoring converts
more than training ingest accepts (a 16-bit grayscale scan is scaled to 8 bits here, where
ingest refuses to train on it), and it holds no pixels itself, so memory stays flat however
large a drop is: a caller that wants them passes ``keep`` (the scorer's bounded, sha256-keyed
``PixelHandoff``, so an image checked here need not be read and decoded again to be scored).
The full decode of the 8-bit modes is ingest's too (``dala_model.data._decode``: libspng where
proven identical to Pillow, else Pillow), here and when the scorer decodes a file again.
Conversions, by Pillow source mode, with the mode recorded in ``mode`` and ``converted`` true:
``RGBA/LA/PA`` drop alpha (as the training cache does), ``L/P`` expand to RGB, ``I;16*`` and
``I`` within 0..65535 are scaled by 1/257, ``F`` within 0..1 by 255. Anything else (CMYK,
bilevel, out-of-range ``I``/``F``) is ``unsupported_mode``.

Accumulating records (a nightly drop prefix is emptied and refilled): the manifest and the
quarantine keep the rows of earlier drops, keyed by file uri; a uri seen again replaces its own
row (a file fixed and re-uploaded leaves the quarantine, one that broke enters it). Files of the
previous manifest whose uri, size and version (ETag/mtime) are unchanged are not read again.
One row per content: the first uri of a sha256 (earliest ``ingested_at``, then uri) is kept, the
others go to ``duplicates.parquet``. Two drops racing to rewrite these files may lose one's
newest records; each run re-checks the files still in its drop, so the next run restores them.

Three steps, so that a cluster can read a large drop (``flows/inference.py`` with
``dask_address``; this module never imports Prefect or Dask), as the training ingest does
(``dala_model.data.ingest_distributed``): :func:`plan_drop` lists the drop where the flow runs,
reuses the unchanged rows and cuts the files still to read into :class:`DropPartition` s (uri
order, ``partition_files`` each); :func:`check_partition` reads, hashes and checks one partition
on a worker and returns its rows and quarantine records, writing nothing, so a rerun after a lost
worker, or two attempts at once, cannot leave anything behind; :func:`commit_drop`, back where
the plan was made, is the single writer of the manifest, quarantine and duplicates.
:func:`ingest_drop` chains the three in this process (one partition, a thread pool), so both
paths write the same records by construction.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from dala_model import storage
from dala_model.data._decode import decode_rgb as fast_decode_rgb
from dala_model.data._pool import bounded_map, default_workers
from dala_model.data.breakhis import LABELS
from dala_model.data.ingest import IMAGE_FORMATS, MAX_FILE_BYTES, MAX_PIXELS, canonical_source
from dala_model.data.manifest import DUPLICATES_SCHEMA
from dala_model.data.sources import Discovery, SourceImage, discover
from dala_model.serving.outputs import ScoringLayout

log = logging.getLogger(__name__)

DROP_SCHEMA_VERSION = "1"
RGB_CONVERTIBLE = ("RGB", "RGBA", "L", "LA", "P", "PA")
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
DROP_MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),  # sha256[:16]
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("relpath", pa.string(), nullable=False),
        pa.field("case_id", pa.string(), nullable=False),
        pa.field("magnification", pa.int16(), nullable=False),
        pa.field(
            "magnification_from", pa.string(), nullable=False
        ),  # name|folder|metadata|override
        pa.field("label", pa.string(), nullable=True),  # benign | malignant | null
        pa.field("label_id", pa.int8(), nullable=True),
        pa.field("layout", pa.string(), nullable=False),  # sidecar | breakhis | case_folders
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("format", pa.string(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),  # Pillow mode before conversion to RGB
        pa.field("converted", pa.bool_(), nullable=False),  # mode was not RGB
        pa.field("source_version", pa.string(), nullable=False),
        pa.field("ingested_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)
DROP_QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
        pa.field("case_id", pa.string(), nullable=True),
        pa.field("magnification", pa.int16(), nullable=True),
        pa.field("quarantined_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)


class ConversionError(ValueError):
    """An image whose mode cannot be turned into 8-bit RGB without guessing."""


@dataclass
class DropResult:
    """What the scoring ingest saw in one drop; ``current`` is the drop's kept manifest rows."""

    source: str
    layout: str
    current: pd.DataFrame  # manifest rows (one per content) of the files in this drop
    quarantined: list[dict] = field(default_factory=list)  # this drop's records
    duplicates: int = 0
    read: int = 0
    reused: int = 0
    ignored: int = 0


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` (decoded) as 8-bit RGB, or :class:`ConversionError` (see the module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in RGB_CONVERTIBLE:
        return image.convert("RGB")
    if mode in WIDE_MODES:
        values = np.asarray(image)
        low, high = float(values.min()), float(values.max())
        limit = 1.0 if mode == "F" else 65535.0
        if low < 0 or high > limit:
            raise ConversionError(
                f"mode {mode} with values {low:g}..{high:g} outside 0..{limit:g}: "
                "export it as 8-bit or 16-bit RGB/grayscale"
            )
        scaled = np.rint(values.astype(np.float64) * (255.0 / limit)).astype(np.uint8)
        return Image.fromarray(np.repeat(scaled[..., None], 3, axis=2), mode="RGB")
    raise ConversionError(f"mode {mode}: convert it to 8-bit RGB before scoring")


def decode_rgb(data: bytes) -> tuple[np.ndarray, str, str]:
    """Fully decode ``data`` (after a checksum verify) to RGB: ``(uint8 HxWx3, format, source mode)``.

    The 8-bit modes go through ``dala_model.data._decode.decode_rgb``, as the training ingest
    does: libspng where it is proven to give Pillow's ``convert("RGB")`` bit for bit and to be as
    strict about damaged data, Pillow otherwise (so the error for a bad file is Pillow's). The
    wide modes are scaled by :func:`to_rgb` from Pillow's decode. Raises what Pillow raises for bad
    files and :class:`ConversionError`; :func:`check_bytes` turns those into quarantine reasons."""
    with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
        if image.width * image.height > MAX_PIXELS:
            raise Image.DecompressionBombError(
                f"{image.width}x{image.height} pixels > MAX_PIXELS={MAX_PIXELS} "
                "(decompression-bomb guard)"
            )
        fmt, mode = image.format, image.mode
        image.verify()
    if mode in RGB_CONVERTIBLE:
        return fast_decode_rgb(data, IMAGE_FORMATS), fmt, mode
    with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
        image.load()
        rgb = to_rgb(image)
        return np.asarray(rgb, dtype=np.uint8), fmt, mode


Checked = tuple[str, str, tuple[str, str, int, int] | None, np.ndarray | None]


def check_bytes(data: bytes) -> Checked:
    """``(reason, detail, info, rgb)``: a quarantine reason (info and rgb None), or
    ``("", "", (format, mode, w, h), rgb)`` with the decoded uint8 RGB pixels."""
    if not data:
        return "zero_bytes", "the file is empty", None, None
    if len(data) > MAX_FILE_BYTES:
        return "too_large", f"{len(data)} bytes > MAX_FILE_BYTES={MAX_FILE_BYTES}", None, None
    try:
        rgb, fmt, mode = decode_rgb(data)
    except Image.DecompressionBombError as exc:
        return "too_large", str(exc), None, None
    except ConversionError as exc:
        return "unsupported_mode", str(exc), None, None
    except UnidentifiedImageError:
        return "not_an_image", f"not a {'/'.join(IMAGE_FORMATS)} image", None, None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        truncated = isinstance(exc, EOFError) or "truncated" in str(exc).lower()
        return ("truncated" if truncated else "corrupt"), str(exc), None, None
    return "", "", (fmt, mode, rgb.shape[1], rgb.shape[0]), rgb


# Called with each image that passed the check, its sha256 and its decoded RGB pixels (on the
# checking thread): how the scorer is handed pixels instead of decoding the file a second time
# (dala_model.serving.scoring.PixelHandoff).
Keep = Callable[[SourceImage, str, np.ndarray], None]


def _inspect(
    image: SourceImage, now: pd.Timestamp, keep: Keep | None = None
) -> tuple[dict | None, dict | None]:
    """Read and check one image: its manifest row, or its quarantine record."""
    file = image.file
    data = storage.read_bytes(file.url)
    reason, detail, info, rgb = check_bytes(data)
    if reason:
        record = {"uri": file.url, "reason": reason, "detail": detail, "case_id": image.case_id}
        return None, {**record, "magnification": image.magnification}
    fmt, mode, width, height = info
    sha = hashlib.sha256(data).hexdigest()
    if keep is not None:
        keep(image, sha, rgb)
    row = {
        "image_id": sha[:16],
        "sha256": sha,
        "uri": file.url,
        "relpath": file.relpath,
        "case_id": image.case_id,
        "magnification": image.magnification,
        "magnification_from": image.magnification_from,
        "label": image.label,
        "label_id": LABELS.index(image.label) if image.label else None,
        "layout": image.layout,
        "bytes": len(data),
        "width": width,
        "height": height,
        "format": fmt,
        "mode": mode,
        "converted": mode != "RGB",
        "source_version": file.version,
        "ingested_at": now,
    }
    return row, None


def _reusable(previous: pd.DataFrame, image: SourceImage) -> dict | None:
    """The previous manifest row of ``image`` when its file and what is known of it are unchanged."""
    if previous.empty or image.file.url not in previous.index:
        return None
    old = previous.loc[image.file.url].to_dict()
    same = (old["bytes"], old["source_version"]) == (image.file.size, image.file.version)
    same = same and (old["case_id"], int(old["magnification"])) == (
        image.case_id,
        image.magnification,
    )
    same = same and (old["label"] if pd.notna(old["label"]) else None) == image.label
    return {**old, "uri": image.file.url} if same else None


DEFAULT_PARTITION_FILES = 256  # files a cluster worker reads and checks per task


@dataclass(frozen=True)
class DropPartition:
    """Files of a drop one worker reads and checks (:func:`check_partition`): small to pickle."""

    index: int
    images: tuple[SourceImage, ...]
    ingested_at: pd.Timestamp  # the drop's one timestamp, the same in every partition

    def uris(self) -> list[str]:
        return [image.file.url for image in self.images]


@dataclass
class DropPlan:
    """A drop as listed (:func:`plan_drop`): what is reused, and the partitions still to read.

    It stays where the flow runs (the single writer); only its :class:`DropPartition` s travel."""

    source: str  # canonical (local paths absolute: workers share the file system)
    out: str
    layout: str  # the drop's layout, as discovered
    ingested_at: pd.Timestamp
    reused: pd.DataFrame  # previous manifest rows of unchanged files
    refused: list[dict]  # quarantined by the listing itself, before any read
    partitions: list[DropPartition]
    images: int
    ignored: int

    @property
    def read(self) -> int:
        return sum(len(p.images) for p in self.partitions)


@dataclass
class CheckedPartition:
    """What :func:`check_partition` saw: manifest rows and quarantine records, nothing written."""

    index: int
    uris: list[str]  # the partition's files, to match it to its plan at the commit
    rows: list[dict]
    quarantined: list[dict]


def plan_drop(
    source: str,
    layout: ScoringLayout,
    *,
    magnification: int | None = None,
    partition_files: int | None = DEFAULT_PARTITION_FILES,
) -> DropPlan:
    """List ``source``, prove OUT writable, reuse unchanged rows, cut the rest into partitions.

    Partitions are ``partition_files`` files each in uri order (None: one partition)."""
    if partition_files is not None and partition_files < 1:
        raise ValueError(f"partition_files must be at least 1, got {partition_files}")
    source = canonical_source(source)
    found: Discovery = discover(source, magnification=magnification)
    storage.check_writable(layout.out)
    now = pd.Timestamp.now(tz="UTC").floor("us")
    previous = _read(layout.manifest(), DROP_MANIFEST_SCHEMA)
    previous_by_uri = previous.set_index("uri", drop=False) if len(previous) else previous
    reused, todo = [], []
    for image in found.images:
        old = _reusable(previous_by_uri, image)
        if old is not None:
            reused.append(old)
        else:
            todo.append(image)
    todo.sort(key=lambda image: image.file.url)
    size = partition_files or max(len(todo), 1)
    partitions = [
        DropPartition(k, tuple(todo[start : start + size]), now)
        for k, start in enumerate(range(0, len(todo), size))
    ]
    return DropPlan(
        source=source,
        out=layout.out,
        layout=found.layout,
        ingested_at=now,
        reused=pd.DataFrame(reused, columns=DROP_MANIFEST_SCHEMA.names),
        refused=[{**q, "quarantined_at": now} for q in found.quarantined],
        partitions=partitions,
        images=len(found.images),
        ignored=found.ignored,
    )


def check_partition(
    partition: DropPartition, workers: int | None = None, keep: Keep | None = None
) -> CheckedPartition:
    """Read, hash and check one partition's files (on a cluster worker); writes nothing, so it
    is safe to run again or twice at once. ``keep`` is given each checked image's pixels."""
    now = partition.ingested_at
    rows, quarantined = [], []
    workers = workers or default_workers()
    with ThreadPoolExecutor(workers, thread_name_prefix="drop") as pool:
        images = partition.images
        for row, refused in bounded_map(
            pool, lambda i: _inspect(i, now, keep), images, 4 * workers
        ):
            if row is not None:
                rows.append(row)
            else:
                quarantined.append({**refused, "quarantined_at": now})
    log.info(
        "drop partition %d: %d files read, %d quarantined",
        partition.index,
        len(partition.images),
        len(quarantined),
    )
    return CheckedPartition(partition.index, partition.uris(), rows, quarantined)


def commit_drop(plan: DropPlan, checked: list[CheckedPartition]) -> DropResult:
    """Merge the checked partitions (``checked[k]`` from partition ``k``) into OUT's records.

    The single writer of OUT's manifest, quarantine and duplicates (each write atomic); it
    re-reads the manifest just before writing, so a drop committed since the plan keeps its rows."""
    if len(checked) != len(plan.partitions):
        raise ValueError(
            f"commit_drop needs one checked partition per partition: got {len(checked)} for "
            f"{len(plan.partitions)} partitions"
        )
    for k, (part, done) in enumerate(zip(plan.partitions, checked, strict=True)):
        if done.index != k or done.uris != part.uris():
            raise ValueError(
                f"checked[{k}] is partition {done.index} ({len(done.uris)} files), not partition "
                f"{k} of this plan: pass check_partition(plan.partitions[{k}])'s result"
            )
    layout = ScoringLayout(plan.out)
    frames = [plan.reused] + [
        pd.DataFrame(done.rows, columns=DROP_MANIFEST_SCHEMA.names) for done in checked
    ]
    current = pd.concat([f for f in frames if len(f)] or [plan.reused], ignore_index=True)
    quarantined = list(plan.refused) + [q for done in checked for q in done.quarantined]
    log.info(
        "drop %s (%s): %d images, %d unchanged, %d read, %d quarantined",
        storage.redact(plan.source),
        plan.layout,
        plan.images,
        plan.images - plan.read,
        plan.read,
        len(quarantined),
    )
    previous = _read(layout.manifest(), DROP_MANIFEST_SCHEMA)
    duplicates = _commit(layout, plan.source, previous, current, quarantined)
    ours = current.sort_values("uri").drop_duplicates("sha256").reset_index(drop=True)
    return DropResult(
        source=storage.redact(plan.source),
        layout=plan.layout,
        current=ours,
        quarantined=quarantined,
        duplicates=duplicates,
        read=plan.read,
        reused=plan.images - plan.read,
        ignored=plan.ignored,
    )


def ingest_drop(
    source: str,
    layout: ScoringLayout,
    *,
    magnification: int | None = None,
    workers: int | None = None,
    keep: Keep | None = None,
) -> DropResult:
    """Check every image of ``source`` and update OUT's manifest, quarantine and duplicates.

    :func:`plan_drop`, :func:`check_partition` and :func:`commit_drop` in this process, the
    whole drop one partition read by ``workers`` threads (``keep``: as for check_partition)."""
    plan = plan_drop(source, layout, magnification=magnification, partition_files=None)
    checked = [check_partition(p, workers, keep) for p in plan.partitions]
    return commit_drop(plan, checked)


def _read(uri: str, schema: pa.Schema) -> pd.DataFrame:
    if not storage.exists(uri):
        return schema.empty_table().to_pandas()
    frame = storage.read_parquet(uri)
    if list(frame.columns) != schema.names:
        raise ValueError(
            f"{storage.redact(uri)} was written by another version of dala (columns "
            f"{list(frame.columns)}): move it away and score the drop again"
        )
    return frame


def _commit(
    layout: ScoringLayout,
    source: str,
    previous: pd.DataFrame,
    current: pd.DataFrame,
    quarantined: list[dict],
) -> int:
    """Merge this drop into OUT's records (keyed by uri), write them; return the duplicates."""
    fresh_uris = set(current["uri"]) | {q["uri"] for q in quarantined}
    older = previous[~previous["uri"].isin(fresh_uris)]
    merged = pd.concat([f for f in (older, current) if len(f)], ignore_index=True)
    if merged.empty:
        merged = DROP_MANIFEST_SCHEMA.empty_table().to_pandas()
    merged = merged.sort_values(["ingested_at", "uri"], kind="stable").reset_index(drop=True)
    repeated = merged.duplicated("sha256", keep="first")
    kept = merged[~repeated].reset_index(drop=True)
    first = kept.set_index("sha256")["uri"]
    duplicates = pd.DataFrame(
        {
            "sha256": merged.loc[repeated, "sha256"],
            "uri": merged.loc[repeated, "uri"],
            "kept_uri": merged.loc[repeated, "sha256"].map(first),
        }
    )
    old_quarantine = _read(layout.quarantine(), DROP_QUARANTINE_SCHEMA)
    new_quarantine = pd.DataFrame(quarantined, columns=DROP_QUARANTINE_SCHEMA.names)
    kept_quarantine = old_quarantine[~old_quarantine["uri"].isin(fresh_uris)]
    parts = [f for f in (kept_quarantine, new_quarantine) if len(f)] or [new_quarantine]
    quarantine = pd.concat(parts, ignore_index=True).sort_values("uri", ignore_index=True)
    storage.write_parquet_atomic(quarantine, layout.quarantine(), schema=DROP_QUARANTINE_SCHEMA)
    storage.write_parquet_atomic(duplicates, layout.duplicates(), schema=DUPLICATES_SCHEMA)
    storage.write_parquet_atomic(
        kept,
        layout.manifest(),
        schema=DROP_MANIFEST_SCHEMA,
        metadata={
            "dala.scoring_schema_version": DROP_SCHEMA_VERSION,
            "dala.last_source": storage.redact(source),
        },
    )
    return len(duplicates)
