"""Model checkpoints: exact round trip on local and S3 storage, and refusal of anything else."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torchvision.models as tvm

from dala_model import storage
from dala_model.models import checkpoint
from dala_model.models.checkpoint import (
    InvalidCheckpoint,
    load_model,
    read_model_config,
    save_model,
)
from dala_model.models.registry import build_model


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(x)


def test_round_trip_rebuilds_the_exact_model(storage_root):
    torch.manual_seed(0)
    model = build_model("dalaresnet50", gate="sigmoid", reduction=8)
    # Train-time shape: channels_last memory and a torch.compile wrapper (compiled lazily, so
    # wrapping costs nothing here); neither may leak into the checkpoint.
    model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():  # make BatchNorm statistics non-trivial so they must be restored too
        model.bn1.running_mean.uniform_(-0.1, 0.1)
    uri = storage.join(storage_root, "runs", "r1", "best")
    card = {"val_accuracy": torch.tensor(0.875), "data_version": "abc123", "seed": 7}
    assert save_model(torch.compile(model), uri, preset="paper", image_size=64, card=card) == uri

    loaded = load_model(uri)
    assert not loaded.training
    assert loaded.layer4[-1].gate.__class__ is torch.nn.Sigmoid
    original = model.state_dict()
    assert all(torch.equal(value, original[key]) for key, value in loaded.state_dict().items())
    x = torch.randn(2, 3, 64, 64)
    # Same memory format, same kernels: bit-identical logits.
    assert torch.equal(
        _outputs(loaded.to(memory_format=torch.channels_last), x), _outputs(model, x)
    )

    config = read_model_config(uri)
    assert config["model"] == "dalaresnet50"
    assert config["num_classes"] == 2
    assert config["options"] == {"reduction": 8, "gate": "sigmoid", "dropout": 0.25}
    assert config["class_names"] == ["benign", "malignant"]
    assert (config["preset"], config["mean"], config["std"]) == ("paper", [0.5] * 3, [0.5] * 3)
    assert config["input_size"] == 64
    assert config["parameters"] == sum(p.numel() for p in model.parameters())
    assert config["torch_version"] == torch.__version__
    assert config["card"] == {"val_accuracy": 0.875, "data_version": "abc123", "seed": 7}
    assert storage.exists(storage.join(uri, config["weights_file"]))
    assert config["weights_file"] == f"model-{config['weights_sha256'][:16]}.safetensors"


def test_loaded_model_owns_real_trainable_tensors(saved):
    """The meta-device rebuild leaves nothing on ``meta`` and every parameter trainable."""
    loaded = load_model(str(saved))
    tensors = [*loaded.parameters(), *loaded.buffers()]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    # Own memory, not views of the bytes read from storage (safetensors' tensors are).
    assert all(t.untyped_storage().resizable() for t in tensors)
    assert all(p.requires_grad and isinstance(p, torch.nn.Parameter) for p in loaded.parameters())
    loaded.train()(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None for p in loaded.parameters() if p.requires_grad)


class _Tiny(torch.nn.Module):
    """A float32 layer, and optionally state outside the state dict (a non-persistent buffer)."""

    def __init__(self, hidden: bool) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)
        if hidden:
            self.register_buffer("scale", torch.full((1,), 2.0), persistent=False)


@pytest.mark.parametrize("hidden", [False, True], ids=["meta-rebuild", "ordinary-rebuild"])
def test_rebuild_casts_like_a_copy_and_leaves_nothing_on_meta(monkeypatch, hidden):
    monkeypatch.setattr(checkpoint, "build_model", lambda name, num_classes, **kw: _Tiny(hidden))
    weights = {"fc.weight": torch.randn(2, 3, dtype=torch.float64), "fc.bias": torch.zeros(2)}
    model = checkpoint._rebuild({"model": "x", "num_classes": 2, "options": {}}, weights)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert model.fc.weight.dtype == torch.float32  # the model's dtype, as copy_ would give
    assert torch.equal(model.fc.weight, weights["fc.weight"].float())
    if hidden:
        assert float(model.scale) == 2.0  # built for real, not left on meta


def test_default_input_size_is_the_models(tmp_path):
    uri = save_model(build_model("densenet121"), str(tmp_path / "m"), preset="imagenet")
    config = read_model_config(uri)
    assert config["input_size"] == 224
    assert config["mean"] == [0.485, 0.456, 0.406]


def test_save_refuses_models_not_built_by_the_registry(tmp_path):
    with pytest.raises(ValueError, match="needs a model made by dala_model.build_model"):
        save_model(tvm.resnet18(), str(tmp_path / "m"), preset="paper")


def test_save_refuses_an_unknown_preset(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'raw'"):
        save_model(build_model("densenet121"), str(tmp_path / "m"), preset="raw")


@pytest.fixture(scope="module")
def saved(module_tmp) -> Path:
    """One good densenet121 checkpoint; tests copy it and break the copy."""
    folder = module_tmp("good") / "ckpt"
    save_model(build_model("densenet121"), str(folder), preset="paper")
    return folder


def _copy(saved: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    target.mkdir()
    for source in saved.iterdir():
        (target / source.name).write_bytes(source.read_bytes())
    return target


def _weights(folder: Path) -> Path:
    return folder / json.loads((folder / "config.json").read_text())["weights_file"]


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _replace_weights(folder: Path, data: bytes) -> None:
    """Swap the weights and record their hash, so only the content check can object."""
    _weights(folder).write_bytes(data)
    _edit_config(folder, weights_sha256=hashlib.sha256(data).hexdigest())


class _Payload:
    """Unpickling this would create the marker file: proof that a loader executed pickle code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_empty_folder_is_not_a_checkpoint(tmp_path):
    with pytest.raises(InvalidCheckpoint, match=r"is not a model checkpoint: no config.json"):
        load_model(str(tmp_path))


def test_a_pickle_file_path_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(build_model("densenet121").state_dict(), path)
    with pytest.raises(InvalidCheckpoint, match=r"model.pt is not a model checkpoint"):
        load_model(str(path))


def test_config_that_is_not_json_is_refused(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / "config.json").write_bytes(b"\x80not json")
    with pytest.raises(InvalidCheckpoint, match=r"config.json is not valid JSON"):
        load_model(str(folder))


def test_config_from_another_tool_is_refused(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / "config.json").write_text(json.dumps({"architectures": ["ViTModel"]}))
    with pytest.raises(InvalidCheckpoint, match=r"is not a dala-model config"):
        load_model(str(folder))


def test_interrupted_resave_leaves_the_previous_checkpoint_loadable(saved, tmp_path):
    """A crash after the new weights are written but before the config is: the old model still loads."""
    folder = _copy(saved, tmp_path)
    before = load_model(str(folder)).state_dict()
    other = build_model("densenet121")
    orphan = safetensors.torch.save({k: v.contiguous() for k, v in other.state_dict().items()})
    (folder / f"model-{hashlib.sha256(orphan).hexdigest()[:16]}.safetensors").write_bytes(orphan)
    after = load_model(str(folder)).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resave_replaces_weights_and_removes_the_old_file(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    old = _weights(folder)
    save_model(build_model("densenet121"), str(folder), preset="paper")
    assert _weights(folder) != old and _weights(folder).exists() and not old.exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["config.json", _weights(folder).name]
    )


def test_weights_file_outside_the_folder_is_refused(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    _edit_config(folder, weights_file="../elsewhere.safetensors")
    with pytest.raises(InvalidCheckpoint, match="not a file in the folder"):
        load_model(str(folder))


def test_missing_weights_are_named(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    _weights(folder).unlink()
    with pytest.raises(
        InvalidCheckpoint, match=r"has a config but no model-[0-9a-f]{16}.safetensors"
    ):
        load_model(str(folder))


def test_corrupt_weights_are_refused(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    data = bytearray(_weights(folder).read_bytes())
    data[len(data) // 2] ^= 0xFF
    _weights(folder).write_bytes(bytes(data))
    with pytest.raises(InvalidCheckpoint, match=r"does not match its config \(SHA-256 differs\)"):
        load_model(str(folder))


def test_truncated_safetensors_is_refused(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    _replace_weights(folder, _weights(folder).read_bytes()[:1000])
    with pytest.raises(
        InvalidCheckpoint, match=r"model-[0-9a-f]{16}.safetensors is not a safetensors file"
    ):
        load_model(str(folder))


def test_pickle_in_place_of_safetensors_is_refused_and_not_executed(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    marker = tmp_path / "executed"
    _replace_weights(folder, pickle.dumps({"features.conv0.weight": _Payload(marker)}))
    with pytest.raises(InvalidCheckpoint, match=r"is not a safetensors file"):
        load_model(str(folder))
    assert not marker.exists()


def test_weights_of_another_model_are_refused(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    _edit_config(folder, model="resnet50")
    with pytest.raises(InvalidCheckpoint, match=r"the weights do not fit model 'resnet50'"):
        load_model(str(folder))


def test_weights_with_the_wrong_head_shape_are_refused(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    tensors = safetensors.torch.load(_weights(folder).read_bytes())
    tensors["classifier.weight"] = torch.zeros(3, 1024)
    _replace_weights(folder, safetensors.torch.save(tensors))
    with pytest.raises(InvalidCheckpoint, match=r"size mismatch for classifier.weight"):
        load_model(str(folder))


def test_unknown_model_in_config_is_refused(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    _edit_config(folder, model="alexnet")
    with pytest.raises(
        InvalidCheckpoint, match=r"its config cannot rebuild a model: unknown model 'alexnet'"
    ):
        load_model(str(folder))
