"""MLflow, optional: training runs, promotions and ``models:/`` URIs mirrored into a tracking server.

Pathology teams compare runs in MLflow and deploy from its registry aliases
(``models:/name@champion``). Our run folders and the storage registry
(``dala_model.serving.promotion``) stay the source of truth; this package mirrors them:

- ``training``: each run logs its TrainConfig as params, the per-epoch history as metrics
  (``step`` = epoch), the test metrics with their intervals, tags naming the run, the model, the
  magnification, the split hash and the data version, the best model (our checkpoint folder as a
  pyfunc model with a signature and an input example), the run files and plots;
- ``registry``: a promotion registers the model version under ``<model>-<magnification>x`` and
  points the alias ``champion`` at it; ``models:/<model>@champion`` (every magnification) or
  ``models:/<model>-<M>x@champion`` resolves back into checkpoint folders for batch inference;
- ``mirror``: every MLflow call is guarded and queued, so an unreachable server never fails a
  training or a promotion (see there).

It is on when ``tracking_uri=`` is given or ``MLFLOW_TRACKING_URI`` is set, and needs the
``tracking`` extra (``pip install '.[tracking]'``); ``mlflow`` is imported only then.
"""

from __future__ import annotations

import os
import re

TRACKING_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "dala-breakhis"
CHAMPION = "champion"
INSTALL_HINT = "pip install '.[tracking]'"


def tracking_uri(explicit: str | None = None) -> str | None:
    """The MLflow server to mirror into: ``explicit``, else ``$MLFLOW_TRACKING_URI``, else None."""
    return explicit or os.environ.get(TRACKING_ENV) or None


def experiment_name() -> str:
    return os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT


def require_mlflow(uri: str | None = None):
    """``mlflow``, or an ImportError saying how to install it (or turn tracking off)."""
    try:
        import mlflow
    except ImportError:
        from dala_model import storage

        why = f"tracking_uri {storage.redact(uri)}" if uri else "models:/ URIs"
        raise ImportError(
            f"MLflow tracking is configured ({why}, or ${TRACKING_ENV}) but mlflow is not "
            f"installed: {INSTALL_HINT}, or unset {TRACKING_ENV} / tracking_uri to train "
            "without a mirror"
        ) from None
    return mlflow


def registered_name(model: str, magnification: int) -> str:
    """The registered model a promotion of (model, magnification) mirrors into: ``dalaresnet50-40x``."""
    return f"{model}-{int(magnification)}x"


def parse_registered_name(name: str) -> tuple[str, int] | None:
    """(model, magnification) of a name :func:`registered_name` made, else None."""
    match = re.fullmatch(r"(.+)-(\d+)x", name)
    return (match.group(1), int(match.group(2))) if match else None


def is_models_uri(uri: str) -> bool:
    return uri.startswith("models:/")
