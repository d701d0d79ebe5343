"""The engine's measured choice of precision, memory format and CPU inference batch
(dala_model.engine.autotune): what it may choose on this CPU, that it measures every candidate,
caches the choice atomically per machine and model, reuses it, and that overrides skip it."""

from __future__ import annotations

import json

import pytest
import torch

from dala_model.device import native_bf16, resolve_precision
from dala_model.engine import autotune

CPU = torch.device("cpu")
SIZE = 32  # the smallest size the engine accepts: keeps each measured step a few milliseconds


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DALA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_model():
    """A small convolutional classifier: the autotuner times whatever model it is given (the
    registry name only keys the cache); the bench smoke test times the real dalaresnet50."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 2),
    )


def test_bf16_is_a_candidate_only_where_the_cpu_computes_it_natively():
    found = autotune.precisions(CPU, "infer")
    assert found[0] == "fp32" and "fp16" not in found
    assert ("bf16" in found) == native_bf16(CPU)
    expected = torch.backends.cpu.get_cpu_capability()
    assert autotune.cache_key(CPU, "m", 64, "infer")["capability"].startswith(expected)


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_first_use_measures_every_candidate_and_later_calls_reuse_the_cache(
    mode, tiny_model, _cache
):
    first = autotune.choose(mode, "tiny-cnn", SIZE, CPU, model=tiny_model, budget_s=0.5)
    layouts = [
        autotune.candidate_label(p, cl)
        for p in autotune.precisions(CPU, mode)
        for cl in (True, False)
    ]
    assert set(layouts) <= set(first.images_per_s)
    assert all(rate > 0 for rate in first.images_per_s.values())
    assert not first.cached and first.measured_seconds > 0
    best = max(layouts, key=first.images_per_s.get)
    reference = autotune.candidate_label("fp32", False)
    # The fastest wins only by a clear margin over fp32 contiguous (the naive reference's choice).
    clear = first.images_per_s[best] >= first.images_per_s[reference] * autotune.WIN_MARGIN
    expected = best if clear else reference
    assert autotune.candidate_label(first.precision, first.channels_last) == expected
    if mode == "infer":  # the batch is measured on CPU inference, and only there
        assert first.batch_size in autotune.INFER_BATCHES
        assert {first.label} <= set(first.images_per_s)
    else:
        assert first.batch_size is None
    (written,) = (_cache / "autotune").glob("*.json")
    assert json.loads(written.read_text())["key"]["mode"] == mode
    assert not list((_cache / "autotune").glob(".tmp-*"))  # written atomically, nothing left over

    again = autotune.choose(mode, "tiny-cnn", SIZE, CPU, model=tiny_model, budget_s=0.5)
    assert again.cached and again.key == first.key
    assert (again.precision, again.channels_last, again.batch_size) == (
        first.precision,
        first.channels_last,
        first.batch_size,
    )
    assert again.images_per_s == first.images_per_s


def test_training_is_probed_at_the_runs_batch_and_keyed_by_it(tiny_model, _cache, monkeypatch):
    # The layout's win depends on the batch (1.06x at a batch-4 probe, 1.31x at the run's 32,
    # under AVX2 kernels): the probe steps use the run's batch, capped at TRAIN_PROBE_BATCH.
    probed: list[int] = []
    real_step = autotune._train_step

    def recording_step(model, device, precision, channels_last, batch, size, preset):
        probed.append(batch)
        return real_step(model, device, precision, channels_last, batch, size, preset)

    monkeypatch.setattr(autotune, "_train_step", recording_step)
    at8 = autotune.choose(
        "train", "tiny-cnn", SIZE, CPU, batch_size=8, model=tiny_model, budget_s=0
    )
    assert set(probed) == {8} and len(probed) == 2 * len(autotune.precisions(CPU, "train"))
    assert at8.batch_size is None  # training's batch is the run's, never chosen here
    probed.clear()
    big = autotune.TRAIN_PROBE_BATCH * 2
    at_big = autotune.choose(
        "train", "tiny-cnn", SIZE, CPU, batch_size=big, model=tiny_model, budget_s=0
    )
    assert set(probed) == {autotune.TRAIN_PROBE_BATCH}
    assert at_big.key != at8.key and len(list((_cache / "autotune").glob("*.json"))) == 2
    probed.clear()
    again = autotune.choose("train", "tiny-cnn", SIZE, CPU, batch_size=8, model=tiny_model)
    assert again.cached and again.key == at8.key and probed == []


def test_a_close_race_keeps_the_reference_choice():
    combos = [("fp32", True), ("fp32", False), ("bf16", False)]
    rates = {"fp32-channels_last": 10.5, "fp32-nchw": 10.0, "bf16-nchw": 10.9}
    labels = {autotune.candidate_label(*c): c for c in combos}
    assert set(labels) == set(rates)
    assert autotune._clear_winner(combos, rates) == ("fp32", False)  # 9% is not a clear win
    rates["bf16-nchw"] = 11.5
    assert autotune._clear_winner(combos, rates) == ("bf16", False)


def test_overrides_skip_the_measurement(tiny_model, _cache):
    fixed = autotune.choose(
        "infer", "tiny-cnn", SIZE, CPU, precision="fp32", channels_last=False, batch_size=8
    )
    assert (fixed.precision, fixed.channels_last, fixed.batch_size) == ("fp32", False, 8)
    assert fixed.images_per_s == {} and not fixed.cached
    train = autotune.choose("train", "tiny-cnn", SIZE, CPU, precision="fp32", channels_last=True)
    assert (train.precision, train.channels_last, train.batch_size) == ("fp32", True, None)
    assert not (_cache / "autotune").exists()  # nothing measured, nothing cached

    layout_only = autotune.choose(
        "train", "tiny-cnn", SIZE, CPU, channels_last=False, model=tiny_model, budget_s=0.2
    )
    assert layout_only.channels_last is False
    left = {autotune.candidate_label(p, False) for p in autotune.precisions(CPU, "train")}
    # Only what is left open is measured: nothing when fp32 is the CPU's one native precision.
    assert set(layout_only.images_per_s) == (left if len(left) > 1 else set())


def test_a_cache_from_another_machine_or_a_torn_file_is_measured_again(tiny_model, _cache):
    first = autotune.choose("train", "tiny-cnn", SIZE, CPU, model=tiny_model, budget_s=0.2)
    (written,) = (_cache / "autotune").glob("*.json")
    payload = json.loads(written.read_text())
    payload["key"]["capability"] = "SOME-OTHER-CPU"
    written.write_text(json.dumps(payload))
    assert not autotune.choose(
        "train", "tiny-cnn", SIZE, CPU, model=tiny_model, budget_s=0.2
    ).cached
    written.write_text('{"key": ')
    again = autotune.choose("train", "tiny-cnn", SIZE, CPU, model=tiny_model, budget_s=0.2)
    assert not again.cached and again.key == first.key


def test_choice_record_and_dtype():
    choice = autotune.Choice("fp32", True, 4, {"fp32-channels_last": 1.0}, key="k")
    assert choice.dtype(CPU) is None and choice.label == "fp32-channels_last-b4"
    assert json.loads(json.dumps(choice.record()))["label"] == choice.label
    with pytest.raises(ValueError, match="quantized model"):
        resolve_precision("int8", CPU)
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ValueError, match="mode"):
        autotune.choose("serve", "tiny-cnn", SIZE, CPU)


def test_tuned_inference_runs_the_choice_through_predict_logits(tiny_model):
    from dala_model.engine.inference import predict_logits, tuned

    model, kwargs, choice = tuned(
        tiny_model,
        model_name="tiny-cnn",
        image_size=SIZE,
        device=CPU,
        precision="fp32",
        channels_last=True,
        batch_size=3,
    )
    assert kwargs == {"device": CPU, "dtype": None, "channels_last": True, "batch_size": 3}
    assert choice.label == "fp32-channels_last-b3"
    images = torch.randint(0, 256, (5, SIZE, SIZE, 3), dtype=torch.uint8)
    logits = predict_logits(model, images, preset="paper", **kwargs)
    assert logits.shape == (5, 2) and torch.isfinite(logits).all()
