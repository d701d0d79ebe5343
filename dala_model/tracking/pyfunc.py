"""A dala checkpoint folder as an MLflow pyfunc model: what ``mlflow.pyfunc.load_model`` gives.

The logged model's artifacts *are* our checkpoint folder (``artifacts/best/``: the safetensors
weights and the ``config.json`` card, unchanged), so ``models:/...`` resolves back to the folder
that ``dala_model.models.checkpoint.load_model`` verifies by hash, and batch inference scores it
exactly as it scores a folder under ``ROOT/runs``. This class only adds MLflow's calling
convention on top: uint8 NHWC images in, the malignant-class probability out.

It is logged "from code" (``model_code.py``), never cloudpickled: loading the model imports this
module instead of unpickling an object, as our own loader never unpickles anything.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np

CHECKPOINT = "checkpoint"  # the artifacts key naming our checkpoint folder


class DalaCheckpoint(mlflow.pyfunc.PythonModel):
    """Malignant-class probabilities (float32, one per image) for uint8 (N, H, W, 3) images."""

    # The logged model carries an explicit signature (dala_model.tracking.training); without this
    # MLflow wraps ``predict`` for type-hint validation and warns that it has no hints.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        import torch

        from dala_model.models.checkpoint import load_model, read_model_config

        uri = context.artifacts[CHECKPOINT]
        self._config = read_model_config(uri)
        self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._model = load_model(uri, map_location=self._device)

    def predict(self, context, model_input, params=None):
        from dala_model.engine.inference import predict_proba

        pixels = np.asarray(model_input)
        if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
            raise ValueError(
                f"expected uint8 images shaped (N, H, W, 3), got {pixels.dtype} {pixels.shape}"
            )
        return predict_proba(
            self._model, pixels, preset=self._config["preset"], device=self._device
        ).astype(np.float32)
