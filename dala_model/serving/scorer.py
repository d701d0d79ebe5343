"""The model a serving path scores with, at the precision asked for, and the record of that choice.

Both serving paths (``scoring``: new drops; ``predictions``: a root's own manifest) load the
promoted float weights through :func:`load_scorer`, which returns a :class:`Scorer`: the model,
the :func:`dala_model.engine.inference.predict_proba` arguments to run it with, and ``tuning``,
the record that results and batch reports carry.

- ``precision="auto"`` (or fp32/bf16/fp16): :func:`dala_model.engine.inference.tuned` measures
  the memory format, the precision (auto only) and, on CPU with no ``batch_size`` given, the
  batch size once per machine and caches them (``dala_model.engine.autotune``). Hard-coding
  them (channels_last on CUDA only, bf16 "auto" on CUDA) was the issue-16 finding: the fixed
  choice was slower than the naive loop on an AVX2 CPU.
- ``precision="int8"`` (CPU only, ``dala_model.engine.quantize``): the int8 sibling of the
  promoted checkpoint (``quantized_uri(best)``) is loaded when it exists and was quantized from
  these very weights; otherwise the float model is quantized now, calibrated on the model's own
  validation images (its run's recorded scheme, fold and magnification, read back from the
  registry root, else the root its config recorded; the split must come from the manifest the
  model trained on), and saved beside the float one with its calibration image ids, so the next
  run reuses it. On CUDA it is an error (the int8 kernels are fbgemm/oneDNN CPU kernels); with
  ``device="auto"`` it means the CPU.
- Float models score with each BatchNorm folded into its convolution, the same function with a
  pass fewer (:func:`dala_model.engine.inference.fold_batchnorm`; the count is recorded as
  ``tuning["batchnorm_folded"]``). The module tree keeps its names, so Grad-CAM hooks the served
  model as it is.

The prediction rows keep the float weights' ``model_version``: the int8 model is a function of
those weights and the recorded calibration set, and ``precision`` is recorded beside them (part
file metadata, results, batch reports), not in the version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from dala_model import storage
from dala_model.data import cache
from dala_model.data.dataset import decode_pngs, split_frames
from dala_model.data.manifest import data_version, read_manifest
from dala_model.device import resolve_device
from dala_model.engine import quantize
from dala_model.engine.inference import fold_batchnorm, predict_proba, tuned
from dala_model.models.checkpoint import InvalidCheckpoint, load_model
from dala_model.serving.promotion import RegistryRecord

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
INT8_BATCH = 16  # the batch quantize.py measured its int8 speed-up at
CALIBRATION_IMAGES = 256  # at most, evenly spread over the validation split's sorted ids


class UnsupportedPrecision(ValueError):
    """A precision this device cannot score with (int8 on CUDA, fp16 on a CPU), or no such one."""


@dataclass
class Scorer:
    """A loaded model and how to run it; ``tuning`` is what results and reports record."""

    model: nn.Module
    preset: str
    kwargs: dict[str, Any]
    precision: str
    tuning: dict[str, Any] = field(default_factory=dict)

    def proba(self, pixels: np.ndarray) -> np.ndarray:
        return predict_proba(self.model, pixels, preset=self.preset, **self.kwargs)


def scoring_device(device: str, precision: str) -> torch.device:
    """The device to score on; refuses an unknown precision and int8 anywhere but the CPU."""
    if precision not in PRECISIONS:
        raise UnsupportedPrecision(
            f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        )
    if precision == "int8":
        if device != "auto" and torch.device(device).type != "cpu":
            raise UnsupportedPrecision(
                f"precision='int8' runs only on the CPU (fbgemm/oneDNN int8 kernels), not on "
                f"device={device!r}: use --device cpu, or a float precision (auto, bf16, fp16) "
                "on CUDA"
            )
        return torch.device("cpu")
    target = resolve_device(device)
    if precision == "fp16" and target.type != "cuda":
        raise UnsupportedPrecision(
            "precision='fp16' is for CUDA; on a CPU use auto, fp32, bf16 or int8"
        )
    return target


def load_scorer(
    registry: str,
    record: RegistryRecord,
    *,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int | None = None,
    image_size: int,
    preset: str,
) -> Scorer:
    """The promoted model of ``record`` ready to score (see the module docstring)."""
    target = scoring_device(device, precision)
    if precision == "int8":
        model, tuning = _int8_model(registry, record, image_size, preset)
        batch = batch_size or INT8_BATCH
        kwargs = {"device": target, "dtype": None, "channels_last": False, "batch_size": batch}
        tuning |= {"precision": "int8", "channels_last": False, "batch_size": batch}
        return Scorer(model, preset, kwargs, "int8", tuning | {"label": f"int8-nchw-b{batch}"})
    net = load_model(record.checkpoint_uri, map_location=target)
    folded = fold_batchnorm(net)
    net, kwargs, choice = tuned(
        net,
        model_name=record.model,
        image_size=image_size,
        device=target,
        precision=None if precision == "auto" else precision,
        batch_size=batch_size,
    )
    tuning = choice.record() | {"device": str(target), "batchnorm_folded": folded}
    return Scorer(net, preset, kwargs, choice.precision, tuning)


def _int8_model(
    registry: str, record: RegistryRecord, image_size: int, preset: str
) -> tuple[nn.Module, dict[str, Any]]:
    """The saved int8 sibling of the promoted checkpoint, else a fresh one, saved beside it."""
    float_uri = record.checkpoint_uri
    uri = quantize.quantized_uri(float_uri)
    if storage.exists(storage.join(uri, quantize.CONFIG_FILE)):
        try:
            model = quantize.load_quantized(uri)
            config = quantize.read_quantized_config(uri)
            if int(config["image_size"]) == image_size:
                return model, _int8_record(uri, config, quantized_now=False)
            log.warning("%s was quantized at another size: again", storage.redact(uri))
        except (InvalidCheckpoint, FileNotFoundError) as exc:
            log.warning("int8 model at %s unusable (%s): quantizing again", uri, exc)
    ids, pixels = calibration_images(registry, record, image_size)
    log.info("quantizing %s to int8 on %d validation images", storage.redact(float_uri), len(ids))
    model = quantize.quantize_for_cpu(load_model(float_uri), pixels, preset)
    quantize.save_quantized(model, float_uri, calibration_ids=ids, image_size=image_size)
    return model, _int8_record(uri, quantize.read_quantized_config(uri), quantized_now=True)


def _int8_record(uri: str, config: dict[str, Any], *, quantized_now: bool) -> dict[str, Any]:
    return {
        "method": config["method"],
        "quantized_uri": storage.redact(uri),
        "quantized_now": quantized_now,
        "calibration_images": len(config["calibration_image_ids"]),
        "int8_weights_sha256": config["weights_sha256"],
        "device": "cpu",
    }


def calibration_images(
    registry: str, record: RegistryRecord, image_size: int
) -> tuple[list[str], np.ndarray]:
    """Ids and uint8 pixels of (at most :data:`CALIBRATION_IMAGES` of) the model's own
    validation images, from the first training root whose split matches the model's data."""
    config = record.config
    scheme, fold = config.get("scheme"), config.get("fold")
    roots = [registry] + [r for r in [config.get("root")] if r and r != registry]
    reasons = []
    for root in roots:
        try:
            if data_version(read_manifest(root)) != record.data_version:
                reasons.append(f"{storage.redact(root)}'s manifest is not the model's data version")
                continue
            val = split_frames(root, scheme, record.magnification, fold)["val"]
        except (FileNotFoundError, ValueError, KeyError) as exc:
            reasons.append(f"{storage.redact(root)}: {exc}")
            continue
        if len(val) > CALIBRATION_IMAGES:
            picks = np.unique(np.linspace(0, len(val) - 1, CALIBRATION_IMAGES).round().astype(int))
            val = val.iloc[picks].reset_index(drop=True)
        return val["image_id"].tolist(), _pixels(root, val, image_size)
    raise ValueError(
        f"precision='int8' calibrates on the model's validation images ({scheme} split, "
        f"{record.magnification}X), which cannot be read back: " + "; ".join(reasons)
    )


def _pixels(root: str, frame: pd.DataFrame, size: int) -> np.ndarray:
    """From the decoded cache when it holds every image at ``size``, else decoded from the PNGs."""
    try:
        return cache.load_images(root, frame["image_id"].tolist(), size)
    except (FileNotFoundError, KeyError):
        return decode_pngs(frame, size)
