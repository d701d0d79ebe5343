"""Score a drop of new images with the promoted models: ``dala predict SOURCE --registry ROOT --out OUT``.

The product path for the people who consume predictions. SOURCE is any drop (a BreakHis archive,
case folders or a sidecar table: ``dala_model.data.sources``); ROOT holds the promoted models
(``dala_model.serving.promotion``); everything written goes under OUT
(``dala_model.serving.outputs``), whose manifest is its own (``dala_model.serving.drop``): the
training manifest under ROOT is never read for scoring nor written.

Each magnification is scored by its current promoted model, loaded with ``load_model`` and
checked to still be the promoted weights, then run as ``dala_model.serving.scorer`` says:
``precision="auto"`` (default) with the precision, memory format and CPU batch size measured
once per machine (``dala_model.engine.autotune``), or ``precision="int8"`` on the CPU with the
checkpoint's int8 sibling (quantized and saved on first use, calibrated on the model's own
validation images). What ran is recorded in each :class:`MagnificationScore` (``precision``,
``tuning``), in the labelled drop's batch report and in each part file's Parquet metadata
(``dala.precision``, ``dala.tuning``); ``model_version`` stays the float weights' sha256. The
threshold is, in order: ``threshold=`` (the CLI's
``--threshold``), the model card's stored ``threshold`` (chosen on validation by the engine,
``dala_model.calibration``), else 0.5.

No row twice, by content (as ``dala_model.serving.predictions`` does for the training root):

- incremental: an image whose sha256 already has a row for the same model version is skipped,
  under whatever name or prefix it arrives again; a rerun over the same drop scores nothing;
- deterministic parts: pending sha256s are sorted and cut into ``chunk_size`` chunks; a part's
  key hashes the model version and the chunk's sha256s (all of them, whether or not each reads
  now), so two runs over the same pending set write the same keys and the second overwrite
  replaces rows instead of adding them;
- readers dedupe to one row per ``(sha256, model_version)``.

Heatmaps (``explain=True``, the CLI's ``--explain``): for each scored chunk, the images called
malignant (``pred_label == 1``) or uncertain (``|prob - threshold| <= uncertain_band``, default
:data:`DEFAULT_UNCERTAIN_BAND`) get a Grad-CAM (or Grad-CAM++) overlay PNG at the model's input
size, of the **malignant class** for every one of them (the question for a malignant call and
for a borderline one alike is where the model sees malignancy), written atomically to
``OUT/explain/model=<m>/version=<v>/mag=<x>/<sha256>.<method>.png`` before the part that points
at it (``heatmap_uri``; null for the images not explained), so a retried chunk overwrites the
same files and a row never names a missing one. The layer and the reshape are the registry's
(``ModelSpec.cam_layer`` / ``cam_reshape``, through ``dala_model.report.explain``). Grad-CAM
needs gradients in float32 from the float model: at ``fp32``/``bf16``/``fp16`` the scorer's own
model is float32 (bf16/fp16 are autocast at scoring only) and the maps are computed with it in
float32 on the scoring device, without autocast; at ``int8`` the float checkpoint is loaded on
the CPU for the maps. A model the registry names no layer for (Swin), or a chunk whose maps
fail, is logged and leaves ``heatmap_uri`` null: explanations never stop scoring. What was
asked is recorded in each part's metadata (``dala.explain``: method, band, class, layer,
reshape) and in :attr:`MagnificationScore.explain`.

Three steps, so that a cluster can run the middle one (``flows/inference.py`` with
``dask_address``; this module never imports Prefect or Dask):

- :func:`plan_scoring` checks the request, ingests the drop (its manifest, quarantine and
  duplicates under OUT), resolves each magnification's model and threshold, and cuts the pending
  images into :class:`Chunk` s: small picklable records (a :class:`ScoringJob` with the model
  record and options, the chunk's ``image_id``/``sha256``/``uri``/``case_id`` columns, its part
  key). Every refusal happens here, before any image is scored. Given ``drop=`` (a drop
  already ingested under OUT) it skips the ingest: with a cluster the flow first checks the
  request and plans the drop's ingest (:func:`plan_drop_ingest`), has the workers read and check
  its partitions (``drop.check_partition``) and commits them where it runs (``drop.commit_drop``).
- :func:`run_chunk` reads, scores (and explains) one chunk and writes its part, returning what
  it wrote (:class:`ChunkResult`). Given no loaded model it loads one through
  :func:`cached_tools`, kept per process (at most :data:`WORKER_MODELS`), so a Dask worker that
  scores many chunks loads each magnification's model once. The key is fixed by the plan, not
  by which images happened to read, so every attempt at a chunk (a rerun after a lost worker,
  a Prefect retry, a second run at the same time) writes the same part file and heatmaps, and
  the last atomic write wins: no row twice, none lost.
- :func:`finish_scoring` adds up the chunk results, writes the labelled drop's batch reports
  and rebuilds the case table: the single writer of those, run once where the plan was made.

:func:`score_source` (``dala predict``, the flow's default path) runs the three in this
process. The drop check decodes every file in full anyway, so it hands the pixels to the
scorer (:class:`PixelHandoff`: resized to the model's input size, keyed by sha256, at most
:data:`HANDOFF_BYTES` held) instead of the scorer reading, hashing and decoding each file
again; files beyond that cap are read and decoded for each chunk while the model loads and the
chunk before it is scored (3.5 s against 4.0 s for a 96-image drop in 32-image chunks, 2
cores). It loads one magnification's model at a time and drops it before the next (no process
cache: a later call loads afresh, so an int8 model quantized meanwhile is seen). With a
cluster each worker measures its own precision and batch size (``precision="auto"``): each
part's metadata records what wrote it, the magnification's result the first chunk's choice (a
different one on another chunk is logged).

Explanations follow the incremental rule: rows are never rewritten, so a rerun that skips
already-scored images keeps their ``heatmap_uri``, and a rerun with ``explain=True`` over
images scored earlier **without** it does not explain them (their column stays null); to
explain those, score into another OUT, or use ``dala explain`` on a training run.

Case level (``OUT/predictions/cases/model=<m>/cases.parquet``, rebuilt from every image row on
each run): a case's probability at a magnification is the **mean** of its images' malignant
probabilities (each image's newest prediction), called malignant at ``>=`` the threshold, as
``dala_model.metrics.patient_level`` does for the report. A case seen at several
magnifications also gets a row with ``magnification`` null: the mean of its per-magnification
probabilities (each magnification weighs the same, however many images it has), called against
the mean of their thresholds, i.e. malignant when the per-magnification margins
``prob - threshold`` average to ``>= 0``.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dala_model import storage
from dala_model.data._decode import resize_rgb
from dala_model.data.ingest import canonical_source
from dala_model.data.sources import SourceImage
from dala_model.models.checkpoint import read_model_config
from dala_model.serving import evaluation
from dala_model.serving.drop import DropPlan, DropResult, decode_rgb, ingest_drop, plan_drop
from dala_model.serving.outputs import (
    CASE_SCHEMA,
    IMAGE_SCHEMA,
    ScoringLayout,
    read_image_predictions,
    scored_hashes,
)
from dala_model.serving.promotion import RegistryRecord, current_records
from dala_model.serving.scorer import Scorer, load_scorer, scoring_device

if TYPE_CHECKING:  # Grad-CAM loads when explain=True, not with scoring
    from torch import nn

    from dala_model.report.explain import CamTarget

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
DEFAULT_CHUNK_SIZE = 512  # images per part file and per Dask task: 77 MB of pixels at 224 px
# explain=True also explains benign calls this close to the threshold: a tenth of the
# probability scale, wide enough to catch the calls a reviewer would want to check and narrow
# enough that a confident benign call is not explained.
DEFAULT_UNCERTAIN_BAND = 0.1
EXPLAIN_METHODS = ("gradcam", "gradcam++")  # dala_model.report.explain.METHODS
EXPLAIN_CLASS = 1  # the malignant class: the map of every explained image
EXPLAIN_BATCH = 16  # images per Grad-CAM pass (each pass keeps its graph for the backward)
# score_source's pixel handoff from the drop check to the scorer (PixelHandoff): at most this many
# bytes of resized pixels, ~1,700 images at 224 px; a drop beyond it decodes the rest again.
HANDOFF_BYTES = 256 * 2**20


@dataclass
class MagnificationScore:
    """One magnification of one run: small enough to pass between Prefect tasks."""

    magnification: int
    images: int  # distinct images of the drop at this magnification
    quarantined: int  # the drop's files refused at this magnification (when it was known)
    scored: int = 0
    skipped: int = 0  # already scored by this model version
    unscored: int = 0  # no promoted model, or the file changed between check and scoring
    model_version: str | None = None
    threshold: float | None = None
    threshold_from: str | None = None  # argument | model card | default
    parts: list[str] = field(default_factory=list)
    report: dict | None = None
    report_uri: str | None = None
    precision: str | None = None  # what scored this run's rows (fp32, bf16, fp16, int8)
    tuning: dict | None = None  # the measured choice or the int8 model used (serving.scorer)
    explained: int = 0  # heatmaps written this run (explain=True)
    explain: dict | None = None  # method, band, class, layer; or why nothing was explained


@dataclass
class ScoringResult:
    source: str
    registry: str
    out: str
    model: str
    layout: str
    images: int
    quarantined: dict[str, int]  # reason -> files, this drop
    duplicates: int
    magnifications: list[MagnificationScore]
    cases: list[dict]  # the case rows of this drop's cases
    images_uri: str
    cases_uri: str
    heatmaps_uri: str  # the folder of heatmaps (written only with explain=True)


def _same_root(a: str, b: str) -> bool:
    return canonical_source(a).rstrip("/") == canonical_source(b).rstrip("/")


def score_source(
    source: str,
    registry: str,
    out: str,
    *,
    model: str = "dalaresnet50",
    magnification: int | None = None,
    threshold: float | None = None,
    device: str = "auto",
    precision: str = "auto",
    flow_run_id: str = "local",
    batch_size: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    workers: int | None = None,
    explain: bool = False,
    explain_method: str = "gradcam",
    uncertain_band: float = DEFAULT_UNCERTAIN_BAND,
    handoff_bytes: int = HANDOFF_BYTES,
) -> ScoringResult:
    """Check, record and score every image of ``source`` under ``out`` (see the module docstring).

    ``magnification`` fills in images whose magnification cannot be known (it does not restrict
    scoring): each image is scored by the model of its own magnification. ``precision`` is
    auto, fp32, bf16, fp16 (CUDA) or int8 (CPU); ``batch_size`` None lets the CPU measure it.

    ``explain=True`` writes a Grad-CAM overlay (``explain_method``: gradcam or gradcam++) for
    each newly scored image called malignant or within ``uncertain_band`` of the threshold and
    names it in ``heatmap_uri``; the maps are computed in float32 with the float model (at int8:
    the float checkpoint, on the CPU). Images scored by an earlier run are not re-explained,
    with or without explain then (rows are never rewritten). Needs the ``explain`` extra.

    The three steps a cluster runs apart (:func:`plan_scoring`, :func:`run_chunk` per chunk,
    :func:`finish_scoring`), here in this process, one magnification's model loaded at a time;
    the drop check hands the pixels it decoded to the scorer (:class:`PixelHandoff`, at most
    ``handoff_bytes`` held; 0: every file is read and decoded again to be scored)."""
    plan = plan_scoring(
        source,
        registry,
        out,
        model=model,
        magnification=magnification,
        threshold=threshold,
        device=device,
        precision=precision,
        flow_run_id=flow_run_id,
        batch_size=batch_size,
        chunk_size=chunk_size,
        workers=workers,
        explain=explain,
        explain_method=explain_method,
        uncertain_band=uncertain_band,
        handoff_bytes=handoff_bytes,
    )
    results, tools = [], None
    # One chunk ahead: while a model loads and while a chunk is scored, the next chunk's files
    # are read and decoded (libspng, Pillow and hashlib release the GIL), so the CPU time of
    # decoding hides in the gaps of loading and inference instead of adding to them; at most
    # two chunks' pixels are held.
    with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as prefetch:

        def decode(k: int) -> Future | None:
            if k >= len(plan.chunks):
                return None
            chunk = plan.chunks[k]
            return prefetch.submit(_pixels, chunk.frame(), chunk.job.image_size, plan.pixels)

        upcoming = decode(0)
        for k, chunk in enumerate(plan.chunks):
            if tools is None or tools.magnification != chunk.magnification:
                tools = None  # the previous magnification's model goes before the next one loads
                tools = load_tools(chunk.job)
            decoded, upcoming = upcoming.result(), decode(k + 1)
            results.append(run_chunk(chunk, tools, decoded=decoded))
    if plan.pixels is not None:
        log.info(
            "pixel handoff: %d images scored from the check's decode, %d beyond its %d MiB cap",
            plan.pixels.taken,
            plan.pixels.refused,
            plan.pixels.max_bytes // 2**20,
        )
    return finish_scoring(plan, results)


@dataclass
class ScoringJob:
    """One magnification's model and options: what each of its chunks needs, small to pickle."""

    registry: str
    out: str
    record: RegistryRecord
    magnification: int
    threshold: float
    image_size: int
    preset: str
    flow_run_id: str
    device: str
    precision: str
    batch_size: int | None
    explain: dict | None  # {"method", "band"} asked for, or None

    def tools_key(self) -> tuple:
        """What the loaded scorer and explainer depend on (:func:`cached_tools`)."""
        explain = (self.explain["method"], float(self.explain["band"])) if self.explain else None
        return (
            self.registry,
            self.out if explain else None,  # only the explainer writes under OUT
            self.record.checkpoint_uri,
            self.record.model_version,
            self.image_size,
            self.preset,
            self.device,
            self.precision,
            self.batch_size,
            explain,
        )


CHUNK_COLUMNS = ("image_id", "sha256", "uri", "case_id")  # what a chunk carries of each image


@dataclass
class Chunk:
    """One deterministic chunk of pending images: the unit of work a Dask worker is sent.

    ``rows`` holds the chunk's ``image_id``, ``sha256``, ``uri`` and ``case_id`` columns (sha256
    order); ``key`` is its part's content key, the same for every attempt at it."""

    job: ScoringJob
    index: int  # within its magnification
    key: str
    rows: dict[str, list[str]]

    @property
    def magnification(self) -> int:
        return self.job.magnification

    @property
    def part_uri(self) -> str:
        layout = ScoringLayout(self.job.out)
        folder = layout.images(
            self.job.record.model, self.job.record.model_version, self.magnification
        )
        return storage.join(folder, f"part-{self.key}.parquet")

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=CHUNK_COLUMNS)


def part_key(version: str, hashes: list[str]) -> str:
    """The content key of a part: the model version and the chunk's sorted sha256s."""
    return hashlib.sha256("\n".join([version, *hashes]).encode()).hexdigest()[:20]


def _nbytes(key: tuple[str, int]) -> int:
    """Bytes of one held image: ``size x size`` uint8 RGB."""
    return key[1] * key[1] * 3


class PixelHandoff:
    """Pixels of the images the drop check decoded, resized for their model, keyed by sha256.

    The check must decode every file in full (the only proof all its pixels are there), and the
    scorer needs the same pixels resized: without this, :func:`score_source` reads, hashes and
    decodes each file a second time. :meth:`keep` (``drop.check_partition``'s ``keep``, on the
    checking threads) resizes an image to its magnification's input size, as :func:`_pixels`
    would, and holds it while the bytes held stay within ``max_bytes``; :meth:`take` hands it
    to the scorer once and lets it go. Keyed by content, so what is scored is exactly what was
    checked. Images beyond the cap, or at a magnification no model serves, are not held and are
    read again as before; ``max_bytes=0`` holds nothing."""

    def __init__(self, sizes: dict[int, int], max_bytes: int = HANDOFF_BYTES) -> None:
        self.sizes, self.max_bytes = dict(sizes), int(max_bytes)
        self._held: dict[tuple[str, int], np.ndarray] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.kept = self.taken = self.refused = 0

    def keep(self, image: SourceImage, sha: str, rgb: np.ndarray) -> None:
        size = self.sizes.get(image.magnification)
        if size is None:
            return
        key = (sha, size)
        with self._lock:
            if key in self._held:
                return  # the same content under another name: held once
            if self._bytes + _nbytes(key) > self.max_bytes:
                self.refused += 1
                return
            self._held[key] = None  # reserved before the resize, so threads never pass the cap
            self._bytes += _nbytes(key)
        try:
            pixels = resize_rgb(rgb, size)
        except (OSError, ValueError):  # the scorer reads and decodes this one itself
            with self._lock:
                del self._held[key]
                self._bytes -= _nbytes(key)
            return
        with self._lock:
            self._held[key] = pixels
            self.kept += 1

    def take(self, sha: str, size: int) -> np.ndarray | None:
        """The held pixels of ``sha`` at ``size``, handed over once; None if not held."""
        with self._lock:
            pixels = self._held.pop((sha, size), None)
            if pixels is not None:
                self._bytes -= _nbytes((sha, size))
                self.taken += 1
            return pixels

    def retain(self, wanted: set[tuple[str, int]]) -> None:
        """Let go of everything not in ``wanted`` (images already scored, or not served)."""
        with self._lock:
            for key in [k for k, v in self._held.items() if v is not None and k not in wanted]:
                del self._held[key]
                self._bytes -= _nbytes(key)

    @property
    def held_bytes(self) -> int:
        return self._bytes


@dataclass
class ScoringPlan:
    """A drop checked and recorded, and its pending images cut into chunks (:func:`plan_scoring`).

    It stays in the process that plans and finishes; only its :class:`Chunk` s travel."""

    source: str
    registry: str  # as given: the batch reports read it (never shown: see ScoringResult)
    out: str
    model: str
    layout: str
    current: pd.DataFrame  # the drop's manifest rows
    quarantined: dict[str, int]
    duplicates: int
    flow_run_id: str
    records: dict[int, RegistryRecord]  # magnification -> the promoted model serving it
    scores: list[MagnificationScore]  # counts before scoring; finish_scoring fills the rest
    chunks: list[Chunk]
    pixels: PixelHandoff | None = None  # what the drop check decoded for the chunks (this process)


def plan_drop_ingest(
    source: str,
    registry: str,
    out: str,
    *,
    model: str = "dalaresnet50",
    magnification: int | None = None,
    threshold: float | None = None,
    device: str = "auto",
    precision: str = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    explain: bool = False,
    explain_method: str = "gradcam",
    uncertain_band: float = DEFAULT_UNCERTAIN_BAND,
) -> DropPlan:
    """The request checked as :func:`plan_scoring` checks it, then the drop's ingest planned
    (``drop.plan_drop``: ``chunk_size`` files per partition), for a cluster to check the
    partitions before :func:`plan_scoring` gets the committed drop. Nothing is read yet."""
    _check_request(
        registry,
        out,
        model=model,
        threshold=threshold,
        device=device,
        precision=precision,
        chunk_size=chunk_size,
        explain=explain,
        explain_method=explain_method,
        uncertain_band=uncertain_band,
    )
    return plan_drop(
        source, ScoringLayout(out), magnification=magnification, partition_files=chunk_size
    )


def _check_request(
    registry: str,
    out: str,
    *,
    model: str,
    threshold: float | None,
    device: str,
    precision: str,
    chunk_size: int,
    explain: bool,
    explain_method: str,
    uncertain_band: float,
) -> dict[int, RegistryRecord]:
    """Every refusal that needs no image; the promoted records by magnification."""
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if explain:
        _check_explain(explain_method, uncertain_band)
    scoring_device(device, precision)  # an impossible request fails before any work
    if _same_root(out, registry):
        raise ValueError(
            f"--out {storage.redact(out)} is the registry root: its manifests/ is the training "
            "manifest; give scoring its own root (e.g. ROOT/scoring or another bucket)"
        )
    serving = {r.magnification: r for r in current_records(registry) if r.model == model}
    if not serving:
        raise LookupError(
            f"no promoted {model} model under {storage.redact(registry)}: train one "
            f"(train-breakhis) or pin one with `dala promote {storage.redact(registry)} ...`"
        )
    return serving


def plan_scoring(
    source: str,
    registry: str,
    out: str,
    *,
    model: str = "dalaresnet50",
    magnification: int | None = None,
    threshold: float | None = None,
    device: str = "auto",
    precision: str = "auto",
    flow_run_id: str = "local",
    batch_size: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    workers: int | None = None,
    explain: bool = False,
    explain_method: str = "gradcam",
    uncertain_band: float = DEFAULT_UNCERTAIN_BAND,
    drop: DropResult | None = None,
    handoff_bytes: int = 0,
) -> ScoringPlan:
    """Check the request, ingest the drop under ``out`` and cut what is pending into chunks.

    Every refusal (bad threshold, explain without its extra, an impossible precision, OUT being
    the registry, no promoted model, overwritten weights) comes from here, before any image is
    scored. Arguments as :func:`score_source`; ``drop``: the drop already ingested under ``out``
    (:func:`plan_drop_ingest`, its partitions checked elsewhere, then ``drop.commit_drop``), which
    is then not ingested again. ``handoff_bytes`` > 0 (with ``drop`` None) keeps up to that many
    bytes of the check's decoded pixels for this process's scorer (:attr:`ScoringPlan.pixels`)."""
    serving = _check_request(
        registry,
        out,
        model=model,
        threshold=threshold,
        device=device,
        precision=precision,
        chunk_size=chunk_size,
        explain=explain,
        explain_method=explain_method,
        uncertain_band=uncertain_band,
    )
    layout = ScoringLayout(out)
    pixels = None
    if drop is None:
        if handoff_bytes > 0:
            sizes = {mag: _input_size(record) for mag, record in serving.items()}
            pixels = PixelHandoff(sizes, handoff_bytes)
        keep = pixels.keep if pixels is not None else None
        drop = ingest_drop(source, layout, magnification=magnification, workers=workers, keep=keep)
    refused = pd.DataFrame(drop.quarantined, columns=["reason", "magnification"])
    asked = {"method": explain_method, "band": uncertain_band} if explain else None
    scores, chunks = [], []
    for mag in sorted(set(drop.current["magnification"].astype(int)) | set(serving)):
        rows = drop.current[drop.current["magnification"] == mag]
        score = MagnificationScore(
            mag, len(rows), int((refused["magnification"] == mag).sum()), unscored=len(rows)
        )
        scores.append(score)
        record = serving.get(mag)
        score.model_version = record.model_version if record is not None else None
        if record is None or rows.empty:
            if record is None and len(rows):
                log.warning("%d images at %dX but no promoted %s model", len(rows), mag, model)
            continue
        version = record.model_version
        score.threshold, score.threshold_from = resolve_threshold(record, threshold)
        done = scored_hashes(layout.out, record.model, version)
        pending = rows[~rows["sha256"].isin(done)].sort_values("sha256").reset_index(drop=True)
        score.skipped, score.unscored = len(rows) - len(pending), 0
        if pending.empty:
            continue
        checkpoint = record.checkpoint_uri
        card = read_model_config(checkpoint)
        if card["weights_sha256"] != version:
            raise ValueError(
                f"{storage.redact(checkpoint)} no longer holds model_version {version[:12]}: the "
                "run folder was overwritten; promote the run again (`dala promote`)"
            )
        job = ScoringJob(
            registry=registry,
            out=out,
            record=record,
            magnification=mag,
            threshold=score.threshold,
            image_size=_input_size(record, card),
            preset=record.config.get("preset") or card["preset"],
            flow_run_id=flow_run_id,
            device=device,
            precision=precision,
            batch_size=batch_size,
            explain=asked,
        )
        for index, start in enumerate(range(0, len(pending), chunk_size)):
            part = pending.iloc[start : start + chunk_size]
            cells = {c: part[c].astype(str).tolist() for c in CHUNK_COLUMNS}
            chunks.append(Chunk(job, index, part_key(version, cells["sha256"]), cells))
    if pixels is not None:
        pixels.retain({(sha, c.job.image_size) for c in chunks for sha in c.rows["sha256"]})
    return ScoringPlan(
        source=drop.source,
        registry=registry,
        out=out,
        model=model,
        layout=drop.layout,
        current=drop.current,
        quarantined={k: int(v) for k, v in refused["reason"].value_counts().sort_index().items()},
        duplicates=drop.duplicates,
        flow_run_id=flow_run_id,
        records=serving,
        scores=scores,
        chunks=chunks,
        pixels=pixels,
    )


def _input_size(record: RegistryRecord, card: dict | None = None) -> int:
    """The side, in pixels, that ``record``'s model scores at: its training config's, else the
    model card's."""
    size = record.config.get("image_size")
    return int(size or (card or read_model_config(record.checkpoint_uri))["input_size"])


@dataclass
class ChunkTools:
    """One magnification's loaded scorer (and explainer), and the part metadata they imply."""

    magnification: int
    scorer: Scorer
    explainer: Explainer | None
    explain: dict | None  # the explain record (or why nothing is explained); None: not asked
    metadata: dict[str, str]


def load_tools(job: ScoringJob) -> ChunkTools:
    """Load the promoted model of ``job`` as asked (precision, device), and its explainer."""
    record = job.record
    run = {"device": job.device, "precision": job.precision, "batch_size": job.batch_size}
    scorer = load_scorer(job.registry, record, image_size=job.image_size, preset=job.preset, **run)
    metadata = {"dala.precision": scorer.precision, "dala.tuning": scorer.tuning.get("label", "")}
    explainer, explain = None, None
    if job.explain is not None:
        explainer, explain = _explainer(
            ScoringLayout(job.out), record, scorer, job.explain, job.magnification, job.preset
        )
        metadata["dala.explain"] = json.dumps(explain, sort_keys=True)
    return ChunkTools(job.magnification, scorer, explainer, explain, metadata)


# Loaded models, per process, for workers that score many chunks (run_chunk without tools):
# one entry per magnification of a BreakHis drop, the least recently used dropped beyond that.
WORKER_MODELS = 4
_TOOLS: OrderedDict[tuple, ChunkTools] = OrderedDict()
_TOOLS_LOCK = threading.Lock()  # also makes two threads of one worker load a model once
_TOOLS_STATS = {"loads": 0, "hits": 0}


def cached_tools(job: ScoringJob) -> ChunkTools:
    """:func:`load_tools` once per process and :meth:`ScoringJob.tools_key`."""
    key = job.tools_key()
    with _TOOLS_LOCK:
        if key in _TOOLS:
            _TOOLS.move_to_end(key)
            _TOOLS_STATS["hits"] += 1
            return _TOOLS[key]
        tools = load_tools(job)
        _TOOLS[key] = tools
        _TOOLS_STATS["loads"] += 1
        while len(_TOOLS) > WORKER_MODELS:
            _TOOLS.popitem(last=False)
        return tools


def tools_cache_info() -> dict[str, int]:
    """This process's model cache: ``loads``, ``hits`` and the models held (``size``)."""
    with _TOOLS_LOCK:
        return {**_TOOLS_STATS, "size": len(_TOOLS)}


def run_chunk(
    chunk: Chunk,
    tools: ChunkTools | None = None,
    *,
    decoded: tuple[np.ndarray, np.ndarray] | None = None,
) -> ChunkResult:
    """Score one chunk and write its part; ``tools`` None loads (or reuses) this process's model.

    ``decoded`` is the chunk's ``_pixels`` already read (:func:`score_source` reads one chunk
    ahead); None reads them here.

    Safe to run again, and twice at once: an attempt writes its heatmaps and then its part under
    the chunk's own key, atomically, so a rerun replaces what an earlier one wrote."""
    job = chunk.job
    tools = tools or cached_tools(job)
    result = _score_chunk(
        chunk.frame(),
        scorer=tools.scorer,
        size=job.image_size,
        model_name=job.record.model,
        version=job.record.model_version,
        magnification=job.magnification,
        threshold=job.threshold,
        flow_run_id=job.flow_run_id,
        part_uri=chunk.part_uri,
        metadata=tools.metadata,
        explainer=tools.explainer,
        decoded=decoded,
    )
    result.magnification = job.magnification
    result.precision, result.tuning = tools.scorer.precision, tools.scorer.tuning
    result.explain = tools.explain
    return result


def finish_scoring(plan: ScoringPlan, results: list[ChunkResult]) -> ScoringResult:
    """Count what the chunks wrote, write the batch reports and rebuild the case table.

    ``results`` are :func:`run_chunk`'s, one per chunk of ``plan`` in its order. The single
    writer of the run: this runs once, in the process that planned."""
    if len(results) != len(plan.chunks):
        raise ValueError(
            f"finish_scoring got {len(results)} chunk results for {len(plan.chunks)} chunks"
        )
    layout = ScoringLayout(plan.out)
    scores = copy.deepcopy(plan.scores)  # the plan is left as it was: a retry adds up afresh
    by_mag = {s.magnification: s for s in scores}
    for k, (chunk, result) in enumerate(zip(plan.chunks, results, strict=True)):
        if result.magnification != chunk.magnification or result.part not in (None, chunk.part_uri):
            raise ValueError(
                f"chunk result {k} ({storage.redact(result.part or 'no part')}) is not chunk {k} "
                f"of this plan "
                f"({storage.redact(chunk.part_uri)}): pass run_chunk's results in plan order"
            )
        score = by_mag[chunk.magnification]
        score.scored += result.scored
        score.unscored += result.unscored
        score.explained += result.explained
        if result.part is not None:
            score.parts.append(result.part)
        if score.precision is None:
            score.precision, score.tuning, score.explain = (
                result.precision,
                result.tuning,
                result.explain,
            )
        elif (result.tuning or {}).get("label") != (score.tuning or {}).get("label"):
            log.warning(
                "%dX: chunk %d scored with %s, an earlier one with %s (workers measured "
                "differently); each part's metadata records its own",
                chunk.magnification,
                chunk.index,
                (result.tuning or {}).get("label"),
                (score.tuning or {}).get("label"),
            )
    for score in scores:
        record = plan.records.get(score.magnification)
        rows = plan.current[plan.current["magnification"] == score.magnification]
        if record is None or rows.empty:
            continue
        score.report, score.report_uri = evaluation.batch_report(
            plan.registry,
            layout,
            record,
            rows,
            plan.flow_run_id,
            score.threshold,
            scored_with={"precision": score.precision, "tuning": score.tuning},
        )
    cases = rebuild_cases(layout, plan.model)
    drop_cases = cases[cases["case_id"].isin(set(plan.current["case_id"]))]
    return ScoringResult(
        source=plan.source,
        registry=storage.redact(plan.registry),
        out=storage.redact(plan.out),
        model=plan.model,
        layout=plan.layout,
        images=len(plan.current),
        quarantined=plan.quarantined,
        duplicates=plan.duplicates,
        magnifications=scores,
        cases=json.loads(drop_cases.to_json(orient="records", date_format="iso")),
        images_uri=layout.images(plan.model),
        cases_uri=layout.cases(plan.model),
        heatmaps_uri=layout.heatmaps(plan.model),
    )


def resolve_threshold(record: RegistryRecord, override: float | None) -> tuple[float, str]:
    """The threshold to call malignant at, and where it came from."""
    if override is not None:
        return float(override), "argument"
    card = read_model_config(record.checkpoint_uri).get("card", {})
    if card.get("threshold") is not None:
        return float(card["threshold"]), "model card"
    return DEFAULT_THRESHOLD, "default"


def _check_explain(method: str, band: float) -> None:
    """Refuse an explain request that cannot work, before any image is read."""
    if method not in EXPLAIN_METHODS:
        raise ValueError(f"explain_method must be one of {EXPLAIN_METHODS}, got {method!r}")
    if not 0.0 <= band < 1.0:
        raise ValueError(f"uncertain_band must lie in [0, 1), got {band}")
    if importlib.util.find_spec("pytorch_grad_cam") is None:
        raise ModuleNotFoundError(
            "explain=True needs the grad-cam package: pip install -c constraints.txt -e "
            "'.[explain]' (or score without explain)"
        )


@dataclass
class Explainer:
    """What a chunk needs to write heatmaps: a float32 model, where to read it, where to write."""

    model: nn.Module
    target: CamTarget
    method: str
    band: float
    preset: str
    layout: ScoringLayout
    model_name: str
    version: str
    magnification: int

    def record(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "band": self.band,
            "class": EXPLAIN_CLASS,
            "layer": self.target.layer,
            "reshape": self.target.reshape,
        }


def _explainer(
    layout: ScoringLayout,
    record: RegistryRecord,
    scorer: Scorer,
    asked: dict,
    magnification: int,
    preset: str,
) -> tuple[Explainer | None, dict]:
    """The explainer of one magnification's model, or None and why (logged), never an error."""
    import torch

    from dala_model.models.checkpoint import load_model
    from dala_model.report.explain import ExplanationNotSupported, cam_target_of

    try:
        target = cam_target_of(record.model)
    except ExplanationNotSupported as exc:
        log.warning("%dX: no heatmaps, heatmap_uri stays null: %s", magnification, exc)
        return None, {**asked, "not_explained": str(exc)}
    model = scorer.model
    floats = {p.dtype for p in model.parameters()}
    if scorer.precision == "int8" or floats != {torch.float32}:
        # The int8 model has no float gradients: the maps come from the float weights, on the CPU.
        model = load_model(record.checkpoint_uri, map_location="cpu").float()
    explainer = Explainer(
        model,
        target,
        asked["method"],
        float(asked["band"]),
        preset,
        layout,
        record.model,
        record.model_version,
        magnification,
    )
    return explainer, explainer.record()


@dataclass
class ChunkResult:
    """What one chunk wrote: its part (None when no image of it could be read), counts, and
    what scored it (:func:`run_chunk` fills the last four)."""

    part: str | None
    scored: int
    unscored: int
    explained: int
    magnification: int | None = None
    precision: str | None = None
    tuning: dict | None = None
    explain: dict | None = None


def _score_chunk(
    chunk: pd.DataFrame,
    *,
    scorer: Scorer,
    size: int,
    model_name: str,
    version: str,
    magnification: int,
    threshold: float,
    flow_run_id: str,
    part_uri: str,
    metadata: dict[str, str],
    explainer: Explainer | None = None,
    decoded: tuple[np.ndarray, np.ndarray] | None = None,
) -> ChunkResult:
    """Read, score (and explain) one chunk of pending images and write its part at ``part_uri``.

    Everything it needs comes in as arguments and what it wrote comes back (:func:`run_chunk`
    gives it a chunk's own key and loaded model). Heatmaps are written before the part that
    names them."""
    pixels, ok = decoded if decoded is not None else _pixels(chunk, size)
    if len(pixels) != len(chunk):
        raise ValueError(f"decoded pixels for {len(pixels)} images, the chunk has {len(chunk)}")
    unscored = int((~ok).sum())
    chunk, pixels = chunk[ok], pixels[ok]
    if chunk.empty:
        return ChunkResult(None, 0, unscored, 0)
    prob = scorer.proba(pixels)
    pred = (prob >= threshold).astype(np.int8)
    heatmaps: list[str | None] = [None] * len(chunk)
    if explainer is not None:
        heatmaps = _explain_chunk(explainer, chunk["sha256"].tolist(), pixels, prob, threshold)
    frame = pd.DataFrame(
        {
            "image_id": chunk["image_id"].to_numpy(),
            "sha256": chunk["sha256"].to_numpy(),
            "uri": chunk["uri"].to_numpy(),
            "case_id": chunk["case_id"].to_numpy(),
            "magnification": magnification,
            "prob_malignant": prob,
            "pred_label": pred,
            "threshold": threshold,
            "model_name": model_name,
            "model_version": version,
            "scored_at": pd.Timestamp(datetime.now(UTC)),
            "flow_run_id": flow_run_id,
            "heatmap_uri": pd.Series(heatmaps, dtype=object),
        }
    )
    storage.write_parquet_atomic(frame, part_uri, schema=IMAGE_SCHEMA, metadata=metadata)
    explained = sum(h is not None for h in heatmaps)
    log.info(
        "scored %d images at %dX (%d heatmaps) -> %s",
        len(frame),
        magnification,
        explained,
        storage.redact(part_uri),
    )
    return ChunkResult(part_uri, len(frame), unscored, explained)


def _explain_chunk(
    explainer: Explainer,
    hashes: list[str],
    pixels: np.ndarray,
    prob: np.ndarray,
    threshold: float,
) -> list[str | None]:
    """Write the overlays of the chunk's malignant and uncertain images; their uris, else None."""
    from dala_model.report.explain import cam_maps, overlay_png

    picked = np.flatnonzero((prob >= threshold) | (np.abs(prob - threshold) <= explainer.band))
    out: list[str | None] = [None] * len(hashes)
    if not len(picked):
        return out
    try:
        maps = cam_maps(
            explainer.model,
            explainer.target,
            pixels[picked],
            explainer.preset,
            [EXPLAIN_CLASS] * len(picked),
            explainer.method,
            EXPLAIN_BATCH,
        )
    except Exception as exc:  # noqa: BLE001 - a map that cannot be made never stops scoring
        log.warning(
            "%dX: %d images could not be explained, heatmap_uri stays null (%s: %s)",
            explainer.magnification,
            len(picked),
            type(exc).__name__,
            exc,
        )
        return out
    for i, cam in zip(picked, maps, strict=True):
        uri = explainer.layout.heatmap(
            explainer.model_name,
            explainer.version,
            explainer.magnification,
            hashes[i],
            explainer.method,
        )
        storage.write_bytes_atomic(uri, overlay_png(pixels[i], cam))
        out[i] = uri
    return out


def _pixels(
    chunk: pd.DataFrame, size: int, handoff: PixelHandoff | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NHWC pixels of ``chunk`` and which rows decoded to the content that was checked:
    from ``handoff`` where it holds them (that content, by sha256), else read and decoded."""

    def one(row: tuple[str, str]) -> np.ndarray | None:
        uri, sha = row
        held = handoff.take(sha, size) if handoff is not None else None
        if held is not None:
            return held
        try:
            data = storage.read_bytes(uri)
            if hashlib.sha256(data).hexdigest() != sha:
                log.warning("%s changed since it was checked: next run", storage.redact(uri))
                return None
            return resize_rgb(decode_rgb(data)[0], size)
        except (FileNotFoundError, OSError, ValueError) as exc:
            log.warning("%s cannot be scored now (%s): next run", storage.redact(uri), exc)
            return None

    out = np.zeros((len(chunk), size, size, 3), dtype=np.uint8)
    ok = np.zeros(len(chunk), dtype=bool)
    rows = zip(chunk["uri"], chunk["sha256"], strict=True)
    with ThreadPoolExecutor() as pool:  # Pillow and hashlib release the GIL
        for i, pixels in enumerate(pool.map(one, rows)):
            if pixels is not None:
                out[i], ok[i] = pixels, True
    return out, ok


def case_table(images: pd.DataFrame) -> pd.DataFrame:
    """Case rows from image predictions (see the module docstring for the aggregate)."""
    if images.empty:
        return CASE_SCHEMA.empty_table().to_pandas()
    newest = images.sort_values("scored_at").drop_duplicates(
        ["sha256", "magnification"], keep="last"
    )
    per_mag = newest.groupby(["case_id", "magnification"], sort=True).agg(
        n_images=("sha256", "nunique"),
        prob_malignant=("prob_malignant", "mean"),
        threshold=("threshold", "mean"),
        model_name=("model_name", "first"),
        model_version=("model_version", lambda v: ",".join(sorted(set(v)))),
        scored_at=("scored_at", "max"),
    )
    per_mag = per_mag.reset_index()
    several = per_mag.groupby("case_id").filter(lambda g: len(g) > 1)
    across = several.groupby("case_id", sort=True).agg(
        n_images=("n_images", "sum"),
        prob_malignant=("prob_malignant", "mean"),
        threshold=("threshold", "mean"),
        model_name=("model_name", "first"),
        model_version=("model_version", lambda v: ",".join(sorted(set(",".join(v).split(","))))),
        scored_at=("scored_at", "max"),
    )
    across = across.reset_index().assign(magnification=None)
    table = pd.concat([f for f in (per_mag, across) if len(f)], ignore_index=True)
    table["pred_label"] = (table["prob_malignant"] >= table["threshold"]).astype(np.int8)
    table["magnification"] = table["magnification"].astype("Int16")
    return table.sort_values(["case_id", "magnification"], na_position="last", ignore_index=True)[
        CASE_SCHEMA.names
    ]


def rebuild_cases(layout: ScoringLayout, model: str) -> pd.DataFrame:
    """Recompute and write ``model``'s case table from every image prediction under OUT."""
    table = case_table(read_image_predictions(layout.out, model))
    storage.write_parquet_atomic(table, layout.cases(model), schema=CASE_SCHEMA)
    return table
