"""Run folders, ``ROOT/runs/<run_id>/``: where they live, which exist, which completed.

The training engine writes them; the report, the registry and ``dala promote`` read them. This
module is the one place that knows what a run folder holds and what "complete" means: ``run.json``
with status ``complete``. The engine writes ``run.json`` last and atomically, so a folder without
one is a run still going or interrupted (its ``config.json`` says what it is).

The two JSON files are read back as typed records, :class:`RunSummary` (``run.json``) and
:class:`RunConfigRecord` (``config.json``): a misspelt or unknown key, or a complete run missing
its metrics, fails at this boundary with an error naming the file, instead of as a ``KeyError``
deep inside the report or the registry. Each carries ``schema_version``; files written before
the field existed have none and load as version 1, the layout they already have. A file from a
newer version than this code reads is refused rather than half-understood.

:func:`read_summary` and :attr:`RunFolder.summary` still return the raw dicts for callers that
have not moved to the records yet (the engine and the report).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dala_model import storage
from dala_model.layout import RootLayout

SUMMARY = "run.json"
CONFIG = "config.json"
BEST = "best"  # the best-on-validation checkpoint folder (dala_model.models.checkpoint)
CHECKPOINT = "checkpoint.pt"
HISTORY = "history.parquet"
TEST_PREDICTIONS = "test_predictions.parquet"
SCHEMA_VERSION = 1  # of run.json and config.json; a file without the field is version 1

R = TypeVar("R", bound="Record")


class Record(BaseModel):
    """A JSON file read back: immutable, unknown keys refused, every error naming the file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def load(cls: type[R], uri: str) -> R:
        """The record in the JSON file at ``uri``; a ValueError naming the file when it is not one."""
        return cls.parse(read_json(uri), uri)

    @classmethod
    def parse(cls: type[R], data: dict[str, Any], uri: str) -> R:
        """``data`` (read from ``uri``) as this record; a ValueError naming ``uri`` when invalid."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(file)'}: {err['msg']}"
                for err in exc.errors()
            )
            raise ValueError(
                f"{storage.redact(uri)} is not a valid {cls.__name__} ({problems}); "
                "it was written by another version of dala or edited by hand"
            ) from None


class VersionedRecord(Record):
    """A record whose file says which layout it has; files from before the field are version 1."""

    LATEST: ClassVar[int] = SCHEMA_VERSION

    schema_version: int = SCHEMA_VERSION

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, version: int) -> int:
        if not 1 <= version <= cls.LATEST:
            raise ValueError(
                f"schema_version {version} is not one this code reads (1..{cls.LATEST}); "
                "a newer file needs a newer dala_model"
            )
        return version


class RunMetrics(Record):
    """``run.json``'s ``metrics``: the best epoch's validation metrics and the test evaluation."""

    val: dict[str, Any]
    test: dict[str, Any]  # dala_model.evaluation.evaluate at 0.5: image, ci, intervals, patient
    # The same test set at the validation-chosen threshold (absent in runs from before it).
    test_at_threshold: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None  # dala_model.calibration.calibration_summary
    subtypes: dict[str, Any] | None = None  # per-subtype recall at the operating threshold

    @field_validator("test")
    @classmethod
    def _has_image_metrics(cls, test: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(test.get("image"), dict):
            raise ValueError("test metrics need an 'image' object (classification_metrics)")
        return test


class RunSummary(VersionedRecord):
    """``run.json``: what one training run was and how it scored (written by the engine)."""

    status: str
    run_id: str
    model: str
    magnification: int
    scheme: str
    fold: int | None = None
    seed: int
    parameters: int | None = None
    train_seconds: float | None = None
    epochs: int | None = None
    best_epoch: int | None = None
    metrics: RunMetrics | None = None
    data_version: str | None = None
    code_version: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)  # the TrainConfig, as recorded
    processes: int = 1  # DDP ranks; summaries from before DDP ran on one process
    finished_at: str | None = None
    split: dict[str, Any] | None = None  # data.splits.split_identity, where the run recorded it
    threshold: dict[str, Any] | None = None  # calibration.choose_threshold on validation
    config_hash: str | None = None  # engine.config.config_hash: runs that may be averaged
    tuning: dict[str, Any] | None = None  # precision/layout chosen for this machine, and why

    @field_validator("magnification", mode="before")
    @classmethod
    def _magnification(cls, value: Any) -> Any:
        """40, "40" and "40X" all name the 40X magnification (as the report has always read them)."""
        return int(value.upper().removesuffix("X")) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _complete_has_results(self) -> RunSummary:
        if self.complete:
            missing = [name for name in _COMPLETE_NEEDS if getattr(self, name) in (None, {})]
            if missing:
                raise ValueError(f"status is 'complete' but {missing} are missing")
        return self

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def monitor(self) -> str:
        """The TrainConfig.monitor that chose the best epoch (the paper's val_accuracy by default)."""
        return str(self.config.get("monitor", "val_accuracy"))


_COMPLETE_NEEDS = (
    "metrics",
    "best_epoch",
    "train_seconds",
    "parameters",
    "epochs",
    "data_version",
    "code_version",
    "config",
)


class RunConfigRecord(VersionedRecord):
    """``config.json``: the run's TrainConfig and provenance, written before the first epoch."""

    config: dict[str, Any]  # TrainConfig.model_dump(mode="json")
    run_id: str | None = None
    data_version: str | None = None
    code_version: str | None = None
    environment: dict[str, Any] | None = None
    processes: int | None = None
    created_at: str | None = None
    split_sizes: dict[str, int] | None = None
    split: dict[str, Any] | None = None  # data.splits.split_identity, where the run recorded it
    config_hash: str | None = None  # engine.config.config_hash


@dataclass(frozen=True)
class RunPaths:
    """The files of one run folder (what the engine writes; ``SUMMARY`` last)."""

    folder: str
    config: str
    checkpoint: str
    history: str
    best: str
    test_predictions: str
    summary: str

    @classmethod
    def of(cls, folder: str) -> RunPaths:
        names = (CONFIG, CHECKPOINT, HISTORY, BEST,
                 TEST_PREDICTIONS, SUMMARY)  # fmt: skip
        return cls(folder, *(storage.join(folder, name) for name in names))


def runs_uri(root: str) -> str:
    return RootLayout(root).runs()


def run_folder(root: str, run_id: str) -> str:
    return RootLayout(root).run(run_id)


@dataclass(frozen=True)
class RunFolder:
    """One run folder as listed: its summary when written, else its recorded config."""

    run_id: str
    uri: str
    summary: dict[str, Any] | None
    config: dict[str, Any] | None

    @property
    def status(self) -> str:
        if self.summary is None:
            return "running or interrupted (no run.json)"
        return str(self.summary.get("status", "unknown"))

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def record(self) -> RunSummary | None:
        """The summary as a :class:`RunSummary` (checked now), or None while there is none."""
        if self.summary is None:
            return None
        return RunSummary.parse(self.summary, storage.join(self.uri, SUMMARY))


def read_summary(folder: str) -> dict[str, Any] | None:
    """``run.json`` of the run in ``folder`` as a raw dict, or None while it has none."""
    uri = storage.join(folder, SUMMARY)
    return read_json(uri) if storage.exists(uri) else None


def load_summary(folder: str) -> RunSummary | None:
    """``run.json`` of the run in ``folder`` as a :class:`RunSummary`, or None while it has none."""
    uri = storage.join(folder, SUMMARY)
    return RunSummary.load(uri) if storage.exists(uri) else None


def load_config(folder: str) -> RunConfigRecord | None:
    """``config.json`` of the run in ``folder`` as a :class:`RunConfigRecord`, or None."""
    uri = storage.join(folder, CONFIG)
    return RunConfigRecord.load(uri) if storage.exists(uri) else None


def completed_summary_at(folder: str) -> dict[str, Any] | None:
    """``run.json`` of the run in ``folder`` if that run completed, else None."""
    summary = read_summary(folder)
    return summary if summary is not None and summary.get("status") == "complete" else None


def list_runs(root: str) -> list[RunFolder]:
    """Every run folder under ``root`` (one with a run.json or config.json), by run id.

    Raises ``FileNotFoundError`` when ``ROOT/runs`` does not exist.
    """
    base = runs_uri(root)
    folders: dict[str, set[str]] = {}
    for info in storage.list_file_infos(base, (".json",)):
        parts = info.relpath.split("/")
        if len(parts) == 2 and parts[1] in (SUMMARY, CONFIG):
            folders.setdefault(parts[0], set()).add(parts[1])
    runs = []
    for run_id, names in sorted(folders.items()):
        folder = storage.join(base, run_id)
        summary = read_json(storage.join(folder, SUMMARY)) if SUMMARY in names else None
        config = None
        if summary is None:
            config = read_json(storage.join(folder, CONFIG)).get("config", {})
        runs.append(RunFolder(run_id, folder, summary, config))
    return runs


def read_json(uri: str) -> dict[str, Any]:
    """A run file's JSON object, or a ValueError naming the file and what to do."""
    try:
        data = json.loads(storage.read_bytes(uri))
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{storage.redact(uri)} is not valid JSON ({exc}); delete the run folder or re-run it"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{storage.redact(uri)} must hold a JSON object")
    return data
