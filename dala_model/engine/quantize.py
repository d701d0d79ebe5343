"""int8 post-training static quantization for CPU batch inference (``precision="int8"``).

Path chosen: FX graph mode (``torch.ao.quantization.quantize_fx``, ``prepare_fx``/``convert_fx``
with the ``x86`` qconfig mapping: per-channel symmetric int8 weights, histogram-calibrated
activations, run by the fbgemm/oneDNN int8 kernels). Checked in the pinned torch 2.14.1:

- the PT2E quantizer is no longer in torch (``torch.ao.quantization.quantizer`` is gone); it lives
  in ``torchao`` (0.18.0 on PyPI: ``torchao.quantization.pt2e`` with ``X86InductorQuantizer``).
  Its converted model is a reference graph of quantize/dequantize ops that is only fast after
  ``torch.compile`` lowers it with Inductor, i.e. it needs a C++ compiler and a compile of
  ResNet50 (minutes on 2 cores) in every scoring process, plus a new 3.4 MB dependency with
  CUDA extensions; its saved form (``torch.export.save``) is a pickle-bearing archive.
- FX mode is deprecated but present and complete in 2.14.1, runs its int8 kernels in eager mode
  (no compiler, no warm-up compile), and its quantized state dict loads with
  ``torch.load(weights_only=True)``. First measurement here (dalaresnet50, 224 px, batch 16,
  2 threads, one noisy run each): 3.3x fp32 channels_last on AVX512, about 1.2x under the AVX2
  caps. If a later torch drops FX quantization, the PT2E path replaces :func:`quantize_for_cpu`
  and :func:`load_quantized`; the saved layout below records the method to tell them apart.

Saved layout, beside the float checkpoint ``.../best`` as ``.../best-int8/``:
``quantized-<sha16>.pt`` (the quantized state dict, tensors only) and ``config.json`` naming
it with its SHA-256, the float checkpoint's weights SHA-256, the calibration image ids, the
method and the torch version. Loading rebuilds the quantized graph from the float checkpoint
(which :func:`dala_model.models.checkpoint.load_model` verifies), checks both hashes and loads
the state dict with ``weights_only=True``: nothing from the file is ever unpickled as code.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from dala_model import storage
from dala_model.models.checkpoint import InvalidCheckpoint, load_model, read_model_config
from dala_model.models.transforms import normalize_batch

FORMAT = "dala-quantized-model"
FORMAT_VERSION = 1
METHOD = "torch.ao.quantization.quantize_fx/x86"
SUFFIX = "-int8"
CONFIG_FILE = "config.json"
CALIBRATION_BATCH = 64  # the histogram observers cost per call more than per image


def _fx():
    with warnings.catch_warnings():  # FX quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    return get_default_qconfig_mapping, prepare_fx, convert_fx


def _prepare(model: nn.Module, image_size: int) -> nn.Module:
    get_mapping, prepare_fx, _ = _fx()
    torch.backends.quantized.engine = "x86"
    float_model = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).eval()
    example = (torch.zeros(1, 3, image_size, image_size),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_fx(float_model, get_mapping("x86"), example)


def _convert(prepared: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _fx()[2](prepared).eval()


def quantize_for_cpu(
    model: nn.Module, calibration_images: np.ndarray | torch.Tensor, preset: str
) -> nn.Module:
    """An int8 copy of ``model`` for CPU inference, calibrated on uint8 NHWC images.

    Calibrate on the model's own validation images (never the test split): the observers set
    each activation's int8 range from what they see. ``model`` is left untouched.
    """
    if len(calibration_images) == 0:
        raise ValueError("quantize_for_cpu needs at least one calibration image")
    pixels = calibration_images
    if isinstance(pixels, np.ndarray):
        pixels = torch.from_numpy(np.ascontiguousarray(pixels))
    prepared = _prepare(model, int(pixels.shape[1]))
    with torch.no_grad():
        for start in range(0, len(pixels), CALIBRATION_BATCH):
            prepared(normalize_batch(pixels[start : start + CALIBRATION_BATCH], preset))
    return _convert(prepared)


def quantized_uri(float_uri: str) -> str:
    return float_uri.rstrip("/") + SUFFIX


def save_quantized(
    quantized: nn.Module, float_uri: str, *, calibration_ids: Sequence[str], image_size: int
) -> str:
    """Write ``quantized`` (from :func:`quantize_for_cpu` on the model saved at ``float_uri``)
    beside it, recording its calibration set; return the folder's URI."""
    float_config = read_model_config(float_uri)
    buffer = io.BytesIO()
    torch.save(quantized.state_dict(), buffer)
    weights = buffer.getvalue()
    sha256 = hashlib.sha256(weights).hexdigest()
    weights_file = f"quantized-{sha256[:16]}.pt"
    uri = quantized_uri(float_uri)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": METHOD,
        "precision": "int8",
        "float_checkpoint": float_uri.rstrip("/").rsplit("/", 1)[-1],
        "float_weights_sha256": float_config["weights_sha256"],
        "model": float_config["model"],
        "preset": float_config["preset"],
        "image_size": image_size,
        "weights_file": weights_file,
        "weights_sha256": sha256,
        "calibration_image_ids": list(calibration_ids),
        "torch_version": torch.__version__,
    }
    storage.write_bytes_atomic(storage.join(uri, weights_file), weights)
    storage.write_bytes_atomic(
        storage.join(uri, CONFIG_FILE), json.dumps(config, indent=2).encode()
    )
    for stale in storage.list_files(uri, suffixes=(".pt",)):
        if not stale.endswith("/" + weights_file):
            storage.remove(stale)
    return uri


def read_quantized_config(uri: str) -> dict[str, Any]:
    where = storage.redact(uri)
    try:
        config = json.loads(storage.read_bytes(storage.join(uri, CONFIG_FILE)))
    except (FileNotFoundError, NotADirectoryError):
        raise InvalidCheckpoint(f"{where} is not a quantized model: no {CONFIG_FILE}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidCheckpoint(f"{where}/{CONFIG_FILE} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise InvalidCheckpoint(f"{where}/{CONFIG_FILE} is not a {FORMAT} config")
    if config.get("format_version") != FORMAT_VERSION or config.get("method") != METHOD:
        raise InvalidCheckpoint(
            f"{where} was written by {config.get('method')!r} version "
            f"{config.get('format_version')!r}; this code reads {METHOD!r} version {FORMAT_VERSION}"
        )
    name = config.get("weights_file", "")
    if not (
        isinstance(name, str) and name.endswith(".pt") and "/" not in name and "\\" not in name
    ):
        raise InvalidCheckpoint(f"{where}/{CONFIG_FILE} names weights {name!r}, not a file in it")
    return config


def load_quantized(uri: str) -> nn.Module:
    """The int8 model saved at ``uri`` by :func:`save_quantized`, in eval mode on the CPU."""
    config = read_quantized_config(uri)
    where = storage.redact(uri)
    float_uri = storage.join(uri.rstrip("/").rsplit("/", 1)[0], config["float_checkpoint"])
    if read_model_config(float_uri)["weights_sha256"] != config["float_weights_sha256"]:
        raise InvalidCheckpoint(
            f"{where} was quantized from other float weights than {storage.redact(float_uri)} "
            "now holds; quantize the current model again"
        )
    weights = storage.read_bytes(storage.join(uri, config["weights_file"]))
    if hashlib.sha256(weights).hexdigest() != config["weights_sha256"]:
        raise InvalidCheckpoint(f"{where}/{config['weights_file']} does not match its config")
    try:
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    except Exception as exc:  # the safe unpickler refuses anything but tensors and containers
        raise InvalidCheckpoint(f"{where}: not a tensors-only state dict: {exc}") from None
    quantized = _convert(_prepare(load_model(float_uri), int(config["image_size"])))
    try:
        quantized.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InvalidCheckpoint(f"{where}: the int8 weights do not fit the model: {exc}") from None
    return quantized
