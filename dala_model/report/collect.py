"""Reading run folders back for the report: every complete run as a ``Run`` record.

Only runs whose ``run.json`` says ``complete`` enter the tables; the others come back as status
rows, which the report lists. A complete summary that lacks what the tables need fails here,
naming its file, rather than deep inside a table; a missing history or predictions file is
only a problem worth showing (its curves or ROC are left out). Every complete summary is also
checked against ``dala_model.runs.RunSummary`` (unknown or mistyped keys fail here, naming the
file), though the report reads the raw dict so that it keeps working on summaries written before
a key existed.

Each run knows which runs it may be averaged with: ``config_hash`` (recorded by the engine, or
computed the same way from the recorded config and split grouping for runs that predate it), and
which it may share a table with: ``setting_hash`` (the same minus model, options and
magnification). Runs written before ``iba_macro`` existed get it filled in from ``gmean``: on two
classes imbalanced-learn's default (macro) IBA *is* G-mean, so this changes no number.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import pandas as pd

from dala_model import storage
from dala_model.engine.config import config_hash, setting_hash
from dala_model.paper import MAGNIFICATIONS
from dala_model.runs import SUMMARY, RunSummary, list_runs, runs_uri

log = logging.getLogger(__name__)

# Intervals the report shows, from those every run records (dala_model.evaluation.evaluate's
# defaults). The paper's IBA is imbalanced-learn's default form, which equals G-mean on two
# classes, so G-mean's interval is also that IBA's.
CI_METRICS = (("accuracy", "Accuracy"), ("gmean", "G-mean"))
_REQUIRED = ("model", "magnification", "scheme", "metrics")


@dataclass
class Run:
    """One complete run: its summary (``run.json``) and, when present, history and predictions."""

    run_id: str
    summary: dict[str, Any]
    history: pd.DataFrame | None
    predictions: pd.DataFrame | None
    # Metrics that runs of this age lack and the report filled in (``iba_macro`` from ``gmean``).
    filled: tuple[str, ...] = field(default=())

    @property
    def key(self) -> tuple[str, str, int]:
        s = self.summary
        return str(s["scheme"]), str(s["model"]), _magnification(s["magnification"])

    @property
    def row(self) -> tuple[str, str]:
        """The table row this run belongs to: its model and its model options (``""`` if none)."""
        return self.key[1], options_label(self.config.get("model_options"))

    @property
    def config(self) -> dict[str, Any]:
        return self.summary.get("config") or {}

    @property
    def split(self) -> dict[str, Any]:
        """The split identity the run recorded; ``{}`` for runs from before it was recorded."""
        return self.summary.get("split") or {}

    @property
    def group_by(self) -> str | None:
        return self.split.get("group_by")

    @cached_property
    def config_hash(self) -> str:
        recorded = self.summary.get("config_hash")
        return str(recorded) if recorded else config_hash(self.config, self.group_by)

    @cached_property
    def setting_hash(self) -> str:
        return setting_hash(self.config, self.group_by)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.summary["metrics"]

    @property
    def test(self) -> dict[str, Any]:
        return self.metrics["test"]


def options_label(options: dict[str, Any] | None) -> str:
    """Model options as a short label (``reduction=8``), ``""`` when there are none."""
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted((options or {}).items()))


def collect(root: str) -> tuple[list[Run], list[dict[str, Any]], list[str]]:
    """Complete runs, incomplete ones (status rows), and problems worth showing in the report."""
    try:
        folders = list_runs(root)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no runs under {storage.redact(runs_uri(root))}: train one with `dala train` first"
        ) from None
    if not folders:
        raise FileNotFoundError(
            f"{storage.redact(runs_uri(root))} holds no run folders "
            "(runs/<run_id>/run.json or config.json)"
        )
    complete, incomplete, problems = [], [], []
    for folder in folders:
        if not folder.complete:
            incomplete.append(
                _status_row(folder.run_id, folder.status, folder.summary or folder.config or {})
            )
            continue
        url = storage.join(folder.uri, SUMMARY)
        _check_summary(folder.summary, url)
        RunSummary.parse(folder.summary, url)
        summary, filled = _fill_iba_macro(folder.summary)
        tables = {}
        for name in ("history.parquet", "test_predictions.parquet"):
            url = storage.join(folder.uri, name)
            if storage.exists(url):
                tables[name] = storage.read_parquet(url)
            else:
                tables[name] = None
                problems.append(f"`{folder.run_id}` has no {name}; its curves or ROC are left out")
        complete.append(
            Run(
                str(summary.get("run_id", folder.run_id)),
                summary,
                tables["history.parquet"],
                tables["test_predictions.parquet"],
                filled,
            )
        )
    for problem in problems:
        log.warning("report: %s", problem)
    return complete, incomplete, problems


def _check_summary(summary: dict[str, Any], url: str) -> None:
    missing = [key for key in _REQUIRED if key not in summary]
    if not missing and not isinstance(summary["metrics"].get("test", {}).get("image"), dict):
        missing = ["metrics.test.image"]
    if missing:
        raise ValueError(
            f"{storage.redact(url)} says complete but lacks {missing}; re-run that training run"
        )
    _magnification(summary["magnification"])


def _fill_iba_macro(summary: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """A copy of ``summary`` whose metric dicts all hold ``iba_macro`` (``gmean`` where missing)."""
    summary = copy.deepcopy(summary)
    metrics = summary["metrics"]
    filled = False
    for name in ("test", "test_at_threshold"):
        evaluation = metrics.get(name) or {}
        for level in ("image", "patient"):
            values = evaluation.get(level)
            if isinstance(values, dict) and "iba_macro" not in values and "gmean" in values:
                values["iba_macro"] = values["gmean"]
                filled = True
    return summary, ("iba_macro",) if filled else ()


def _magnification(value: Any) -> int:
    """40, "40" and "40X" all name the 40X magnification."""
    try:
        return int(str(value).upper().removesuffix("X"))
    except ValueError:
        raise ValueError(
            f"unknown magnification {value!r}; expected one of {MAGNIFICATIONS}"
        ) from None


def _status_row(run_id: str, status: str, fields: dict[str, Any]) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "status": status,
        **{key: fields.get(key) for key in ("model", "magnification", "scheme", "fold", "seed")},
    }


def run_row(run: Run) -> dict[str, Any]:
    """A run's record in metrics.json: identity, timings and its test metrics."""
    s = run.summary
    return {
        "run_id": run.run_id,
        **{
            key: s.get(key)
            for key in (
                "model",
                "magnification",
                "scheme",
                "fold",
                "seed",
                "parameters",
                "train_seconds",
                "best_epoch",
                "epochs",
            )
        },
        "config_hash": run.config_hash,
        "setting_hash": run.setting_hash,
        "split": run.summary.get("split"),
        "threshold": run.summary.get("threshold"),
        "test": run.test["image"],
        "ci": run.test.get("ci"),
        "intervals": run.test.get("intervals"),
        "patient": run.test.get("patient"),
        "test_at_threshold": run.metrics.get("test_at_threshold"),
        "calibration": run.metrics.get("calibration"),
        "subtypes": run.metrics.get("subtypes"),
        "filled_in": list(run.filled),
    }
