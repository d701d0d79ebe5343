"""One training run mirrored into MLflow: params, per-epoch metrics, test metrics, model, files.

The engine (``dala_model.engine.train``) calls :func:`start` in its setup step, then
:meth:`RunTracker.epoch` at each epoch's end and :meth:`RunTracker.finish` once ``run.json`` is
written, on rank 0 only. Without a tracking URI :func:`start` returns the no-op
:class:`RunTracker`, so the engine never asks whether tracking is on.

What is logged, and under which names (docs/TRACKING.md lists them):

- params: the TrainConfig flattened (``model_options.dropout``), the root redacted, the tracking
  URI left out;
- tags: ``dala.run_id``, ``dala.model``, ``dala.magnification``, ``dala.scheme``, ``dala.seed``,
  ``dala.split_hash``, ``dala.data_version``, ``dala.config_hash``, ``dala.run_uri``; at the end
  ``dala.model_version`` (the weights' sha256, as the storage registry names a model);
- metrics: every number of a history record with ``step=epoch``; at the end ``test_<metric>``
  with ``test_<metric>_ci_low``/``_ci_high`` (the image-resampled interval of ``ci``),
  ``test_<metric>_ci_by_patient_*`` (the patient-resampled one to trust), ``test_patient_*``,
  ``test_at_threshold_*``, ``test_brier``, ``test_ece``, ``test_recall_<subtype>``,
  ``best_val_*``;
- the best model: our checkpoint folder, unchanged, as a pyfunc model (``pyfunc``) with a
  signature (uint8 NHWC images at the trained size in, malignant probability out) and one test
  image as its input example. A pyfunc over our folder rather than ``mlflow.pytorch``: the
  latter pickles the module, which our loader refuses by design, and would give batch inference a
  different artifact from the one the storage registry serves; this way ``models:/...`` resolves
  to the very folder (same weights sha256) that ``load_model`` verifies;
- artifacts: ``run/`` (config.json, run.json, history.parquet, test_predictions.parquet),
  ``plots/`` (learning curves, test ROC) and ``report.md`` (the test metrics with intervals).

A resumed run (``resume=True``) continues the MLflow run its first attempt left unfinished, so
one run folder stays one MLflow run.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from dala_model import runs, storage
from dala_model.tracking import experiment_name, require_mlflow, tracking_uri
from dala_model.tracking.mirror import Mirror, NoTarget, fluent_uri

log = logging.getLogger("dala_model.tracking")

MODEL_NAME = "model"  # the logged model's name within its run
MODEL_CODE = Path(__file__).with_name("model_code.py")
RUN_FILES = (runs.CONFIG, runs.SUMMARY, runs.HISTORY, runs.TEST_PREDICTIONS)
MAX_PARAM = 6000  # MLflow's limit on a param value


class RunTracker:
    """The no-op tracker: what the engine holds when tracking is off (or on ranks other than 0)."""

    enabled = False

    def epoch(self, record: dict) -> None:
        """Log one history record (step = its epoch)."""

    def finish(self, summary: dict, example: np.ndarray | None = None) -> None:
        """Log the test metrics, the best model and the run's files; end the run; retry."""

    @contextmanager
    def until_done(self):
        """Marks the MLflow run FAILED (KILLED on an interrupt) when the training raises."""
        yield


def start(config, paths: runs.RunPaths, data_version: str, *, main: bool = True) -> RunTracker:
    """A tracker for ``config``'s run: MLflow's when a tracking URI is configured, else a no-op.

    Raises ImportError naming ``pip install '.[tracking]'`` when a URI is set but mlflow is
    missing: asking for a mirror and silently not getting one would be worse than stopping."""
    uri = tracking_uri(config.tracking_uri)
    if uri is None or not main:
        return RunTracker()
    require_mlflow(uri)
    return MlflowRun(uri, config, paths, data_version)


class MlflowRun(RunTracker):
    enabled = True

    def __init__(self, uri: str, config, paths: runs.RunPaths, data_version: str) -> None:
        self.mirror = Mirror(uri)
        self.config = config
        self.paths = paths
        self.data_version = data_version
        self.run_id: str | None = None
        self.mirror.call("starting the run", self._start)

    # -- the steps ---------------------------------------------------------------------------

    def epoch(self, record: dict) -> None:
        step = int(record["epoch"])
        values = {k: v for k, v in record.items() if k != "epoch" and _is_number(v)}
        self.mirror.call(f"logging epoch {step}", lambda: self._log_metrics(values, step))

    def finish(self, summary: dict, example: np.ndarray | None = None) -> None:
        try:
            self.mirror.call("logging the test metrics", lambda: self._log_summary(summary))
            self.mirror.call("logging the run files and plots", lambda: self._log_files(summary))
            self.mirror.call("logging the best model", lambda: self._log_model(example))
            self.mirror.call("ending the run", lambda: self._end("FINISHED"))
            self.mirror.retry()
        except Exception:  # noqa: BLE001 - a bug in the mirror must not fail a finished run
            log.exception("mirroring run %s into MLflow failed", self.config.resolved_run_id)

    @contextmanager
    def until_done(self):
        try:
            yield
        except BaseException as exc:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            try:
                self.mirror.call(f"marking the run {status}", lambda: self._end(status))
                self.mirror.retry()
            except Exception:  # noqa: BLE001
                log.exception("marking MLflow run %s failed", self.run_id)
            raise

    # -- the calls ---------------------------------------------------------------------------

    def _run(self) -> str:
        if self.run_id is None:
            raise NoTarget("no MLflow run: starting it failed")
        return self.run_id

    def _start(self) -> None:
        """Create (or, resuming, reopen) the run, then log its params; safe to replay."""
        client = self.mirror.client
        if self.run_id is None:
            experiment = experiment_id(client)
            previous = self._unfinished(client, experiment) if self.config.resume else None
            if previous is not None:
                client.update_run(previous, status="RUNNING")
                self.run_id = previous
                log.info("continuing MLflow run %s for %s", previous, self.config.resolved_run_id)
                return  # its params were logged by the attempt that created it
            run = client.create_run(
                experiment, tags=self._tags(), run_name=self.config.resolved_run_id
            )
            self.run_id = run.info.run_id
            log.info("mirroring %s into MLflow run %s", self.config.resolved_run_id, self.run_id)
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in params_of(self.config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            client.log_batch(self.run_id, params=params[start : start + 100])

    def _unfinished(self, client, experiment: str) -> str | None:
        found = client.search_runs(
            [experiment],
            filter_string=f"tags.`dala.run_id` = '{self.config.resolved_run_id}'",
            order_by=["attributes.start_time DESC"],
            max_results=10,
        )
        for run in found:
            if run.info.status != "FINISHED":
                return run.info.run_id
        return None

    def _tags(self) -> dict[str, str]:
        from dala_model.data.splits import split_identity
        from dala_model.engine.config import config_hash

        config = self.config
        split = split_identity(config.root, config.scheme)
        tags = {
            "dala.run_id": config.resolved_run_id,
            "dala.model": config.model,
            "dala.magnification": str(config.magnification),
            "dala.scheme": config.scheme,
            "dala.seed": str(config.seed),
            "dala.split_hash": str(split.get("hash")),
            "dala.data_version": self.data_version,
            "dala.config_hash": config_hash(config, split["group_by"]),
            "dala.run_uri": storage.redact(self.paths.folder),
        }
        if config.fold is not None:
            tags["dala.fold"] = str(config.fold)
        return tags

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        log_metrics(self.mirror.client, self._run(), values, step)

    def _log_summary(self, summary: dict) -> None:
        run_id = self._run()
        log_metrics(self.mirror.client, run_id, summary_metrics(summary), step=0)
        from dala_model.serving.promotion import model_version

        version = model_version(self.paths.best)
        for key, value in {
            "dala.model_version": version,
            "dala.best_epoch": str(summary.get("best_epoch")),
            "dala.threshold": str((summary.get("threshold") or {}).get("threshold")),
            "dala.code_version": str(summary.get("code_version")),
        }.items():
            self.mirror.client.set_tag(run_id, key, value)

    def _log_files(self, summary: dict) -> None:
        log_run_files(self.mirror.client, self._run(), self.paths.folder, summary)

    def _log_model(self, example: np.ndarray | None) -> None:
        run_id = self._run()
        info = log_checkpoint(self.mirror.uri, run_id, self.paths.best, example)
        self.mirror.client.set_tag(run_id, "dala.logged_model", info.model_uri)

    def _end(self, status: str) -> None:
        self.mirror.client.set_terminated(self._run(), status=status)


# -- shared with the promotion mirror (dala_model.tracking.registry) ------------------------


def experiment_id(client) -> str:
    """The id of the experiment runs go to (``$MLFLOW_EXPERIMENT_NAME``, else dala-breakhis)."""
    name = experiment_name()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name)
    except MlflowException as exc:  # created meanwhile by another run
        found = client.get_experiment_by_name(name)
        if found is None:
            raise exc from None
        return found.experiment_id


def params_of(config: dict | Any) -> dict[str, str]:
    """The TrainConfig flattened to MLflow params: options as ``model_options.<name>``."""
    data = config if isinstance(config, dict) else config.model_dump(mode="json")
    flat: dict[str, str] = {}
    for key, value in sorted(data.items()):
        if key == "tracking_uri":
            continue
        if key == "root" and value:
            value = storage.redact(value)
        if isinstance(value, dict):
            for option, inner in sorted(value.items()):
                flat[f"{key}.{option}"] = str(inner)[:MAX_PARAM]
        else:
            flat[key] = str(value)[:MAX_PARAM]
    return flat


def log_metrics(client, run_id: str, values: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
    for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a batch
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def summary_metrics(summary: dict) -> dict[str, float]:
    """The numbers of ``run.json`` as flat MLflow metric names (see the module docstring)."""
    metrics = summary.get("metrics") or {}
    out: dict[str, float] = {}
    test = metrics.get("test") or {}
    out |= _numbers(test.get("image"), "test_")
    out |= _numbers(test.get("patient"), "test_patient_")
    for name, bounds in (test.get("ci") or {}).items():
        if bounds is not None and len(bounds) == 2 and all(_is_number(b) for b in bounds):
            out[f"test_{name}_ci_low"], out[f"test_{name}_ci_high"] = map(float, bounds)
    for interval in test.get("intervals") or []:
        if interval.get("unit") != "patient" or not _is_number(interval.get("low")):
            continue
        stem = (
            f"test_{interval['metric']}_ci_by_patient"
            if interval.get("scope") == "image"
            else f"test_patient_{interval['metric']}_ci"
        )
        out[f"{stem}_low"], out[f"{stem}_high"] = float(interval["low"]), float(interval["high"])
    at = metrics.get("test_at_threshold") or {}
    out |= _numbers(at.get("image"), "test_at_threshold_")
    if _is_number(at.get("threshold")):
        out["test_at_threshold_threshold"] = float(at["threshold"])
    calibration = metrics.get("calibration") or {}
    out |= {
        f"test_{k}": float(calibration[k])
        for k in ("brier", "ece")
        if _is_number(calibration.get(k))
    }
    for subtype, recall in (metrics.get("subtypes") or {}).items():
        if _is_number(recall.get("recall")):
            out[f"test_recall_{subtype}"] = float(recall["recall"])
    out |= _numbers(metrics.get("val"), "best_val_")
    for key in ("best_epoch", "train_seconds", "parameters"):
        if _is_number(summary.get(key)):
            out[key] = float(summary[key])
    return out


def log_run_files(client, run_id: str, folder: str, summary: dict) -> None:
    """``run/`` (the run folder's files), ``plots/`` and ``report.md`` as run artifacts."""
    with tempfile.TemporaryDirectory(prefix="dala-mlflow-") as tmp:
        base = Path(tmp)
        (base / "run").mkdir()
        (base / "plots").mkdir()
        for name in RUN_FILES:
            uri = storage.join(folder, name)
            if storage.exists(uri):
                (base / "run" / name).write_bytes(storage.read_bytes(uri))
        history = base / "run" / runs.HISTORY
        if history.exists():
            import pandas as pd

            (base / "plots" / "learning_curves.png").write_bytes(
                _curves_png(pd.read_parquet(history))
            )
        predictions = base / "run" / runs.TEST_PREDICTIONS
        if predictions.exists():
            import pandas as pd

            roc = _roc_png(pd.read_parquet(predictions))
            if roc is not None:
                (base / "plots" / "test_roc.png").write_bytes(roc)
        (base / "report.md").write_text(report_markdown(summary))
        client.log_artifacts(run_id, tmp)


def report_markdown(summary: dict) -> str:
    """A short report of one run: what it is and its test metrics with intervals."""
    metrics = summary_metrics(summary)
    split = summary.get("split") or {}
    lines = [
        f"# {summary.get('run_id')}",
        "",
        f"- model: {summary.get('model')} at {summary.get('magnification')}X",
        f"- split: {summary.get('scheme')} (hash {split.get('hash')}), "
        f"data version {summary.get('data_version')}",
        f"- best epoch: {summary.get('best_epoch')} of {summary.get('epochs')}; threshold "
        f"{(summary.get('threshold') or {}).get('threshold')}",
        "",
        "| test metric (image level, threshold 0.5) | value | 95% CI by image | 95% CI by patient |",
        "|---|---|---|---|",
    ]
    for name in ("accuracy", "gmean", "iba_unsquared", "f1_weighted", "sensitivity", "specificity",
                 "balanced_accuracy", "roc_auc"):  # fmt: skip
        if f"test_{name}" not in metrics:
            continue
        lines.append(
            f"| {name} | {metrics[f'test_{name}']:.4f} | "
            f"{_interval(metrics, f'test_{name}_ci')} | "
            f"{_interval(metrics, f'test_{name}_ci_by_patient')} |"
        )
    return "\n".join(lines) + "\n"


def log_checkpoint(uri: str, run_id: str, best_uri: str, example: np.ndarray | None = None):
    """Log the checkpoint folder at ``best_uri`` as the pyfunc model of MLflow run ``run_id``.

    Returns MLflow's ``ModelInfo`` (``model_uri`` is ``models:/<model id>``). The folder is
    copied locally first, so a checkpoint on S3 logs the same way as one on disk."""
    require_mlflow(uri)
    import mlflow.pyfunc
    from mlflow import MlflowClient
    from mlflow.models import Model, ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from dala_model.models.checkpoint import read_model_config
    from dala_model.tracking.pyfunc import CHECKPOINT

    card = read_model_config(best_uri)
    size = int(card["input_size"])
    if example is None or example.shape[1:] != (size, size, 3):
        example = np.full((1, size, size, 3), 128, dtype=np.uint8)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1,))]),
    )
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    # Created here, in the run's experiment: Model.log would file it under the default one.
    logged = client.create_logged_model(
        run.info.experiment_id,
        name=MODEL_NAME,
        source_run_id=run_id,
        tags={"dala.model_version": card["weights_sha256"]},
        params=dict(run.data.params),
        model_type="dala-checkpoint",
    )
    with tempfile.TemporaryDirectory(prefix="dala-mlflow-") as tmp:
        local = Path(tmp) / "best"
        local.mkdir()
        for file in storage.list_files(best_uri):
            (local / file.rsplit("/", 1)[-1]).write_bytes(storage.read_bytes(file))
        with fluent_uri(uri):
            return Model.log(
                artifact_path=None,
                name=MODEL_NAME,
                flavor=mlflow.pyfunc,
                run_id=run_id,
                model_id=logged.model_id,
                python_model=str(MODEL_CODE),
                artifacts={CHECKPOINT: str(local)},
                signature=signature,
                input_example=np.ascontiguousarray(example[:1], dtype=np.uint8),
                pip_requirements=_requirements(),
                metadata={
                    "dala_model_version": card["weights_sha256"],
                    "dala_model": card["model"],
                },
            )


# -- helpers -------------------------------------------------------------------------------


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in ("dala-breakhis", "torch", "safetensors", "numpy", "mlflow"):
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)


def _numbers(values: dict | None, prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in (values or {}).items() if _is_number(v)}


def _interval(metrics: dict[str, float], stem: str) -> str:
    low, high = metrics.get(f"{stem}_low"), metrics.get(f"{stem}_high")
    return "" if low is None or high is None else f"[{low:.4f}, {high:.4f}]"


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _curves_png(history) -> bytes:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.5))
    loss, score = figure.subplots(1, 2)
    epochs = history["epoch"] + 1
    for column in ("train_loss", "val_loss"):
        if column in history:
            loss.plot(epochs, history[column], marker="o", label=column)
    for column in ("train_acc", "val_acc", "val_gmean"):
        if column in history:
            score.plot(epochs, history[column], marker="o", label=column)
    loss.set(xlabel="epoch", title="loss")
    score.set(xlabel="epoch", title="accuracy and G-mean", ylim=(0, 1))
    loss.legend()
    score.legend()
    return _png(figure)


def _roc_png(predictions) -> bytes | None:
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    truth, prob = predictions["y_true"].to_numpy(), predictions["prob_malignant"].to_numpy()
    if len(np.unique(truth)) < 2:
        return None
    fpr, tpr, _ = roc_curve(truth, prob)
    figure = Figure(figsize=(4, 4))
    axes = figure.subplots()
    axes.plot(fpr, tpr, label=f"AUC {roc_auc_score(truth, prob):.3f}")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey")
    axes.set(xlabel="false positive rate", ylabel="true positive rate", title="test ROC")
    axes.legend(loc="lower right")
    return _png(figure)
