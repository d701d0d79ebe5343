"""Explanations and the paper protocol: Grad-CAM maps, `dala explain`, the gallery, PROTOCOLS."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from dala_model.cli import build_parser, main
from dala_model.cli.train import config_from_args
from dala_model.data.ingest import ingest
from dala_model.data.splits import make_split
from dala_model.data.synth import generate
from dala_model.engine.config import PROTOCOLS, TrainConfig, apply_protocol
from dala_model.engine.train import train
from dala_model.models._spec import CAM_RESHAPES, ModelSpec
from dala_model.models.pretrained import PretrainedWeightsUnavailable
from dala_model.models.registry import build_model, get_model_spec, list_models
from dala_model.report import build_report
from dala_model.report.explain import (
    INDEX_COLUMNS,
    ExplanationNotSupported,
    cam_layer_of,
    cam_target_of,
    grad_cam,
    stratified_sample,
    vit_tokens,
)

SIZE = 64
MAG = 400


def tiny_cnn() -> nn.Module:
    """conv -> ReLU -> conv -> ReLU (the CAM layer, ``features.3``) -> global pool -> Linear."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
        ),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_grad_cam_gives_one_normalised_map_per_image_at_input_size(method):
    model = tiny_cnn()
    x = torch.randn(3, 3, 40, 48)
    maps = grad_cam(model, "0.3", x, [1, 0, 1], method)
    assert maps.shape == (3, 40, 48) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0 + 1e-6
    assert grad_cam(model, "0.3", x).shape == (3, 40, 48)  # default: the predicted class
    with pytest.raises(ValueError, match="method"):
        grad_cam(model, "0.3", x, method="scorecam")


def _patch_images(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Noise images; the positives carry a bright 8x8 patch in their red channel somewhere."""
    x = 0.3 * torch.randn(n, 3, 32, 32, generator=generator)
    y = torch.arange(n) % 2
    boxes = []
    for i in range(n):
        r, c = torch.randint(0, 24, (2,), generator=generator).tolist()
        boxes.append((r, c))
        if y[i]:
            x[i, 0, r : r + 8, c : c + 8] += 2.0
    return x, y, boxes


def test_heatmap_mass_lies_on_the_region_that_carries_the_class_signal():
    model = tiny_cnn()
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        x, y, _ = _patch_images(32, generator)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x, y, boxes = _patch_images(16, generator)
    positives = [i for i in range(16) if y[i]]
    assert (model(x).argmax(1)[positives] == 1).all(), "the tiny CNN learned the patch"
    maps = grad_cam(model, "0.3", x[positives], [1] * len(positives))
    shares = []
    for cam, i in zip(maps, positives, strict=True):
        r, c = boxes[i]
        inside = np.zeros_like(cam, dtype=bool)
        inside[max(r - 2, 0) : r + 10, max(c - 2, 0) : c + 10] = True  # the patch + a 2 px rim
        shares.append(cam[inside].sum() / cam.sum())
    # The region (12x12 of 32x32) is 14% of the image; most of the map's mass lies on it.
    assert np.median(shares) > 0.6, shares


def test_sample_is_stratified_with_the_most_confident_errors_first():
    rows = []
    for i, (truth, prob) in enumerate(
        [(0, 0.95), (0, 0.7), (1, 0.05), (1, 0.3), (1, 0.99), (1, 0.8), (0, 0.01), (0, 0.2)]
    ):
        rows.append(
            {
                "image_id": f"img{i}",
                "y_true": truth,
                "prob_malignant": prob,
                "y_pred": int(prob >= 0.5),
            }
        )
    sample = stratified_sample(pd.DataFrame(rows), 6)
    assert list(sample["category"]) == ["FP", "FN", "TP", "TN", "FP", "FN"]
    assert list(sample["image_id"]) == ["img0", "img2", "img4", "img6", "img1", "img3"]
    assert len(stratified_sample(pd.DataFrame(rows), 50)) == 8  # no more than there are
    only_right = pd.DataFrame(rows[4:])
    assert list(stratified_sample(only_right, 3)["category"]) == ["TP", "TN", "TP"]


@pytest.mark.parametrize("name", list_models())
def test_every_spec_names_a_real_cam_layer_or_refuses_honestly(name):
    spec = get_model_spec(name)
    if spec.cam_layer is None:
        with pytest.raises(ExplanationNotSupported, match="not supported"):
            cam_layer_of(name)
        return
    with torch.device("meta"):
        model = build_model(name)
    assert isinstance(model.get_submodule(cam_layer_of(name)), nn.Module)


# ---------------------------------------------------------------- ViTs: the token reshape


def _small_vit(name: str) -> tuple[nn.Module, int]:
    """A few-thousand-parameter model with the module layout of the registry's ``name``, so the
    spec's own ``cam_layer`` path and token layout are what is exercised, and its input side."""
    import timm
    import torchvision.models as tvm

    from dala_model.models.vit import PaperViT

    torch.manual_seed(0)
    if name == "vit_paper":
        return PaperViT(2, image_size=32, patch=8, dim=16, depth=6, heads=2, mlp_dim=32), 32
    if name == "vit_b_16":
        model = tvm.VisionTransformer(
            image_size=32, patch_size=8, num_layers=12, num_heads=2, hidden_dim=16, mlp_dim=32
        )
        model.heads = nn.Sequential()
        model.heads.add_module("head", nn.Linear(16, 2))  # torchvision zero-inits its head
        return model, 32
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=28,
        patch_size=14,
        embed_dim=16,
        depth=12,
        num_heads=2,
        num_classes=2,
        dynamic_img_size=True,
        init_values=1.0,
    )
    return model, 28


@pytest.mark.parametrize("name", ["vit_paper", "vit_b_16", "dinov2_vitb14"])
def test_vit_grad_cam_reads_the_token_grid_at_the_registry_layer(name):
    target = cam_target_of(name)
    assert target.reshape == "vit_tokens" and target.layer.endswith(("norm1", "ln_1"))
    model, side = _small_vit(name)
    x = torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(1))
    maps = grad_cam(model, target.layer, x, [1, 0, 1], "gradcam", target.reshape)
    assert maps.shape == (3, side, side) and np.isfinite(maps).all()
    assert maps.min() >= 0.0 and maps.max() <= 1.0 + 1e-6
    assert (maps.std(axis=(1, 2)) > 1e-3).all()  # a map over the grid, not a constant
    plus = grad_cam(model, target.layer, x, [1, 0, 1], "gradcam++", target.reshape)
    assert plus.shape == maps.shape and np.isfinite(plus).all()


def test_the_papers_vit_gives_a_map_at_a_non_square_size():
    """The real 51M-parameter vit_paper (at 32x48: a 2x3 grid, resampled positions)."""
    model = build_model("vit_paper")
    target = cam_target_of("vit_paper")
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    maps = grad_cam(model, target.layer, x, [1, 1], "gradcam", target.reshape)
    assert maps.shape == (2, 32, 48) and np.isfinite(maps).all()
    assert (maps.std(axis=(1, 2)) > 1e-3).all()


def test_vit_tokens_drops_the_cls_token_and_keeps_the_grid_order():
    rows, cols, channels = 2, 3, 4
    grid = torch.arange(rows * cols * channels, dtype=torch.float32).reshape(
        1, rows, cols, channels
    )
    tokens = torch.cat([torch.full((1, 1, channels), -1.0), grid.flatten(1, 2)], dim=1)
    out = vit_tokens(tokens, height=32, width=48)
    assert out.shape == (1, channels, rows, cols)
    assert torch.equal(out, grid.permute(0, 3, 1, 2))  # token r*cols + c lands at (r, c)
    with pytest.raises(ExplanationNotSupported, match="not a CLS token plus a patch grid"):
        vit_tokens(tokens[:, :-1], height=32, width=48)  # 5 patches: no 2:3 grid
    with pytest.raises(ExplanationNotSupported, match="not a ViT token layer"):
        vit_tokens(torch.zeros(1, 4, 2, 2), height=32, width=32)


def test_cam_reshape_names_are_data_checked_when_a_spec_is_made():
    assert CAM_RESHAPES == ("vit_tokens",)
    spec = get_model_spec("vit_paper")
    fields = {f: getattr(spec, f) for f in spec.__dataclass_fields__}
    with pytest.raises(ValueError, match="cam_reshape='tokens' is not one of"):
        ModelSpec(**fields | {"cam_reshape": "tokens"})
    with pytest.raises(ValueError, match="cam_layer is None"):
        ModelSpec(**fields | {"cam_layer": None})


# ---------------------------------------------------------------- the paper protocol


def test_paper_protocol_sets_the_published_fields_and_flags_override_it(tmp_path):
    parser = build_parser()
    base = ["train", str(tmp_path), "--magnification", "40", "--protocol", "paper"]
    config = config_from_args(parser.parse_args(base))
    assert (config.scheme, config.pretrained, config.recalibrate_bn, config.precision) == (
        "paper",
        True,
        False,
        "fp32",
    )
    assert (config.batch_size, config.epochs, config.lr, config.monitor) == (
        32,
        50,
        1e-4,
        "val_accuracy",
    )
    assert config.model_options == {"dropout": 0.25}
    flags = parser.parse_args([*base, "--no-pretrained", "--epochs", "2", "--model", "resnet50"])
    overridden = config_from_args(flags)
    assert overridden.pretrained is False and overridden.epochs == 2
    assert overridden.model_options == {}  # torchvision's ResNet50 has no dropout option
    vit = config_from_args(parser.parse_args([*base, "--model", "vit_paper"]))
    assert vit.pretrained is False  # no ImageNet weights exist: trains from scratch, as published
    assert vit.model_options == {"dropout": 0.25}
    default = config_from_args(parser.parse_args(["train", str(tmp_path), "--magnification", "40"]))
    assert default == TrainConfig(root=str(tmp_path), magnification=40)  # patient: the defaults
    assert PROTOCOLS["patient"] == {}
    with pytest.raises(ValueError, match="unknown protocol"):
        apply_protocol({"root": "x", "magnification": 40}, "kaggle")


def test_paper_protocol_without_cached_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("DALA_OFFLINE", "1")
    config = TrainConfig(**apply_protocol({"root": "x", "magnification": 40}, "paper"))
    with pytest.raises(PretrainedWeightsUnavailable, match="resnet50-0676ba61.pth"):
        build_model(config.model, pretrained=config.pretrained, **config.model_options)


# ---------------------------------------------------------------- a tiny real run


@pytest.fixture(scope="module")
def paper_run(module_tmp):
    """One 1-epoch DALAResNet50 run at 64 px under the paper protocol, made through `dala train`."""
    base = module_tmp("explain")
    generate(str(base / "source"), patients=12, images_per_patient=4, seed=0, size=(350, 230))
    root = str(base / "root")
    ingest(str(base / "source"), root, cache_size=SIZE)
    make_split(root, "paper", seed=0)
    partial = base / "tiny.json"  # what a CPU test changes; the protocol fills in the rest
    partial.write_text(
        json.dumps(
            {
                "root": root,
                "magnification": MAG,
                "image_size": SIZE,
                "epochs": 1,
                "batch_size": 8,
                "device": "cpu",
                "channels_last": False,
            }
        )
    )
    args = ["train", "--config", str(partial), "--protocol", "paper", "--no-pretrained"]
    config = config_from_args(build_parser().parse_args(args))
    result = train(config)
    return root, config, result


def test_paper_protocol_config_round_trips_through_config_json(paper_run):
    _, config, result = paper_run
    recorded = Path(result.run_uri) / "config.json"
    assert json.loads(recorded.read_text())["config"]["scheme"] == "paper"
    again = config_from_args(build_parser().parse_args(["train", "--config", str(recorded)]))
    assert again == config
    assert (again.recalibrate_bn, again.precision, again.model_options) == (
        False,
        "fp32",
        {"dropout": 0.25},
    )


def test_dala_explain_writes_overlays_index_and_channel_weights(paper_run, capsys):
    root, _, result = paper_run
    assert main(["explain", root, "--run", result.run_id, "--images", "4"]) == 0
    printed = json.loads(capsys.readouterr().out)
    folder = Path(result.run_uri) / "explain"
    index = pd.read_parquet(folder / "index.parquet")
    assert tuple(index.columns) == INDEX_COLUMNS
    assert printed["images"] == len(index) == 4 and printed["attention_channels"] is True
    assert set(index["category"]) <= {"TP", "TN", "FP", "FN"}
    predictions = pd.read_parquet(Path(result.run_uri) / "test_predictions.parquet")
    merged = index.merge(predictions, on="image_id", suffixes=("", "_run"))
    assert (merged["prob_malignant"] == merged["prob_malignant_run"]).all()
    for name in index["file"]:
        with (folder / name).open("rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    channels = pd.read_parquet(folder / "channels.parquet")
    assert len(channels) == 2048 and {"benign", "malignant", "difference"} <= set(channels)
    summary = json.loads((folder / "channels.json").read_text())
    assert len(summary["top_malignant"]) == 10
    top = summary["top_malignant"][0]
    assert top["malignant"] == pytest.approx(channels["malignant"].max())
    assert (folder / "channels.png").stat().st_size > 0
    # Fewer images the second time: the folder holds exactly what the index lists.
    assert main(["explain", root, "--run", result.run_id, "--images", "2"]) == 0
    assert len(list(folder.glob("[0-9]*.png"))) == 2


def test_explain_refuses_a_model_without_a_cam_layer_clearly(paper_run, capsys, tmp_path):
    root, _, result = paper_run
    record = json.loads((Path(result.run_uri) / "config.json").read_text())
    record["config"]["model"] = "swin_b"
    fake = Path(root) / "runs" / "swin-fake"
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps(record))
    assert main(["explain", root, "--run", "swin-fake"]) == 2
    err = capsys.readouterr().err
    assert "not supported for 'swin_b'" in err and "vit_paper" in err  # and what is supported
    (fake / "config.json").unlink()
    fake.rmdir()


def test_report_has_a_gallery_per_magnification(paper_run):
    root, _, result = paper_run
    assert main(["explain", root, "--run", result.run_id, "--images", "4"]) == 0
    build_report(root)
    reports = Path(root) / "reports"
    text = (reports / "report.md").read_text()
    assert "## Grad-CAM gallery" in text and "### 400X" in text
    assert (reports / "gallery_400x.png").stat().st_size > 0
    assert (reports / f"attention_channels_{result.run_id}.png").exists()
    assert "Grad-CAM gallery" in (reports / "report.html").read_text()
