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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from dala_model import runs, storage
from dala_model.metrics import MONITORS, monitor_score


# TrainConfig.monitor -> (key in run.json's metrics.val, sign that makes larger better)
@dataclass(frozen=True)
class Promotion:
    """The outcome of :func:`promote`: whether the candidate now serves, why, and its record."""

    promoted: bool
    reason: str
    record: dict
    previous: dict | None


def registry_uri(root: str, model: str, magnification: int) -> str:
    return storage.join(root, "models", model, str(int(magnification)))


def current(root: str, model: str, magnification: int) -> dict | None:
    """The serving record of (model, magnification), or None when nothing was promoted yet."""
    uri = storage.join(registry_uri(root, model, magnification), "current.json")
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def list_current(root: str) -> list[dict]:
    """Every serving record under ``root``, sorted by model then magnification."""
    base = storage.join(root, "models")
    try:
        uris = storage.list_files(base, suffixes=(".json",))
    except FileNotFoundError:
        return []
    records = [json.loads(storage.read_bytes(u)) for u in uris if u.endswith("/current.json")]
    return sorted(records, key=lambda r: (r["model"], r["magnification"]))


def promotions(root: str, model: str, magnification: int) -> list[dict]:
    """The promotion log of (model, magnification), oldest first."""
    base = storage.join(registry_uri(root, model, magnification), "promotions")
    try:
        uris = storage.list_files(base, suffixes=(".json",))
    except FileNotFoundError:
        return []
    return [json.loads(storage.read_bytes(u)) for u in uris]


def model_version(best_uri: str) -> str:
    """sha256 of the checkpoint's weights (recorded in its config, verified by ``load_model``)."""
    from dala_model.models.checkpoint import (
        read_model_config,  # torch: only when a model is involved
    )

    return read_model_config(best_uri)["weights_sha256"]


def ranking_score(summary: dict) -> float:
    """A completed run's validation score on its own monitor, oriented so that larger is better."""
    return monitor_score(
        summary["config"].get("monitor", "val_accuracy"), summary["metrics"]["val"]
    )


def candidate_record(run_uri: str) -> dict:
    """The registry record a completed run would get, read from its ``run.json`` and ``best/``."""
    summary = runs.read_summary(run_uri)
    if summary is None:
        raise FileNotFoundError(
            f"{storage.redact(storage.join(run_uri, runs.SUMMARY))} does not exist: only a "
            "completed training run can be promoted; finish it with `dala train ... --resume` first"
        )
    if summary.get("status") != "complete":
        raise ValueError(
            f"run {storage.redact(run_uri)} has status {summary.get('status')!r}, not 'complete'"
        )
    best_uri = storage.join(run_uri, "best")
    monitor = summary["config"].get("monitor", "val_accuracy")
    key, _ = MONITORS[monitor]
    return {
        "model": summary["model"],
        "magnification": int(summary["magnification"]),
        "model_version": model_version(best_uri),
        "checkpoint_uri": best_uri,
        "run_id": summary["run_id"],
        "run_uri": run_uri,
        "monitor": monitor,
        "score": summary["metrics"]["val"][key],
        "metrics": summary["metrics"],
        "config": summary["config"],
        "data_version": summary["data_version"],
        "code_version": summary["code_version"],
        "best_epoch": summary["best_epoch"],
    }


def promote(root: str, run_uri: str, *, force: bool = False, reason: str = "") -> Promotion:
    """Make the run's best checkpoint current when none is, when it beats the current one, or when forced.

    "Beats" compares the candidate's validation metric named by its own ``monitor`` with the
    current record's value of the same metric; ties keep the current model, so re-promoting the
    same run is a no-op. ``force`` pins the candidate regardless (an operator's explicit choice).
    """
    candidate = candidate_record(run_uri)
    model, magnification = candidate["model"], candidate["magnification"]
    previous = current(root, model, magnification)
    decision = _decide(candidate, previous, force)
    if decision is None:
        return Promotion(False, _why_not(candidate, previous), previous or {}, previous)
    now = datetime.now(UTC)
    record = {
        **candidate,
        "promoted_at": now.isoformat(),
        "reason": reason or decision,
        "previous_version": previous["model_version"] if previous else None,
    }
    base = registry_uri(root, model, magnification)
    log_key = f"{now:%Y%m%dT%H%M%S%fZ}-{record['model_version'][:12]}.json"
    payload = json.dumps(record, indent=2, sort_keys=True, default=float).encode()
    storage.write_bytes_atomic(storage.join(base, "promotions", log_key), payload)
    storage.write_bytes_atomic(storage.join(base, "current.json"), payload)
    return Promotion(True, record["reason"], record, previous)


def _decide(candidate: dict, previous: dict | None, force: bool) -> str | None:
    if force:
        return "forced by operator"
    if previous is None:
        return "first model for this magnification"
    if previous["model_version"] == candidate["model_version"]:
        return None
    key, sign = MONITORS[candidate["monitor"]]
    theirs = previous["metrics"]["val"].get(key)
    if theirs is None or sign * candidate["metrics"]["val"][key] > sign * theirs:
        return f"{candidate['monitor']} {candidate['metrics']['val'][key]:.4f} beats {theirs}"
    return None


def _why_not(candidate: dict, previous: dict | None) -> str:
    if previous is not None and previous["model_version"] == candidate["model_version"]:
        return "already current"
    key, _ = MONITORS[candidate["monitor"]]
    return (
        f"{candidate['monitor']} {candidate['metrics']['val'][key]:.4f} does not beat the current "
        f"{previous['metrics']['val'].get(key) if previous else None}"
    )
