"""Explanations of a run's test predictions: Grad-CAM overlays and DALAResNet50's channel weights.

``dala explain ROOT --run RUN_ID`` writes, under ``ROOT/runs/<run_id>/explain/``:

* ``NN-<category>-<image_id>.png``: the test image with its class activation map laid over it,
  for a sample stratified across true/false positives/negatives (``FP``, ``FN``, ``TP``, ``TN``),
  taken round-robin in that order with the most confident of each category first, so the
  errors a pathologist should look at (confidently wrong calls) come before the successes;
* ``index.parquet``: one row per overlay (``INDEX_COLUMNS``), the file named relative to the folder;
* for a model with the lightweight attention module (DALAResNet50), ``channels.parquet`` (the mean
  gate value per channel over the benign and over the malignant test images), ``channels.json``
  (the channels it amplifies most for each class) and ``channels.png`` (a bar figure of them).

Grad-CAM comes from the ``grad-cam`` package (jacobgil/pytorch-grad-cam, the ``explain`` extra):
a maintained, widely used implementation of Grad-CAM, Grad-CAM++ and their relatives, rather than
hooks written here. The map explains the class the model predicted for the image (``cam_class``).
The layer it reads is data: ``ModelSpec.cam_layer`` beside each builder, and ``cam_reshape``
where that layer's output is not a ``(N, C, h, w)`` map. The ViTs are read at their last
block's first LayerNorm with ``"vit_tokens"``: the CLS token dropped and the patch tokens laid
out on their grid (rows x cols from the token count and the input's aspect ratio), the reshape
pytorch-grad-cam documents for ViTs. Swin has no layer (its windowed stages are not what that
reshape describes) and is refused with a message saying so.

ViT maps are weaker evidence than CNN maps, measured (a one-off experiment, too slow for the
suite): a 2-block PaperViT (dim 32, 4 px patches, 32 px images) trained to 100% accuracy on the
noise images of tests/test_explain.py, whose positives carry a bright 8x8 patch, put a median
4-6% of its Grad-CAM mass at ``blocks.1.norm1`` on the patch and its 2 px rim (14% of the
image), where the tiny CNN there puts over 60%; weighting each channel by its gradient averaged
over the tokens does not localise in that ViT (element-wise LayerCAM put 43% there). So ViT
maps are produced, with the right shape and grid order (tested), and not claimed to localise.

The channel weights are read by a forward hook on the attention module's gate, whose output is
the per-channel scale the module multiplies ``layer4``'s map by.

It lives in ``report`` (it reads a finished run and writes files the report shows, as the report
does) and imports ``models`` and ``data``; nothing below imports it. ``report.gallery`` lays the
overlays out per magnification. ``serving.scoring`` (a sibling, not below) imports its Grad-CAM
primitives (:func:`cam_target_of`, :func:`cam_maps`, :func:`overlay_png`) inside the
``explain=True`` path only, so batch heatmaps and ``dala explain`` are one implementation; that
import loads the ``report`` package (matplotlib), a cost paid only when heatmaps are asked for.
"""

from __future__ import annotations

import functools
import io
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from PIL import Image

from dala_model import storage
from dala_model.data.cache import load_images
from dala_model.report import figures as fig
from dala_model.runs import BEST, load_config, run_folder

if TYPE_CHECKING:  # torch and the models load when an explanation runs, not with the report
    import torch
    from torch import nn

EXPLAIN = "explain"  # the folder under a run
INDEX = "index.parquet"
CHANNELS = "channels.parquet"
CHANNELS_JSON = "channels.json"
CHANNELS_FIGURE = "channels.png"
CATEGORIES = ("FP", "FN", "TP", "TN")  # errors first
METHODS = ("gradcam", "gradcam++")
INDEX_COLUMNS = (
    "rank",
    "image_id",
    "patient_id",
    "magnification",
    "y_true",
    "prob_malignant",
    "y_pred",
    "category",
    "confidence",
    "cam_class",
    "method",
    "file",
)
TOP_CHANNELS = 10


class ExplanationNotSupported(ValueError):
    """The model has no spatial map for Grad-CAM to read (``ModelSpec.cam_layer`` is None)."""


@dataclass(frozen=True)
class CamTarget:
    """Where Grad-CAM reads a model: a dotted module path and how its output becomes a map."""

    layer: str
    reshape: str | None = None  # a name of dala_model.models._spec.CAM_RESHAPES


@dataclass(frozen=True)
class Explained:
    """What ``explain_run`` wrote: the folder, its index and, for attention models, the channels."""

    folder: str
    index: pd.DataFrame
    channels: pd.DataFrame | None


def categorize(predictions: pd.DataFrame) -> pd.DataFrame:
    """``predictions`` with ``category`` (TP/TN/FP/FN) and ``confidence`` in the predicted class."""
    out = predictions.copy()
    truth, called = out["y_true"].astype(int), out["y_pred"].astype(int)
    out["category"] = np.select(
        [(truth == 1) & (called == 1), (truth == 0) & (called == 0), truth == 0],
        ["TP", "TN", "FP"],
        "FN",
    )
    prob = out["prob_malignant"].astype(float)
    out["confidence"] = np.where(called == 1, prob, 1.0 - prob)
    return out


def stratified_sample(predictions: pd.DataFrame, n: int) -> pd.DataFrame:
    """``n`` images taken round-robin over FP, FN, TP, TN, the most confident of each first.

    A category with too few images leaves its turns to the others, so ``n`` images come back
    whenever the test set has that many. Ties are broken by image id, so the sample is stable.
    """
    if n < 1:
        raise ValueError(f"images must be at least 1, got {n}")
    table = categorize(predictions).sort_values(
        ["confidence", "image_id"], ascending=[False, True], kind="stable"
    )
    queues = {c: list(table.index[table["category"] == c]) for c in CATEGORIES}
    chosen: list = []
    while len(chosen) < n and any(queues.values()):
        for category in CATEGORIES:
            if queues[category] and len(chosen) < n:
                chosen.append(queues[category].pop(0))
    return table.loc[chosen].reset_index(drop=True)


def cam_target_of(model_name: str) -> CamTarget:
    """The registry's Grad-CAM layer and reshape for ``model_name``, or a clear refusal."""
    from dala_model.models.registry import get_model_spec, list_models

    spec = get_model_spec(model_name)
    if spec.cam_layer is None:
        supported = ", ".join(n for n in list_models() if get_model_spec(n).cam_layer is not None)
        raise ExplanationNotSupported(
            f"Grad-CAM is not supported for {model_name!r}: the registry names no layer whose "
            "output is a spatial map or a ViT token grid for it (ModelSpec.cam_layer is None; "
            f"a windowed transformer such as Swin needs its own reshape). Explain one of "
            f"{supported} instead"
        )
    return CamTarget(spec.cam_layer, spec.cam_reshape)


def cam_layer_of(model_name: str) -> str:
    """The registry's Grad-CAM layer for ``model_name``, or a clear refusal."""
    return cam_target_of(model_name).layer


def vit_tokens(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(N, 1 + rows*cols, C)`` tokens, CLS first, as the ``(N, C, rows, cols)`` patch grid.

    The grid comes from the token count and the input's ``height`` x ``width`` (its aspect ratio
    fixes rows / cols), so any patch size and any input size the ViT accepts work."""
    import math

    if tokens.ndim != 3:
        raise ExplanationNotSupported(
            f"the vit_tokens reshape takes (N, tokens, C) activations, got shape "
            f"{tuple(tokens.shape)}: the spec's cam_layer is not a ViT token layer"
        )
    batch, count, channels = tokens.shape
    patches = count - 1
    rows = max(1, round(math.sqrt(patches * height / width)))
    cols = patches // rows
    if rows * cols != patches or abs(rows / cols - height / width) > 0.5 * height / width:
        raise ExplanationNotSupported(
            f"{count} tokens are not a CLS token plus a patch grid of a {height}x{width} input"
        )
    grid = tokens[:, 1:, :].reshape(batch, rows, cols, channels)
    return grid.permute(0, 3, 1, 2)


def _reshape_transform(name: str | None, height: int, width: int):
    if name is None:
        return None
    if name == "vit_tokens":
        return functools.partial(vit_tokens, height=height, width=width)
    raise ValueError(f"unknown cam_reshape {name!r}: dala_model.models._spec.CAM_RESHAPES")


def grad_cam(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    classes: list[int] | None = None,
    method: str = "gradcam",
    reshape: str | None = None,
) -> np.ndarray:
    """Class activation maps ``(N, H, W)`` in [0, 1] of ``x`` for ``classes`` (default: predicted).

    ``layer`` is a dotted module path of ``model`` (``ModelSpec.cam_layer``) and ``reshape``
    the spec's ``cam_reshape``. Gradients flow in the model's own dtype: give it a float32
    model (not an int8 one, not under autocast)."""
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    cam_type = GradCAM if method == "gradcam" else GradCAMPlusPlus
    targets = None if classes is None else [ClassifierOutputTarget(int(c)) for c in classes]
    transform = _reshape_transform(reshape, *x.shape[-2:])
    with cam_type(
        model=model, target_layers=[model.get_submodule(layer)], reshape_transform=transform
    ) as cam:
        return np.asarray(cam(input_tensor=x, targets=targets), dtype=np.float32)


def cam_maps(
    model: nn.Module,
    target: CamTarget,
    pixels: np.ndarray,
    preset: str,
    classes: list[int],
    method: str = "gradcam",
    batch_size: int = 16,
) -> np.ndarray:
    """Maps ``(N, H, W)`` of uint8 NHWC ``pixels`` for ``classes``, normalised with ``preset``
    on the model's device, ``batch_size`` images at a time (each batch keeps its graph)."""
    import torch

    from dala_model.models.transforms import normalize_batch

    device = next(model.parameters()).device
    maps = []
    try:
        for start in range(0, len(pixels), batch_size):
            batch = torch.from_numpy(np.array(pixels[start : start + batch_size]))  # writable
            x = normalize_batch(batch.to(device), preset)
            picked = classes[start : start + batch_size]
            maps.append(grad_cam(model, target.layer, x, picked, method, target.reshape))
    finally:  # the backward passes filled the parameters' .grad: a model that goes on scoring
        model.zero_grad(set_to_none=True)  # should not carry a second copy of its weights
    return np.concatenate(maps) if maps else np.zeros((0, *pixels.shape[1:3]), np.float32)


def overlay(image: np.ndarray, cam: np.ndarray, weight: float = 0.45) -> np.ndarray:
    """uint8 ``(H, W, 3)`` image with the map in the jet colour map blended over it."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(
        image.astype(np.float32) / 255.0, cam, use_rgb=True, image_weight=1 - weight
    )


def overlay_png(image: np.ndarray, cam: np.ndarray) -> bytes:
    """PNG bytes of :func:`overlay` (uint8 ``(H, W, 3)`` image, map in [0, 1] of the same size)."""
    return _png(overlay(image, cam))


def explain_run(
    root: str,
    run_id: str,
    images: int = 8,
    method: str = "gradcam",
    device: str = "cpu",
    batch_size: int = 16,
) -> Explained:
    """Write overlays for ``images`` test images of the run, their index and channel weights."""
    from dala_model.device import resolve_device
    from dala_model.models.checkpoint import load_model

    folder = run_folder(root, run_id)
    record = load_config(folder)
    if record is None:
        raise FileNotFoundError(f"{storage.redact(folder)} is not a run folder (no config.json)")
    config = record.config
    target = cam_target_of(config["model"])
    predictions = storage.read_parquet(storage.join(folder, "test_predictions.parquet"))
    torch_device = resolve_device(device)
    model = load_model(storage.join(folder, BEST), map_location=torch_device)
    size, preset = int(config["image_size"]), config.get("preset", "paper")
    out = storage.join(folder, EXPLAIN)
    _clear(out)

    sample = stratified_sample(predictions, images)
    pixels = load_images(root, sample["image_id"].tolist(), size)
    files = []
    classes = sample["y_pred"].astype(int).tolist()
    maps = cam_maps(model, target, pixels, preset, classes, method, batch_size)
    for i, cam in enumerate(maps):
        row = sample.iloc[i]
        name = f"{i:02d}-{row['category']}-{_safe(row['image_id'])}.png"
        storage.write_bytes_atomic(storage.join(out, name), overlay_png(pixels[i], cam))
        files.append(name)
    index = sample.assign(
        rank=range(len(sample)), cam_class=sample["y_pred"].astype(int), method=method, file=files
    )[list(INDEX_COLUMNS)]
    storage.write_parquet_atomic(index, storage.join(out, INDEX))
    channels = channel_weights(model, root, predictions, size, preset, torch_device, batch_size)
    if channels is not None:
        _write_channels(out, channels, run_id)
    return Explained(out, index, channels)


def channel_weights(
    model: nn.Module,
    root: str,
    predictions: pd.DataFrame,
    size: int,
    preset: str,
    device: torch.device,
    batch_size: int = 16,
) -> pd.DataFrame | None:
    """Mean attention gate per channel over the benign and the malignant test images (by truth).

    None when the model has no ``LightweightAttention`` module."""
    import torch

    from dala_model.models.dalaresnet import LightweightAttention
    from dala_model.models.transforms import normalize_batch

    modules = [m for m in model.modules() if isinstance(m, LightweightAttention)]
    if not modules:
        return None
    gates: list[torch.Tensor] = []
    handle = modules[-1].gate.register_forward_hook(lambda _m, _i, out: gates.append(out.detach()))
    ids = predictions["image_id"].tolist()
    try:
        with torch.no_grad():
            for start in range(0, len(ids), batch_size):
                batch = load_images(root, ids[start : start + batch_size], size)
                model(normalize_batch(torch.from_numpy(batch).to(device), preset))
    finally:
        handle.remove()
    weights = torch.cat(gates).float().cpu().numpy()
    truth = predictions["y_true"].astype(int).to_numpy()
    mean = {
        label: weights[truth == value].mean(axis=0) if (truth == value).any() else np.nan
        for label, value in (("benign", 0), ("malignant", 1))
    }
    table = pd.DataFrame(
        {
            "channel": np.arange(weights.shape[1]),
            "benign": mean["benign"],
            "malignant": mean["malignant"],
        }
    )
    table["difference"] = table["malignant"] - table["benign"]
    table.attrs["images"] = {
        "benign": int((truth == 0).sum()),
        "malignant": int((truth == 1).sum()),
    }
    return table


def _write_channels(out: str, channels: pd.DataFrame, run_id: str) -> None:
    def top(column: str) -> list[dict]:
        rows = channels.nlargest(TOP_CHANNELS, column)
        return [
            {"channel": int(r.channel), column: float(getattr(r, column))}
            for r in rows.itertuples()
        ]

    summary = {
        "run_id": run_id,
        "images": channels.attrs.get("images", {}),
        "top_benign": top("benign"),
        "top_malignant": top("malignant"),
        "most_malignant_over_benign": top("difference"),
    }
    storage.write_parquet_atomic(channels, storage.join(out, CHANNELS))
    storage.write_bytes_atomic(
        storage.join(out, CHANNELS_JSON), json.dumps(summary, indent=2).encode()
    )
    storage.write_bytes_atomic(
        storage.join(out, CHANNELS_FIGURE), _channel_figure(channels, run_id)
    )


def _channel_figure(channels: pd.DataFrame, run_id: str) -> bytes:
    """Grouped bars of the channels amplified most for either class, benign beside malignant."""
    from matplotlib.figure import Figure

    picked = pd.concat(
        [channels.nlargest(TOP_CHANNELS, "benign"), channels.nlargest(TOP_CHANNELS, "malignant")]
    ).drop_duplicates("channel")
    picked = picked.sort_values("difference")
    figure = Figure(figsize=(max(6.0, 0.4 * len(picked)), 3.6), layout="constrained")
    axes = figure.subplots()
    at = np.arange(len(picked))
    axes.bar(at - 0.2, picked["benign"], 0.4, label="benign", color="#4477aa")
    axes.bar(at + 0.2, picked["malignant"], 0.4, label="malignant", color="#cc6677")
    axes.set_xticks(at, [str(c) for c in picked["channel"]], rotation=90, fontsize=7)
    axes.set_xlabel("layer4 channel")
    axes.set_ylabel("mean attention weight")
    axes.set_title(f"{run_id}: channels the attention amplifies most", fontsize=9)
    axes.legend(fontsize=8)
    return fig.png(figure)


def _clear(out: str) -> None:
    """Remove an earlier explanation's files, so the folder holds exactly what the index lists."""
    if storage.exists(out):
        for uri in storage.list_files(out, (".png", ".parquet", ".json")):
            storage.remove(uri)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _safe(image_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(image_id))[:80]
