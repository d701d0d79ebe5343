"""int8 CPU inference (dala_model.engine.quantize) on real BreakHis images: the quantized model
predicts what the float one does, is saved beside it with its calibration set recorded, and
loads back only through the tensors-only path with both hashes checked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from bench.infer_cpu import briefly_trained, logit_sqnr_db
from dala_model.engine.inference import predict_logits
from dala_model.engine.quantize import (
    load_quantized,
    quantize_for_cpu,
    quantized_uri,
    read_quantized_config,
    save_quantized,
)
from dala_model.models.checkpoint import InvalidCheckpoint, save_model
from dala_model.models.registry import build_model

SIZE = 64
TRAIN_STEPS = 12  # enough for image-dependent features (bench.infer_cpu.briefly_trained)
CPU = torch.device("cpu")


def _images(sample: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    files = sorted(sample.rglob("*.png"))
    pixels = np.stack(
        [
            np.asarray(Image.open(f).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))
            for f in files
        ]
    )
    labels = np.array([0 if "_B_" in f.name else 1 for f in files])
    return [f.stem for f in files], pixels, labels


@pytest.fixture(scope="module")
def quantized_case(breakhis_sample):
    ids, pixels, labels = _images(breakhis_sample)
    val = np.arange(len(ids)) % 2 == 0  # calibration and fit on one half, scored on the other
    model = briefly_trained(pixels[val], labels[val], TRAIN_STEPS)
    quantized = quantize_for_cpu(model, pixels[val], "paper")
    return {
        "model": model,
        "quantized": quantized,
        "calibration_ids": [i for i, v in zip(ids, val, strict=True) if v],
        "test_pixels": pixels[~val],
        "test_labels": labels[~val],
    }


def _proba(model, pixels, **kwargs) -> np.ndarray:
    logits = predict_logits(model, pixels, preset="paper", device=CPU, **kwargs)
    return torch.softmax(logits, dim=1)[:, 1].numpy()


def test_int8_predicts_what_float_predicts_on_held_out_real_images(quantized_case):
    pixels, labels = quantized_case["test_pixels"], quantized_case["test_labels"]
    float_logits = predict_logits(quantized_case["model"], pixels, preset="paper", device=CPU)
    int8_logits = predict_logits(
        quantized_case["quantized"], pixels, preset="paper", device=CPU, channels_last=False
    )
    # 8-bit weights and activations: the logit keeps at least 20 dB over the quantization noise
    # (34.5-41.5 dB measured here), whatever the model predicts.
    sqnr = logit_sqnr_db(float_logits, int8_logits)
    float_p = torch.softmax(float_logits, 1)[:, 1].numpy()
    int8_p = torch.softmax(int8_logits, 1)[:, 1].numpy()
    agreement = ((float_p > 0.5) == (int8_p > 0.5)).mean()
    # int8 orders the held-out images as float does. Not "ROC-AUC within 0.05": this briefly
    # trained model barely ranks them (held-out AUC 0.59-0.75 as the kernels and thread count
    # vary; its probabilities span about 0.03), so an AUC difference measures int8's reordering
    # of near-ties, which is what the rank correlation measures directly. Measured (2026-12-04):
    # Spearman 0.94-0.95 native AVX512, 0.82-0.90 under AVX2 kernels (1 and 2 threads).
    rank = float(spearmanr(float_p, int8_p).statistic)
    facts = {
        "sqnr_db": sqnr,
        "agreement": agreement,
        "malignant": (float_p > 0.5).mean(),
        "spearman": rank,
        "auc": (roc_auc_score(labels, float_p), roc_auc_score(labels, int8_p)),
    }
    assert sqnr >= 20, facts
    assert agreement >= 0.95, facts
    assert rank >= 0.7, facts
    # It is a different (quantized) network, not the float one under another name.
    assert any("quantized" in type(m).__module__ for m in quantized_case["quantized"].modules())
    # Both memory formats of the input give the same int8 result.
    np.testing.assert_allclose(_proba(quantized_case["quantized"], pixels), int8_p, atol=1e-5)


def test_saved_beside_the_float_model_with_its_calibration_set_and_loaded_back(
    quantized_case, tmp_path
):
    float_uri = save_model(quantized_case["model"], str(tmp_path / "best"), preset="paper")
    uri = save_quantized(
        quantized_case["quantized"],
        float_uri,
        calibration_ids=quantized_case["calibration_ids"],
        image_size=SIZE,
    )
    assert uri == quantized_uri(float_uri) == str(tmp_path / "best-int8")
    config = read_quantized_config(uri)
    assert config["calibration_image_ids"] == quantized_case["calibration_ids"]
    assert config["precision"] == "int8" and config["float_checkpoint"] == "best"
    weights = Path(uri) / config["weights_file"]
    torch.load(weights, weights_only=True)  # tensors and containers only

    loaded = load_quantized(uri)
    pixels = quantized_case["test_pixels"]
    np.testing.assert_array_equal(
        _proba(loaded, pixels), _proba(quantized_case["quantized"], pixels)
    )

    tampered = bytearray(weights.read_bytes())
    tampered[-10] ^= 0xFF
    weights.write_bytes(bytes(tampered))
    with pytest.raises(InvalidCheckpoint, match="does not match"):
        load_quantized(uri)


def test_loading_refuses_int8_weights_of_another_float_model(quantized_case, tmp_path):
    float_uri = save_model(quantized_case["model"], str(tmp_path / "best"), preset="paper")
    uri = save_quantized(
        quantized_case["quantized"], float_uri, calibration_ids=["x"], image_size=SIZE
    )
    torch.manual_seed(1)
    save_model(build_model("dalaresnet50"), float_uri, preset="paper")  # retrained since
    with pytest.raises(InvalidCheckpoint, match="other float weights"):
        load_quantized(uri)
    (Path(uri) / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(InvalidCheckpoint, match="not a dala-quantized-model"):
        load_quantized(uri)


def test_quantize_needs_calibration_images():
    with pytest.raises(ValueError, match="calibration"):
        quantize_for_cpu(build_model("resnet50"), np.zeros((0, SIZE, SIZE, 3), np.uint8), "paper")
