"""A small model registry in storage: which checkpoint serves each (model, magnification).

Layout under a root URL::

    ROOT/models/<model>/<magnification>/current.json                  the serving pointer
    ROOT/models/<model>/<magnification>/promotions/<time>-<version>.json   one object per promotion

``current.json`` is replaced atomically, so batch inference always reads a complete record. The
promotion log is append-only by construction: every promotion writes a new object with a unique,
time-ordered key instead of appending to one file, because object stores cannot append and two
writers appending to one object would lose each other's lines.

``model_version`` is the sha256 of the checkpoint's weights file: it names exactly the
weights that produced a prediction, independent of run names, so predictions stay attributable
after a run folder is reused or a model is re-promoted.

Concurrency: two promotions of the same (model, magnification) racing each other both compare
against the pointer they read; the later write wins and both appear in the log. Promotions are
rare, operator- or flow-driven events, so no lock service is worth its cost here.

Both files hold one :class:`RegistryRecord` (with a ``schema_version``; pointers written before it
existed load as version 1): batch inference and ``dala models current`` read the typed record,
so a pointer with an unknown or missing key fails naming the file. :func:`current`,
:func:`list_current` and :func:`promotions` still return the raw dicts for older callers.

MLflow, when tracking is configured, mirrors this registry: each committed promotion registers
the version under ``<model>-<magnification>x`` with the alias ``champion``, and
:func:`current_records` also reads ``models:/<model>@champion`` (``dala_model.tracking.registry``).
This registry stays the source of truth: the mirror runs after the pointer is committed and
never fails a promotion.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dala_model import modelcard, runs, storage
from dala_model.layout import CURRENT, RootLayout
from dala_model.metrics import MONITORS, monitor_score
from dala_model.runs import Record, RunMetrics, RunSummary, VersionedRecord

log = logging.getLogger(__name__)


class Candidate(Record):
    """What a completed run would serve as: its checkpoint, scores and provenance."""

    model: str
    magnification: int
    model_version: str  # sha256 of the checkpoint's weights file
    checkpoint_uri: str
    run_id: str
    run_uri: str
    monitor: str  # the run's TrainConfig.monitor; ``score`` is its metric in metrics.val
    score: float
    metrics: RunMetrics
    config: dict[str, Any]
    data_version: str
    code_version: str
    best_epoch: int

    def val(self, monitor: str) -> float | None:
        """This record's validation value of ``monitor``'s metric, or None when it has none."""
        return self.metrics.val.get(MONITORS[monitor][0])


class RegistryRecord(VersionedRecord, Candidate):
    """``current.json`` and each ``promotions/*.json``: a candidate as and when it was promoted."""

    promoted_at: str  # ISO 8601, UTC
    reason: str
    previous_version: str | None  # the model_version it replaced


@dataclass(frozen=True)
class Promotion:
    """The outcome of :func:`promote`: whether the candidate now serves, why, and what serves."""

    promoted: bool
    reason: str
    current: RegistryRecord | None  # the candidate when promoted, else the record kept serving
    previous: RegistryRecord | None

    @property
    def record(self) -> dict:
        """``current`` as a dict ({} when nothing serves), for callers not yet on the record."""
        return self.current.model_dump() if self.current is not None else {}


def registry_uri(root: str, model: str, magnification: int) -> str:
    return RootLayout(root).registry(model, magnification)


def current_record(root: str, model: str, magnification: int) -> RegistryRecord | None:
    """The serving record of (model, magnification), or None when nothing was promoted yet."""
    uri = RootLayout(root).current_pointer(model, magnification)
    return RegistryRecord.load(uri) if storage.exists(uri) else None


def current_records(root: str) -> list[RegistryRecord]:
    """Every serving record under ``root``, sorted by model then magnification.

    ``root`` may also be an MLflow ``models:/<model>@champion`` URI (or one registered model's,
    ``models:/<model>-<M>x@champion``): the records then come from MLflow's registry, each
    checkpoint downloaded to a local cache (``dala_model.tracking.registry.resolve``)."""
    if root.startswith("models:/"):
        from dala_model.tracking.registry import resolve

        return resolve(root)
    records = [RegistryRecord.load(uri) for uri in _pointers(root)]
    return sorted(records, key=lambda r: (r.model, r.magnification))


def promotion_records(root: str, model: str, magnification: int) -> list[RegistryRecord]:
    """The promotion log of (model, magnification), oldest first."""
    return [RegistryRecord.load(uri) for uri in _log(root, model, magnification)]


def current(root: str, model: str, magnification: int) -> dict | None:
    """:func:`current_record` as the raw dict in ``current.json``, unchecked."""
    uri = RootLayout(root).current_pointer(model, magnification)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def list_current(root: str) -> list[dict]:
    """:func:`current_records` as the raw dicts, unchecked."""
    records = [json.loads(storage.read_bytes(uri)) for uri in _pointers(root)]
    return sorted(records, key=lambda r: (r["model"], r["magnification"]))


def promotions(root: str, model: str, magnification: int) -> list[dict]:
    """:func:`promotion_records` as the raw dicts, unchecked."""
    return [json.loads(storage.read_bytes(uri)) for uri in _log(root, model, magnification)]


def _pointers(root: str) -> list[str]:
    try:
        uris = storage.list_files(RootLayout(root).models(), suffixes=(".json",))
    except FileNotFoundError:
        return []
    return [uri for uri in uris if uri.endswith(f"/{CURRENT}")]


def _log(root: str, model: str, magnification: int) -> list[str]:
    try:
        return storage.list_files(
            RootLayout(root).promotion_log(model, magnification), suffixes=(".json",)
        )
    except FileNotFoundError:
        return []


def model_version(best_uri: str) -> str:
    """sha256 of the checkpoint's weights (recorded in its config, verified by ``load_model``)."""
    from dala_model.models.checkpoint import (
        read_model_config,  # torch: only when a model is involved
    )

    return read_model_config(best_uri)["weights_sha256"]


def ranking_score(summary: RunSummary) -> float:
    """A completed run's validation score on its own monitor, oriented so that larger is better."""
    return monitor_score(summary.monitor, summary.metrics.val)


def candidate_record(run_uri: str) -> Candidate:
    """The registry record a completed run would get, read from its ``run.json`` and ``best/``."""
    summary = runs.load_summary(run_uri)
    if summary is None:
        raise FileNotFoundError(
            f"{storage.redact(storage.join(run_uri, runs.SUMMARY))} does not exist: only a "
            "completed training run can be promoted; finish it with `dala train ... --resume` first"
        )
    if not summary.complete:
        raise ValueError(
            f"run {storage.redact(run_uri)} has status {summary.status!r}, not 'complete'"
        )
    best_uri = storage.join(run_uri, runs.BEST)
    key, _ = MONITORS[summary.monitor]
    return Candidate(
        model=summary.model,
        magnification=summary.magnification,
        model_version=model_version(best_uri),
        checkpoint_uri=best_uri,
        run_id=summary.run_id,
        run_uri=run_uri,
        monitor=summary.monitor,
        score=summary.metrics.val[key],
        metrics=summary.metrics,
        config=summary.config,
        data_version=summary.data_version,
        code_version=summary.code_version,
        best_epoch=summary.best_epoch,
    )


def promote(
    root: str,
    run_uri: str,
    *,
    force: bool = False,
    reason: str = "",
    tracking_uri: str | None = None,
) -> Promotion:
    """Make the run's best checkpoint current when none is, when it beats the current one, or when forced.

    "Beats" compares the candidate's validation metric named by its own ``monitor`` with the
    current record's value of the same metric; ties keep the current model, so re-promoting the
    same run is a no-op. ``force`` pins the candidate regardless (an operator's explicit choice).

    With MLflow tracking configured (``tracking_uri``, else ``$MLFLOW_TRACKING_URI``) the
    committed record is then mirrored into MLflow's registry (``dala_model.tracking.registry``):
    guarded, so MLflow failing never fails a promotion. A no-op re-promotion of the current
    model mirrors it again, which is how a mirror missed while MLflow was down catches up.
    """
    candidate = candidate_record(run_uri)
    previous = current_record(root, candidate.model, candidate.magnification)
    decision = _decide(candidate, previous, force)
    if decision is None:
        if previous is not None and previous.model_version == candidate.model_version:
            _mirror(previous, tracking_uri)
            if not storage.exists(_card_uri(root, previous)):  # promoted before cards existed
                _write_card(root, previous)
        return Promotion(False, _why_not(candidate, previous), previous, previous)
    now = datetime.now(UTC)
    record = RegistryRecord(
        **dict(candidate),
        promoted_at=now.isoformat(),
        reason=reason or decision,
        previous_version=previous.model_version if previous else None,
    )
    layout = RootLayout(root)
    log_key = f"{now:%Y%m%dT%H%M%S%fZ}-{record.model_version[:12]}.json"
    payload = json.dumps(record.model_dump(), indent=2, sort_keys=True, default=float).encode()
    storage.write_bytes_atomic(
        storage.join(layout.promotion_log(record.model, record.magnification), log_key), payload
    )
    storage.write_bytes_atomic(layout.current_pointer(record.model, record.magnification), payload)
    _write_card(root, record)
    _mirror(record, tracking_uri)
    return Promotion(True, record.reason, record, previous)


def _mirror(record: RegistryRecord, tracking_uri: str | None) -> None:
    """MLflow's registry follows ours when tracking is configured; it never fails a promotion."""
    from dala_model.tracking import tracking_uri as configured

    if configured(tracking_uri) is None:
        return
    try:
        from dala_model.tracking.registry import mirror_promotion

        mirror_promotion(record, tracking_uri)
    except Exception:  # noqa: BLE001 - the storage registry has committed; MLflow only mirrors
        log.exception("mirroring the promotion of %s into MLflow failed", record.model_version[:12])


def _card_uri(root: str, record: RegistryRecord) -> str:
    folder = RootLayout(root).registry(record.model, record.magnification)
    return storage.join(folder, modelcard.MODEL_CARD_FILE)


def _write_card(root: str, record: RegistryRecord) -> None:
    """``MODEL_CARD.md`` beside the pointer (``dala_model.modelcard``), from the served checkpoint.

    Written after the pointer is committed, and derived from the checkpoint alone: a failure here
    is logged, not raised, since the promotion has happened; re-promoting the same run writes
    the missing card."""
    folder = RootLayout(root).registry(record.model, record.magnification)
    try:
        modelcard.write_model_card(record.checkpoint_uri, folder)
    except (OSError, ValueError) as exc:
        log.warning(
            "promoted %s but could not write its MODEL_CARD.md under %s: %s",
            record.model_version[:12],
            storage.redact(folder),
            exc,
        )


def _decide(candidate: Candidate, previous: RegistryRecord | None, force: bool) -> str | None:
    if force:
        return "forced by operator"
    if previous is None:
        return "first model for this magnification"
    if previous.model_version == candidate.model_version:
        return None
    _, sign = MONITORS[candidate.monitor]
    theirs = previous.val(candidate.monitor)
    if theirs is None or sign * candidate.score > sign * theirs:
        return f"{candidate.monitor} {candidate.score:.4f} beats {theirs}"
    return None


def _why_not(candidate: Candidate, previous: RegistryRecord | None) -> str:
    if previous is not None and previous.model_version == candidate.model_version:
        return "already current"
    theirs = previous.val(candidate.monitor) if previous else None
    return f"{candidate.monitor} {candidate.score:.4f} does not beat the current {theirs}"
