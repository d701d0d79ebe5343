"""Where everything lives under a storage root: the one place that names those folders.

``RootLayout(root)`` is a frozen record, like torchvision's ``Weights``: it holds the root URL and
its methods return the URL of each thing the library reads or writes::

    ROOT/manifests/manifest.parquet | quarantine.parquet | duplicates.parquet
    ROOT/cache/<size>/index.parquet + shard-<hash>.npy
    ROOT/splits/<scheme>.parquet
    ROOT/runs/<run_id>/                                   (the files inside: dala_model.runs)
    ROOT/models/<model>/<magnification>/current.json + promotions/<time>-<version>.json
                                       + MODEL_CARD.md (dala_model.modelcard, at promotion)
    ROOT/predictions/model=<m>/version=<v>/magnification=<x>/part-<key>.parquet
    ROOT/predictions/reports/model=<m>/<flow_run_id>/<x>x.json
    ROOT/reports/report.md, report.html, metrics.json, *.png
    ROOT/profile.json                                     (what `make run` profile made the root)
    ROOT/scoring/                                         (default scoring root: docs/SCORING.md)
    ROOT/staging/                                         (scratch of distributed ingest)

Why one object: the layout is a contract between processes that never share memory (ingest,
training on other machines, batch inference, the report). When each module joined
``"manifests"`` or ``"models"`` by hand, renaming or documenting a folder meant finding every
copy; here a folder name is written once, and ``docs/ARCHITECTURE.md`` mirrors this docstring.
The names of the files inside a run folder stay with ``dala_model.runs``, which owns what a run
folder holds and what "complete" means.

Paths are built with :func:`dala_model.storage.join`, so every key is checked not to escape the
root (a run id or model name with ``..`` is refused, not followed).
"""

from __future__ import annotations

from dataclasses import dataclass

from dala_model import storage

CURRENT = "current.json"  # the serving pointer's file name, listed by dala_model.serving.promotion


@dataclass(frozen=True)
class RootLayout:
    """The URLs of every folder and file under one storage root (a local path or fsspec URL)."""

    root: str

    def _join(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    # ROOT/manifests/
    def manifests(self) -> str:
        return self._join("manifests")

    def manifest(self) -> str:
        return self._join("manifests", "manifest.parquet")

    def quarantine(self) -> str:
        return self._join("manifests", "quarantine.parquet")

    def duplicates(self) -> str:
        return self._join("manifests", "duplicates.parquet")

    # ROOT/cache/<size>/
    def cache(self, size: int) -> str:
        return self._join("cache", str(int(size)))

    def cache_index(self, size: int) -> str:
        return self._join("cache", str(int(size)), "index.parquet")

    # ROOT/splits/
    def splits(self) -> str:
        return self._join("splits")

    def split(self, scheme: str) -> str:
        """``splits/<scheme>.parquet``; which schemes exist is ``dala_model.data.splits``' business."""
        return self._join("splits", f"{scheme}.parquet")

    # ROOT/runs/<run_id>/
    def runs(self) -> str:
        return self._join("runs")

    def run(self, run_id: str) -> str:
        return self._join("runs", run_id)

    # ROOT/models/<model>/<magnification>/
    def models(self) -> str:
        return self._join("models")

    def registry(self, model: str, magnification: int) -> str:
        return self._join("models", model, str(int(magnification)))

    def current_pointer(self, model: str, magnification: int) -> str:
        """``current.json``: the record of the checkpoint that serves (model, magnification)."""
        return self._join("models", model, str(int(magnification)), CURRENT)

    def promotion_log(self, model: str, magnification: int) -> str:
        """The folder of one JSON object per promotion of (model, magnification)."""
        return self._join("models", model, str(int(magnification)), "promotions")

    # ROOT/predictions/
    def predictions(
        self, model: str, model_version: str | None = None, magnification: int | None = None
    ) -> str:
        """Hive-style ``model=/version=/magnification=`` folders; stops at the first one not given."""
        parts = [f"model={model}"]
        if model_version is not None:
            parts.append(f"version={model_version}")
            if magnification is not None:
                parts.append(f"magnification={int(magnification)}")
        return self._join("predictions", *parts)

    def batch_report(self, model: str, flow_run_id: str, magnification: int) -> str:
        """Metrics of one flow run's labelled batch at one magnification."""
        return self._join(
            "predictions", "reports", f"model={model}", flow_run_id, f"{int(magnification)}x.json"
        )

    # ROOT/reports/
    def reports(self, name: str | None = None) -> str:
        """The report folder, or the file ``name`` in it (``report.html``, ``metrics.json``...)."""
        return self._join("reports", *([name] if name else []))

    # ROOT/profile.json
    def profile(self) -> str:
        """What the run that made this root was (``make run``'s profile: data, size, epochs),
        written by ``flows.main``; the report's header says it, since a 2-minute demo's numbers
        must not read as the model's."""
        return self._join("profile.json")

    # ROOT/scoring/
    def scoring(self) -> str:
        """Where ``batch-inference`` with a ``source`` writes when no ``out`` is given.

        A scoring root of its own (``dala_model.serving.outputs.ScoringLayout``): its manifests,
        quarantine and predictions never mix with the training ones above."""
        return self._join("scoring")

    # ROOT/staging/
    def staging(self, *parts: str) -> str:
        return self._join("staging", *parts)
