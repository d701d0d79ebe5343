"""Run folders, ``ROOT/runs/<run_id>/``: where they live, which exist, which completed.

The training engine writes them; the report, the registry and ``dala promote`` read them. This
module is the one place that knows that layout and what "complete" means: ``run.json`` with
status ``complete``. The engine writes ``run.json`` last and atomically, so a folder without one
is a run still going or interrupted (its ``config.json`` says what it is).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from dala_model import storage

SUMMARY = "run.json"
CONFIG = "config.json"


def runs_uri(root: str) -> str:
    return storage.join(root, "runs")


def run_folder(root: str, run_id: str) -> str:
    return storage.join(runs_uri(root), run_id)


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


def read_summary(folder: str) -> dict[str, Any] | None:
    """``run.json`` of the run in ``folder``, or None while it has none."""
    uri = storage.join(folder, SUMMARY)
    return read_json(uri) if storage.exists(uri) else None


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
