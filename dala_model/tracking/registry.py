"""Promotions mirrored into MLflow's model registry, and ``models:/`` URIs resolved back.

Names and aliases: a promotion of (model, magnification) registers a version of the registered
model ``<model>-<magnification>x`` (``dalaresnet50-40x``) and points its alias ``champion`` at
it. One registered model per magnification, because each magnification has its own serving
model (as ``ROOT/models/<model>/<magnification>/current.json`` does); the alias, not a stage,
because aliases are what MLflow 2.9+ deploys from (``models:/dalaresnet50-40x@champion``).

Which MLflow model is registered: the one the training run logged (found by the MLflow run tag
``dala.model_version``, the weights' sha256). A run trained without tracking is logged at its
first promotion, into a run of its own tagged the same way, so every promotion mirrors. The
version carries the promotion's :class:`~dala_model.serving.promotion.RegistryRecord` as an
artifact of its run (``promotions/<time>-<version>.json``, the very bytes of ``current.json``)
and tags naming it; re-promoting weights that already have a version moves the alias back to
that version instead of registering a copy.

Resolving (:func:`resolve`, behind ``promotion.current_records("models:/...")``):
``models:/<model>@<alias>`` means every registered ``<model>-<M>x`` that has the alias;
``models:/<model>-<M>x@<alias>`` and ``models:/<model>-<M>x/<version>`` mean one. Each version is
downloaded once into ``$DALA_MLFLOW_CACHE`` (default ``mlflow-models/`` under dala's cache
directory, ``$DALA_CACHE_DIR``; versions are immutable in MLflow) and
returned as its RegistryRecord with ``checkpoint_uri`` pointing at the downloaded checkpoint
folder; ``model_version`` stays the weights' sha256, checked against the download, so scoring
stays content-keyed whichever way the model was found. Resolution is not guarded: batch inference
that cannot reach its models must fail, naming the URI and the server.

Mirroring a promotion is guarded like training (``mirror``): the storage registry has already
committed the pointer, and an unreachable MLflow only costs the mirror (logged, retried once).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from dala_model import storage
from dala_model.tracking import (
    CHAMPION,
    TRACKING_ENV,
    is_models_uri,
    parse_registered_name,
    registered_name,
    require_mlflow,
    tracking_uri,
)
from dala_model.tracking.mirror import Mirror, client_settings, describe, fluent_uri
from dala_model.tracking.training import (
    experiment_id,
    log_checkpoint,
    log_metrics,
    log_run_files,
    params_of,
    summary_metrics,
)

log = logging.getLogger("dala_model.tracking")

RECORD_TAG = "dala.record"  # the model version's tag naming its RegistryRecord artifact
VERSION_TAG = "dala.model_version"
CACHE_ENV = "DALA_MLFLOW_CACHE"  # where models:/ checkpoints are downloaded to


def mirror_promotion(record, explicit_uri: str | None = None) -> str | None:
    """Register ``record`` (a committed RegistryRecord) in MLflow and set ``champion`` on it.

    Returns the registered version, or None when tracking is off or MLflow failed (logged)."""
    uri = tracking_uri(explicit_uri)
    if uri is None:
        return None
    try:
        require_mlflow(uri)
    except ImportError as exc:
        log.warning("promotion of %s not mirrored: %s", record.model_version[:12], exc)
        return None
    mirror = Mirror(uri)
    name = registered_name(record.model, record.magnification)
    done: dict[str, str] = {}

    def register() -> None:
        done["version"] = _register(mirror, name, record)

    mirror.call(f"registering {name} at {CHAMPION}", register)
    mirror.retry()
    version = done.get("version")
    if version is not None:
        log.info("MLflow %s version %s is now @%s", name, version, CHAMPION)
    return version


def _register(mirror: Mirror, name: str, record) -> str:
    """The version of ``name`` holding ``record``'s weights (registered if new), at champion."""
    from mlflow.exceptions import MlflowException

    client = mirror.client
    try:
        client.create_registered_model(
            name, tags={"dala.model": record.model, "dala.magnification": str(record.magnification)}
        )
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    existing = next(
        (
            v
            for v in client.search_model_versions(f"name = '{name}'")
            if v.tags.get(VERSION_TAG) == record.model_version
        ),
        None,
    )
    if existing is not None:
        version, run_id = str(existing.version), existing.run_id
        if CHAMPION in (existing.aliases or []) and (
            existing.tags.get("dala.promoted_at") == record.promoted_at
        ):
            return version  # mirrored already: nothing to do
    else:
        run_id, model_uri = _logged_model(mirror, record)
        created = client.create_model_version(
            name,
            source=model_uri,
            run_id=run_id,
            tags={VERSION_TAG: record.model_version, "dala.run_id": record.run_id},
            model_id=model_uri.removeprefix("models:/"),
        )
        version = str(created.version)
    stamp = re.sub(r"[^0-9A-Za-z]", "", record.promoted_at)
    artifact = f"promotions/{stamp}-{record.model_version[:12]}.json"
    with tempfile.TemporaryDirectory(prefix="dala-mlflow-") as tmp:
        path = Path(tmp) / artifact.rsplit("/", 1)[-1]
        path.write_text(json.dumps(record.model_dump(), indent=2, sort_keys=True, default=float))
        client.log_artifact(run_id, str(path), "promotions")
    for key, value in {
        RECORD_TAG: artifact,
        "dala.promoted_at": record.promoted_at,
        "dala.reason": record.reason[:5000],
        "dala.previous_version": str(record.previous_version),
        "dala.run_uri": storage.redact(record.run_uri),
    }.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, CHAMPION, version)
    return version


def _logged_model(mirror: Mirror, record) -> tuple[str, str]:
    """(MLflow run id, ``models:/<id>``) of the model logged for ``record``'s weights.

    The training run's, when it was tracked; else logged now into a run of its own."""
    client = mirror.client
    experiment = experiment_id(client)
    for run in client.search_runs(
        [experiment],
        filter_string=f"tags.`{VERSION_TAG}` = '{record.model_version}'",
        order_by=["attributes.start_time DESC"],
    ):
        model_uri = run.data.tags.get("dala.logged_model")
        if model_uri:
            return run.info.run_id, model_uri
    run = client.create_run(
        experiment,
        run_name=f"{record.run_id} (promoted)",
        tags={
            "dala.run_id": record.run_id,
            "dala.model": record.model,
            "dala.magnification": str(record.magnification),
            "dala.data_version": record.data_version,
            "dala.run_uri": storage.redact(record.run_uri),
            VERSION_TAG: record.model_version,
            "dala.logged_at": "promotion",
        },
    )
    run_id = run.info.run_id
    from mlflow.entities import Param

    params = [Param(k, v) for k, v in params_of(record.config).items()]
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start : start + 100])
    summary = _summary(record.run_uri)
    if summary is not None:
        log_metrics(client, run_id, summary_metrics(summary), step=0)
        log_run_files(client, run_id, record.run_uri, summary)
    info = log_checkpoint(mirror.uri, run_id, record.checkpoint_uri)
    client.set_tag(run_id, "dala.logged_model", info.model_uri)
    client.set_terminated(run_id, "FINISHED")
    return run_id, info.model_uri


def _summary(run_uri: str) -> dict | None:
    from dala_model import runs

    try:
        return runs.read_summary(run_uri)
    except (OSError, ValueError):
        return None


# -- models:/ URIs -----------------------------------------------------------------------


def resolve(uri: str, *, explicit_uri: str | None = None, cache: str | None = None) -> list:
    """The RegistryRecords ``uri`` (``models:/...``) names, checkpoints downloaded locally."""
    if not is_models_uri(uri):
        raise ValueError(f"{uri!r} is not a models:/ URI")
    server = tracking_uri(explicit_uri)
    if server is None:
        raise ValueError(
            f"{uri} resolves through an MLflow model registry: set {TRACKING_ENV} to its "
            "tracking server (e.g. http://mlflow:5000)"
        )
    require_mlflow(server)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, alias, number = _parse(uri)
    client = MlflowClient(tracking_uri=server, registry_uri=server)
    where = f"{uri} on {storage.redact(server)}"
    try:
        with client_settings():
            records = _resolve(client, server, uri, name, alias, number, where, cache)
    except MlflowException as exc:
        raise LookupError(f"cannot resolve {where}: {describe(exc)}") from None
    return sorted(records, key=lambda r: (r.model, r.magnification))


def _resolve(client, server, uri, name, alias, number, where, cache) -> list:
    if parse_registered_name(name) is not None:
        versions = [_version(client, name, alias, number, where)]
    else:
        if number is not None:
            raise ValueError(
                f"{uri}: a version number needs one registered model, e.g. "
                f"models:/{registered_name(name, 40)}/{number}"
            )
        versions = _family(client, name, alias)
        if not versions:
            raise LookupError(
                f"{where}: no registered {name}-<M>x model has the alias @{alias}; promote "
                f"one (`dala promote`) with {TRACKING_ENV} set"
            )
    root = Path(cache) if cache else _cache_root(server)
    return [_record(client, server, version, root, where) for version in versions]


def _parse(uri: str) -> tuple[str, str | None, str | None]:
    rest = uri.removeprefix("models:/").strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        if name and alias and "/" not in name:
            return name, alias, None
    elif "/" in rest:
        name, number = rest.split("/", 1)
        if name and number.isdigit():
            return name, None, number
    raise ValueError(
        f"{uri!r} is not a models:/ URI this registry reads: models:/<model>@{CHAMPION} (every "
        f"magnification), models:/<model>-<M>x@{CHAMPION} or models:/<model>-<M>x/<version>"
    )


def _version(client, name: str, alias: str | None, number: str | None, where: str):
    from mlflow.exceptions import MlflowException

    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, number)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise LookupError(f"{where}: no such model version ({describe(exc)})") from None
        raise


def _family(client, model: str, alias: str) -> list:
    from mlflow.exceptions import MlflowException

    found = []  # LIKE's "_" matches any character: the exact match is parse_registered_name's
    for registered in client.search_registered_models(filter_string=f"name LIKE '{model}-%x'"):
        parsed = parse_registered_name(registered.name)
        if parsed is None or parsed[0] != model:
            continue
        try:
            found.append(client.get_model_version_by_alias(registered.name, alias))
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
    return found


def _cache_root(server: str) -> Path:
    """``$DALA_MLFLOW_CACHE``, else ``mlflow-models/`` in dala's cache, one folder per server."""
    from dala_model.engine.autotune import cache_dir

    base = Path(os.environ.get(CACHE_ENV) or cache_dir() / "mlflow-models")
    return base / hashlib.sha256(storage.redact(server).encode()).hexdigest()[:12]


def _record(client, server: str, version, root: Path, where: str):
    """The RegistryRecord of one model version, its checkpoint in the local cache."""
    from dala_model.models.checkpoint import read_model_config
    from dala_model.serving.promotion import RegistryRecord

    tags = version.tags or {}
    label = f"{version.name} version {version.version}"
    if RECORD_TAG not in tags or VERSION_TAG not in tags:
        raise LookupError(
            f"{where}: {label} was not registered by `dala promote` (no {RECORD_TAG} tag); "
            "promote the run with dala so the registry record travels with it"
        )
    folder = root / version.name / f"v{version.version}"
    record_file = folder / "record.json"
    checkpoint = folder / "checkpoint"
    if not (record_file.exists() and _holds(checkpoint, tags[VERSION_TAG])):
        _download(client, server, version, tags[RECORD_TAG], folder)
    record = RegistryRecord.parse(json.loads(record_file.read_text()), f"{label} ({where})")
    sha = read_model_config(str(checkpoint))["weights_sha256"]
    if sha != record.model_version or sha != tags[VERSION_TAG]:
        raise LookupError(
            f"{where}: {label} holds weights {sha[:12]}, but its record names "
            f"{record.model_version[:12]}; promote the run again"
        )
    return record.model_copy(update={"checkpoint_uri": str(checkpoint)})


def _holds(checkpoint: Path, sha: str) -> bool:
    try:
        config = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return config.get("weights_sha256") == sha and (checkpoint / config["weights_file"]).exists()


def _download(client, server: str, version, record_artifact: str, folder: Path) -> None:
    """Fetch the model's checkpoint folder and the record into ``folder``, replacing it whole."""
    import mlflow
    from mlflow.models import Model

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        with fluent_uri(server):
            model_dir = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"models:/{version.name}/{version.version}",
                    dst_path=str(staging / "model"),
                    tracking_uri=server,
                )
            )
        from dala_model.tracking.pyfunc import CHECKPOINT

        flavor = Model.load(str(model_dir)).flavors.get("python_function", {})
        relpath = (flavor.get("artifacts") or {}).get(CHECKPOINT, {}).get("path")
        if not relpath:
            raise LookupError(
                f"{version.name} version {version.version} is not a dala checkpoint model "
                f"(no {CHECKPOINT!r} artifact)"
            )
        shutil.move(str(model_dir / relpath), str(staging / "checkpoint"))
        downloaded = client.download_artifacts(version.run_id, record_artifact, str(staging))
        shutil.move(downloaded, str(staging / "record.json"))
        shutil.rmtree(staging / "model")
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}-old-{os.getpid()}")
            folder.rename(old)
        staging.rename(folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
