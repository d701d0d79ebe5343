"""Training and model-loading faults on real data and real models: divergence, hostile or broken
checkpoints, empty batches, and manifest rows whose file has gone or changed.

Corrupt weights, a weights file from another model and a pickle posing as safetensors are
covered in ``tests/test_checkpoint.py``; this file adds the torch.load paths (resume and
pretrained weights) and the inference-side data checks.
"""

from __future__ import annotations

import ast
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dala_model import storage
from dala_model.data.cache import build_cache
from dala_model.data.dataset import decode_pngs
from dala_model.data.ingest import ingest
from dala_model.data.manifest import read_manifest
from dala_model.data.splits import make_split
from dala_model.engine.config import TrainConfig
from dala_model.engine.inference import predict_logits
from dala_model.engine.train import NonFiniteLoss, train
from dala_model.models.pretrained import read_state_dict
from dala_model.models.registry import build_model


class _CreatesMarker:
    """Unpickling this creates ``marker``: a stand-in for any code an attacker would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _hostile_torch_file(marker: Path) -> bytes:
    """A real ``torch.save`` zip file whose pickle calls ``Path.touch`` when loaded unsafely."""
    buffer = io.BytesIO()
    torch.save({"model": {"fc.weight": _CreatesMarker(marker)}, "state": {}}, buffer)
    return buffer.getvalue()


def test_the_hostile_payload_really_executes_when_unpickled(tmp_path):
    """Control: without this, 'the marker does not exist' below would prove nothing."""
    marker = tmp_path / "executed"
    pickle.loads(pickle.dumps(_CreatesMarker(marker)))
    assert marker.exists()


@pytest.fixture(scope="module")
def small_root(module_tmp, dataset_files) -> str:
    """64 synthetic images -> manifest, 32px cache, patient split (local)."""
    base = module_tmp("train")
    for relpath, data in dataset_files.items():
        storage.write_bytes_atomic(str(base / "source" / relpath), data)
    root = str(base / "root")
    ingest(str(base / "source"), root, workers=2, cache_size=32)
    make_split(root, "patient", seed=0)
    return root


def _config(root: str, **overrides) -> TrainConfig:
    fields = dict(root=root, magnification=40, image_size=32, epochs=2, batch_size=4, seed=0)
    return TrainConfig(**{**fields, **overrides})


def test_diverging_loss_stops_the_run_naming_epoch_and_batch_and_promotes_nothing(small_root):
    config = _config(
        small_root, lr=1e12, run_id="diverges"
    )  # Adam steps of 1e12: NaN in a step or two
    with pytest.raises(NonFiniteLoss, match=r"diverges: loss became nan at epoch 1, batch \d+"):
        train(config)
    run = Path(small_root) / "runs" / "diverges"
    assert not (run / "run.json").exists(), "a diverged run must not be marked complete"
    assert not (run / "best").exists(), "no model from a non-finite epoch may be promoted"
    assert not (run / "checkpoint.pt").exists()
    assert not (run / "history.parquet").exists()


def test_hostile_checkpoint_is_refused_on_resume_and_never_executed(small_root, tmp_path):
    marker = tmp_path / "executed"
    run = Path(small_root) / "runs" / "hostile"
    storage.write_bytes_atomic(str(run / "checkpoint.pt"), _hostile_torch_file(marker))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train(_config(small_root, run_id="hostile", resume=True))
    assert not marker.exists(), "loading the checkpoint executed code from it"
    assert not (run / "run.json").exists()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_hostile_pretrained_weights_are_refused_and_never_executed(tmp_path, suffix):
    marker = tmp_path / "executed"
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(_hostile_torch_file(marker))
    with pytest.raises(ValueError, match=r"cannot read weights from .*weights_only=True"):
        read_state_dict(path)
    assert not marker.exists()


def test_every_torch_load_in_the_library_is_weights_only():
    """Static check over dala_model/: a new torch.load without weights_only=True fails here."""
    package = Path(__file__).resolve().parents[2] / "dala_model"
    calls = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                safe = any(
                    k.arg == "weights_only"
                    and isinstance(k.value, ast.Constant)
                    and k.value.value is True
                    for k in node.keywords
                )
                calls.append((f"{path.name}:{node.lineno}", safe))
    assert calls, "found no torch.load at all: the check is not looking at the library"
    assert [where for where, safe in calls if not safe] == []
    assert "pickle.load" not in "".join(p.read_text() for p in package.rglob("*.py"))


def test_an_empty_batch_is_a_clear_error():
    model = build_model("dalaresnet50")
    empty = np.zeros((0, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="empty batch"):
        predict_logits(model, empty, preset="paper", device=torch.device("cpu"))


@pytest.fixture
def fresh_root(tmp_path, dataset_files) -> tuple[str, str]:
    """A manifest with no cache yet, so later steps must read the source files again."""
    for relpath, data in list(dataset_files.items())[:8]:
        storage.write_bytes_atomic(str(tmp_path / "source" / relpath), data)
    root = str(tmp_path / "root")
    ingest(str(tmp_path / "source"), root, cache_size=None)
    return str(tmp_path / "source"), root


def test_manifest_row_whose_file_was_deleted_is_named(fresh_root):
    _, root = fresh_root
    uri = read_manifest(root)["uri"].iloc[3]
    Path(uri).unlink()
    with pytest.raises(FileNotFoundError, match=f"{uri} does not exist"):
        build_cache(root, 32)


def test_manifest_row_whose_file_changed_is_refused_by_the_cache(fresh_root):
    _, root = fresh_root
    uri = read_manifest(root)["uri"].iloc[2]
    Path(uri).write_bytes(Path(read_manifest(root)["uri"].iloc[5]).read_bytes())
    with pytest.raises(
        ValueError, match=r"changed since ingest \(sha256 differs\): re-run `dala ingest`"
    ):
        build_cache(root, 32)


def test_manifest_row_whose_file_changed_is_refused_without_the_cache(fresh_root):
    _, root = fresh_root
    manifest = read_manifest(root)
    Path(manifest["uri"].iloc[2]).write_bytes(Path(manifest["uri"].iloc[5]).read_bytes())
    with pytest.raises(ValueError, match="changed since ingest"):
        decode_pngs(manifest, 32)
