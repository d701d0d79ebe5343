"""Model checkpoints as a folder: ``model-<sha256[:16]>.safetensors`` (weights) + ``config.json`` (the card).

The config says everything needed to use the weights without reading code: which registry model
and options rebuild the network, the class names, the normalisation preset, the input size, the
parameter count, the torch version, and a free-form ``card`` (metrics, data version, seed...).
A finished run adds ``metadata``, the typed model card (``dala_model.modelcard``: intended use,
input/output spec, training data, test metrics with intervals, threshold, limitations); configs
saved before it have no such key and load as before (the card reads "not recorded").

Loading trusts nothing: the config must be ours, the weights must hash to what the config
recorded (which also catches a weights file and config from two different saves), must parse as
safetensors, and must fit the rebuilt model exactly. Anything else is an :class:`InvalidCheckpoint`
that names the location and the problem. Nothing is ever unpickled.

Saving over an existing checkpoint never leaves it unloadable: the weights go to a new,
content-addressed file, the config that names it is committed last, and only then are the old
weights removed. A crash at any point leaves either the old or the new checkpoint complete.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

import dala_model
from dala_model import storage
from dala_model.data.breakhis import LABELS
from dala_model.modelcard import METADATA_KEY
from dala_model.models.registry import build_model, get_model_spec
from dala_model.models.transforms import get_preset

FORMAT = "dala-model"
FORMAT_VERSION = 1
WEIGHTS_PREFIX, WEIGHTS_SUFFIX = "model-", ".safetensors"
CONFIG_FILE = "config.json"
_REQUIRED = ("model", "num_classes", "options", "preset", "weights_file", "weights_sha256")


class InvalidCheckpoint(ValueError):
    """The location does not hold a checkpoint written by :func:`save_model`, or it is damaged."""


def _unwrap(model: nn.Module) -> nn.Module:
    """The module whose state dict has the plain key names (``torch.compile`` wraps in ``_orig_mod``)."""
    return getattr(model, "_orig_mod", model)


def save_model(
    model: nn.Module,
    uri: str,
    *,
    preset: str,
    image_size: int | None = None,
    card: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> str:
    """Write the weights, then ``uri/config.json`` naming them, each atomically; return ``uri``.

    The config is written last and records the weights' file name and SHA-256, so a reader never
    accepts a weights file that does not belong to the config beside it. ``metadata`` is the
    model card block (``dala_model.modelcard.ModelCard``, dumped to JSON); the training engine
    adds it when the run finishes, since only then are the test metrics known.
    """
    model = _unwrap(model)
    build = getattr(model, "dala_build", None)
    if build is None:
        raise ValueError(
            "save_model needs a model made by dala_model.build_model (it records how to rebuild "
            "the model in model.dala_build)"
        )
    spec = get_model_spec(build["name"])
    norm = get_preset(preset)
    # safetensors needs dense, CPU, standard-layout tensors (channels_last weights are not).
    tensors = {
        key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()
    }
    weights = safetensors.torch.save(tensors)
    sha256 = hashlib.sha256(weights).hexdigest()
    weights_file = f"{WEIGHTS_PREFIX}{sha256[:16]}{WEIGHTS_SUFFIX}"
    num_classes = build["num_classes"]
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": build["name"],
        "num_classes": num_classes,
        "options": build["options"],
        "class_names": list(LABELS)
        if num_classes == 2
        else [f"class_{i}" for i in range(num_classes)],
        "preset": norm.name,
        "mean": list(norm.mean),
        "std": list(norm.std),
        "input_size": image_size or spec.input_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_file": weights_file,
        "weights_sha256": sha256,
        "torch_version": torch.__version__,
        "dala_version": dala_model.__version__,
        "card": card or {},
    }
    if metadata is not None:
        config[METADATA_KEY] = metadata
    try:
        config_bytes = json.dumps(config, indent=2, sort_keys=True, default=_json_scalar).encode()
    except TypeError as exc:
        raise ValueError(
            f"save_model: card and metadata must be JSON-serialisable: {exc}"
        ) from None
    storage.write_bytes_atomic(storage.join(uri, weights_file), weights)
    storage.write_bytes_atomic(storage.join(uri, CONFIG_FILE), config_bytes)
    for stale in storage.list_files(uri, suffixes=(WEIGHTS_SUFFIX,)):
        if not stale.endswith("/" + weights_file):
            storage.remove(stale)
    return uri


def _json_scalar(value: Any) -> Any:
    """numpy/torch scalars in metric dicts become plain numbers."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def read_model_config(uri: str) -> dict[str, Any]:
    """The checkpoint's ``config.json``, checked to be one that :func:`save_model` wrote."""
    where = storage.redact(uri)
    hint = f"a checkpoint is a folder holding {CONFIG_FILE} and the weights it names, written by save_model"
    try:
        raw = storage.read_bytes(storage.join(uri, CONFIG_FILE))
    except (FileNotFoundError, NotADirectoryError):
        raise InvalidCheckpoint(
            f"{where} is not a model checkpoint: no {CONFIG_FILE} ({hint})"
        ) from None
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidCheckpoint(
            f"{where}/{CONFIG_FILE} is not valid JSON ({exc}); {hint}"
        ) from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise InvalidCheckpoint(f"{where}/{CONFIG_FILE} is not a {FORMAT} config; {hint}")
    if config.get("format_version") != FORMAT_VERSION:
        raise InvalidCheckpoint(
            f"{where} has checkpoint format version {config.get('format_version')!r}; this code "
            f"reads version {FORMAT_VERSION}"
        )
    missing = [key for key in _REQUIRED if key not in config]
    if missing:
        raise InvalidCheckpoint(f"{where}/{CONFIG_FILE} lacks {missing}; {hint}")
    name = config["weights_file"]
    if not (
        isinstance(name, str)
        and name.endswith(WEIGHTS_SUFFIX)
        and "/" not in name
        and "\\" not in name
    ):
        raise InvalidCheckpoint(
            f"{where}/{CONFIG_FILE} names weights {name!r}, not a file in the folder"
        )
    return config


def load_model(uri: str, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the saved model from ``uri`` (local path or fsspec URL), in eval mode."""
    config = read_model_config(uri)
    where = storage.redact(uri)
    weights_file = config["weights_file"]
    try:
        weights = storage.read_bytes(storage.join(uri, weights_file))
    except (FileNotFoundError, NotADirectoryError):
        raise InvalidCheckpoint(f"{where} has a config but no {weights_file}") from None
    if hashlib.sha256(weights).hexdigest() != config["weights_sha256"]:
        raise InvalidCheckpoint(
            f"{where}/{weights_file} does not match its config (SHA-256 differs): the file is "
            "corrupt, was replaced, or a save was interrupted; save the model again"
        )
    try:
        tensors = safetensors.torch.load(weights)
    except SafetensorError as exc:
        raise InvalidCheckpoint(
            f"{where}/{weights_file} is not a safetensors file: {exc}"
        ) from None
    try:
        model = _rebuild(config, tensors)
    except (ValueError, TypeError) as exc:
        raise InvalidCheckpoint(f"{where}: its config cannot rebuild a model: {exc}") from None
    except RuntimeError as exc:
        raise InvalidCheckpoint(
            f"{where}: the weights do not fit model {config['model']!r}: {exc}"
        ) from None
    return model.to(map_location).eval()


def _rebuild(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The config's model holding ``tensors`` (strict: every key, every shape).

    Built on the ``meta`` device, so no time goes into a random initialisation the weights
    replace at once (ResNet50's costs 0.3 s, a fifth of scoring a 20-image drop on 2 cores),
    then given copies of the loaded tensors (``assign=True``), each in the dtype the model
    declares, as a copy into an initialised model would be. Copies, because safetensors' tensors
    are views of the immutable bytes read from storage: a parameter must own writable memory
    (an optimizer step writes into it). The copy costs ~30 ms for ResNet50. A model with state
    outside its state dict (a non-persistent buffer, left on ``meta``) is rebuilt the ordinary
    way instead.
    """
    build = lambda: build_model(  # noqa: E731
        config["model"], num_classes=config["num_classes"], **config["options"]
    )
    with torch.device("meta"):
        model = build()
    declared = model.state_dict(keep_vars=True)
    typed = {
        key: value.to(declared[key].dtype, copy=True) if key in declared else value
        for key, value in tensors.items()
    }
    model.load_state_dict(typed, strict=True, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model = build()
        model.load_state_dict(tensors, strict=True)
    return model
