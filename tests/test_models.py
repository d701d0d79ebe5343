"""The registry models: published architecture and counts, forward over every model, pretrained loading."""

from __future__ import annotations

import pickle
import re
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torchvision.models as tvm
from torch import nn

from dala_model import storage
from dala_model.cli import main as dala
from dala_model.models.dalaresnet import LightweightAttention
from dala_model.models.pretrained import PretrainedWeightsUnavailable
from dala_model.models.registry import build_model, get_model_spec, list_models, parameter_count
from dala_model.models.seresnet import SqueezeExcite
from dala_model.models.vit import Block

# Small inputs keep the suite fast; torchvision's ViT-B/16 and VGGIN-Net (whose Linear head reads
# the flattened 14x14 map) only accept their native 224 px. vit_paper at 64 px resamples its
# position grid; its native 224 px path has its own test.
FORWARD_SIZE = {
    "dalaresnet50": 64,
    "resnet50": 64,
    "seresnet50": 64,
    "densenet121": 64,
    "vgg16": 64,
    "vit_b_16": 224,
    "swin_b": 64,
    "dinov2_vitb14": 56,
    "vgginnet": 224,
    "vit_paper": 64,
    "seresnet50_paper": 64,
}

# torchvision initialises its ViT's head weights to zero.
ZERO_INIT_HEAD = {"vit_b_16"}


def test_every_registry_model_has_a_forward_size():
    assert sorted(FORWARD_SIZE) == sorted(list_models())


@pytest.mark.parametrize("name", list_models())
def test_forward_gives_two_logits_and_meta_count_is_real_count(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    size = FORWARD_SIZE[name]
    with torch.inference_mode():
        logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 2)
    assert torch.isfinite(logits).all()
    assert sum(p.numel() for p in model.parameters()) == parameter_count(name)
    assert model.dala_build == {
        "name": name,
        "num_classes": 2,
        "options": get_model_spec(name).options,
    }


@pytest.mark.parametrize("name", list_models())
def test_backward_reaches_every_parameter(name):
    # Batch 1 (every model's BatchNorm sees more than one value per channel at these sizes).
    torch.manual_seed(0)
    model = build_model(name).train()
    size = FORWARD_SIZE[name]
    loss = nn.functional.cross_entropy(model(torch.randn(1, 3, size, size)), torch.tensor([1]))
    loss.backward()
    assert torch.isfinite(loss)
    parameters = list(model.named_parameters())
    for key, parameter in parameters:
        assert parameter.grad is not None, key
        assert torch.isfinite(parameter.grad).all(), key
    # Some residual branches start at zero (timm zero-initialises their last BatchNorm), so not
    # every gradient is non-zero at init; the two ends of the network are, except where the head
    # itself starts at zero and so passes no gradient back on the first step.
    ends = parameters[-1:] if name in ZERO_INIT_HEAD else (parameters[0], parameters[-1])
    for key, parameter in ends:
        assert parameter.grad.abs().sum() > 0, key


def test_num_classes_sets_the_head():
    model = build_model("densenet121", num_classes=5).eval()
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("dalaresnet50", 25_611_842),
        ("vgg16", 134_268_738),
        ("swin_b", 86_745_274),
        ("vit_paper", 51_375_106),
        ("seresnet50_paper", 27_073_090),
    ],
)
def test_parameter_counts_match_the_paper(name, expected):
    assert parameter_count(name) == expected
    assert get_model_spec(name).paper_params == expected


def test_dalaresnet50_count_decomposes_as_published():
    # ResNet50 without fc + one attention block (2048 -> 512 -> 2048, biases) + Linear(2048, 2).
    backbone = sum(
        p.numel() for n, p in tvm.resnet50().named_parameters() if not n.startswith("fc.")
    )
    attention = sum(p.numel() for p in LightweightAttention(2048, 4).parameters())
    assert (backbone, attention) == (23_508_032, 2_099_712)
    assert backbone + attention + 2048 * 2 + 2 == parameter_count("dalaresnet50")


def test_attention_is_layer4_last_with_the_published_sequence():
    model = build_model("dalaresnet50")
    assert len(model.layer4) == 4
    attention = model.layer4[-1]
    assert isinstance(attention, LightweightAttention)
    layers = list(attention.children())
    assert [type(m) for m in layers] == [
        nn.AdaptiveAvgPool2d,
        nn.Linear,
        nn.LeakyReLU,
        nn.Linear,
        nn.ReLU,
    ]
    assert (layers[1].in_features, layers[1].out_features) == (2048, 512)
    assert (layers[3].in_features, layers[3].out_features) == (512, 2048)
    assert [type(m) for m in model.fc] == [nn.Dropout, nn.Linear]
    assert model.fc[0].p == 0.25 and model.fc[1].out_features == 2


def test_attention_scales_channels_by_its_dual_activated_weights():
    torch.manual_seed(0)
    block = LightweightAttention(channels=8, reduction=2)
    x = torch.randn(3, 8, 5, 5)
    context = x.mean(dim=(2, 3))
    hidden = nn.functional.leaky_relu(context @ block.reduce.weight.T + block.reduce.bias, 0.01)
    weights = torch.relu(hidden @ block.expand.weight.T + block.expand.bias)
    torch.testing.assert_close(block(x), x * weights[:, :, None, None])


def test_gradient_reaches_the_attention_weights():
    torch.manual_seed(0)
    model = build_model("dalaresnet50").train()
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([0, 1]))
    loss.backward()
    attention = model.layer4[-1]
    for layer in (attention.reduce, attention.expand):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_gate_and_reduction_options_change_the_module():
    model = build_model("dalaresnet50", gate="sigmoid", reduction=16, dropout=0.5)
    attention = model.layer4[-1]
    assert isinstance(attention.gate, nn.Sigmoid)
    assert attention.reduce.out_features == 128
    assert model.fc[0].p == 0.5
    assert model.dala_build["options"] == {"reduction": 16, "gate": "sigmoid", "dropout": 0.5}
    assert (
        parameter_count("dalaresnet50", reduction=16)
        == 25_611_842 - 2_099_712 + 2 * 2048 * 128 + 128 + 2048
    )


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_vgginnet_count_decomposes_as_its_authors_code_builds_it():
    model = build_model("vgginnet")
    assert _count(model.features) == 7_635_264
    assert len(model.features) == 24 and isinstance(model.features[-1], nn.MaxPool2d)
    inception = model.inception
    convs = [inception.branch1[0], inception.branch3[0], inception.branch5[0]]
    assert [(c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (64, (1, 1), (0, 0)),
        (128, (3, 3), (1, 1)),
        (32, (5, 5), (2, 2)),
    ]
    assert (inception.pool.kernel_size, inception.pool.stride, inception.pool.padding) == (3, 1, 1)
    assert model.norm.num_features == 736
    assert [type(m) for m in model.classifier] == [nn.Flatten, nn.Dropout, nn.Linear]
    assert model.classifier[1].p == 0.4
    assert (model.classifier[2].in_features, model.classifier[2].out_features) == (144_256, 2)
    assert _count(model) == 8_957_666 == parameter_count("vgginnet")
    spec = get_model_spec("vgginnet")
    # The paper's 38,139,938 is kept beside ours, and the note says why they differ.
    assert spec.paper_params == 38_139_938
    assert "29,182,272" in spec.note and "not padded" in spec.note


def test_vgginnet_refuses_inputs_other_than_224():
    with pytest.raises(ValueError, match=r"vgginnet takes 224x224 inputs only .* got 64x64"):
        build_model("vgginnet")(torch.randn(1, 3, 64, 64))


def test_vit_paper_count_decomposes_as_vit_pytorch_before_1_0():
    model = build_model("vit_paper")
    block = model.blocks[0]
    assert isinstance(block, Block) and len(model.blocks) == 6
    assert block.attn.qkv.bias is None and block.attn.proj.bias is not None
    assert (block.attn.qkv.in_features, block.attn.qkv.out_features) == (1024, 3072)
    assert block.attn.heads == 16
    assert (block.mlp[0].out_features, block.mlp[3].out_features) == (2048, 1024)
    assert _count(block) == 8_396_800
    assert _count(model.patch_embed) == 787_456
    assert model.pos_embed.shape == (1, 197, 1024) and model.cls_token.shape == (1, 1, 1024)
    assert _count(model.norm) + _count(model.head) == 4_098
    assert 787_456 + 1_024 + 201_728 + 6 * 8_396_800 + 4_098 == _count(model) == 51_375_106


def test_vit_paper_at_224_uses_its_positions_as_learned_and_resamples_other_sizes():
    torch.manual_seed(0)
    model = build_model("vit_paper").eval()
    assert model.positions(14, 14) is model.pos_embed
    resampled = model.positions(4, 4)
    assert resampled.shape == (1, 17, 1024)
    torch.testing.assert_close(resampled[:, 0], model.pos_embed[:, 0])
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 2)
    with pytest.raises(ValueError, match=r"multiples of its 16 px patches .* got 70x70"):
        model(torch.randn(1, 3, 70, 70))


def test_vit_paper_refuses_pretrained_weights_and_names_the_alternative():
    with pytest.raises(ValueError, match=r"vit_paper has no pretrained weights: .* from scratch"):
        build_model("vit_paper", pretrained=True)
    with pytest.raises(ValueError, match=r"Use vit_b_16"):
        build_model("vit_paper", pretrained=True)


def test_seresnet50_paper_count_decomposes_as_published():
    model = build_model("seresnet50_paper")
    se = [m for m in model.modules() if isinstance(m, SqueezeExcite)]
    assert len(se) == 16
    assert all(m.reduce.bias is None and m.expand.bias is None for m in se)
    assert [m.reduce.out_features * 16 for m in se[:1]] == [256]
    trunk = sum(
        p.numel()
        for n, p in model.named_parameters()
        if ".se." not in n and not n.startswith("fc.")
    )
    assert (trunk, sum(_count(m) for m in se), _count(model.fc)) == (
        23_508_032,
        2_514_944,
        1_050_114,
    )
    assert [type(m) for m in model.fc] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert _count(model) == 27_073_090


def test_timm_seresnet50_and_vit_b_16_stay_as_the_pretrainable_variants():
    assert get_model_spec("seresnet50").source == "timm"
    assert get_model_spec("vit_b_16").weights is not None
    assert "vit_paper" in get_model_spec("vit_b_16").note
    assert "seresnet50_paper" in get_model_spec("seresnet50").note


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: build_model("resnet18"),
            r"unknown model 'resnet18'; choose one of \['dalaresnet50'",
        ),
        (
            lambda: build_model("vgg16", gate="relu"),
            r"'vgg16' does not take option\(s\) \['gate'\]",
        ),
        (lambda: build_model("dalaresnet50", gate="tanh"), r"gate='tanh' is not one of"),
        (
            lambda: build_model("dalaresnet50", reduction=3),
            r"reduction=3 must be a positive divisor",
        ),
        (lambda: build_model("dalaresnet50", dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
        (
            lambda: build_model("resnet50", pretrained=""),
            r"pretrained must be False, True or a path",
        ),
    ],
)
def test_bad_arguments_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_offline_pretrained_without_cache_fails_fast_and_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("DALA_OFFLINE", "1")
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    started = time.perf_counter()
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        build_model("dalaresnet50", pretrained=True)
    assert time.perf_counter() - started < 10
    message = str(info.value)
    assert str(expected) in message
    assert "https://download.pytorch.org/models/resnet50-0676ba61.pth" in message
    assert "pretrained='<local path or fsspec URL>'" in message
    assert isinstance(info.value, RuntimeError)


def _cache(torch_home: Path, name: str) -> Path:
    path = torch_home / "hub" / "checkpoints" / get_model_spec(name).weights.file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_pretrained_true_loads_the_cached_backbone_and_keeps_attention_and_head_fresh(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("DALA_OFFLINE", "1")
    torch.manual_seed(1)
    imagenet = tvm.resnet50()  # a 1000-way ResNet50 in torchvision's file format
    torch.save(imagenet.state_dict(), _cache(tmp_path, "dalaresnet50"))
    torch.manual_seed(2)
    model = build_model("dalaresnet50", pretrained=True)
    torch.manual_seed(2)
    fresh = build_model("dalaresnet50")
    torch.testing.assert_close(model.conv1.weight, imagenet.conv1.weight)
    torch.testing.assert_close(model.layer4[2].bn3.running_var, imagenet.layer4[2].bn3.running_var)
    torch.testing.assert_close(model.layer4[3].reduce.weight, fresh.layer4[3].reduce.weight)
    torch.testing.assert_close(model.fc[1].weight, fresh.fc[1].weight)


def test_vgginnet_pretrained_loads_the_vgg16_file_into_its_trunk(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("DALA_OFFLINE", "1")
    assert get_model_spec("vgginnet").weights == get_model_spec("vgg16").weights
    torch.manual_seed(1)
    features = tvm.vgg16().features  # all five blocks, as in torchvision's file
    published = {f"features.{k}": v for k, v in features.state_dict().items()}
    # The dense layers are dropped before loading, so stand-ins of their keys suffice
    # (the real ones are 480 MB).
    published |= {
        f"classifier.{i}.{p}": torch.zeros(1) for i in (0, 3, 6) for p in ("weight", "bias")
    }
    torch.save(published, _cache(tmp_path, "vgg16"))
    torch.manual_seed(2)
    model = build_model("vgginnet", pretrained=True)
    torch.manual_seed(2)
    fresh = build_model("vgginnet")
    torch.testing.assert_close(model.features[0].weight, features[0].weight)
    torch.testing.assert_close(model.features[21].bias, features[21].bias)
    torch.testing.assert_close(model.inception.branch3[0].weight, fresh.inception.branch3[0].weight)
    torch.testing.assert_close(model.classifier[2].weight, fresh.classifier[2].weight)


def test_seresnet50_paper_pretrained_loads_resnet50_and_keeps_se_and_head_fresh(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("DALA_OFFLINE", "1")
    torch.manual_seed(1)
    imagenet = tvm.resnet50()
    torch.save(imagenet.state_dict(), _cache(tmp_path, "seresnet50_paper"))
    torch.manual_seed(2)
    model = build_model("seresnet50_paper", pretrained=True)
    torch.manual_seed(2)
    fresh = build_model("seresnet50_paper")
    torch.testing.assert_close(model.conv1.weight, imagenet.conv1.weight)
    torch.testing.assert_close(model.layer3[5].conv3.weight, imagenet.layer3[5].conv3.weight)
    torch.testing.assert_close(model.layer4[2].se.reduce.weight, fresh.layer4[2].se.reduce.weight)
    torch.testing.assert_close(model.fc[3].weight, fresh.fc[3].weight)


def test_pretrained_true_reads_torchvision_legacy_densenet_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("DALA_OFFLINE", "1")
    imagenet = tvm.densenet121()
    # The published file predates both the "norm1" names and BatchNorm's num_batches_tracked.
    legacy = {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
        for k, v in imagenet.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    torch.save(legacy, _cache(tmp_path, "densenet121"))
    model = build_model("densenet121", pretrained=True)
    torch.testing.assert_close(
        model.features.denseblock1.denselayer1.norm1.weight,
        imagenet.features.denseblock1.denselayer1.norm1.weight,
    )
    assert model.classifier.out_features == 2


def test_pretrained_path_loads_a_safetensors_backbone(storage_root):
    source = tvm.densenet121()
    uri = storage.join(storage_root, "weights", "densenet121.safetensors")
    storage.write_bytes_atomic(uri, safetensors.torch.save(source.state_dict()))
    model = build_model("densenet121", pretrained=uri)
    torch.testing.assert_close(model.features.conv0.weight, source.features.conv0.weight)
    assert model.classifier.weight.shape == (2, 1024)


def test_pretrained_path_for_another_architecture_is_refused(tmp_path):
    path = tmp_path / "densenet.pt"
    torch.save(tvm.densenet121().state_dict(), path)
    with pytest.raises(ValueError, match=r"weights at .*densenet.pt do not fit model 'resnet50'"):
        build_model("resnet50", pretrained=str(path))


class _Payload:
    """Unpickling this would create the marker file: proof that a loader executed pickle code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pretrained_pickle_payload_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"conv1.weight": _Payload(marker)}, protocol=2))
    with pytest.raises(ValueError, match=r"cannot read weights from .*evil.pth"):
        build_model("resnet50", pretrained=str(path))
    assert not marker.exists()


def test_pretrained_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        build_model("resnet50", pretrained=str(tmp_path / "nothing.safetensors"))


def test_dala_models_prints_counts_next_to_the_paper(capsys):
    assert dala(["models"]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = {line.split()[0]: line for line in out if line.strip()}
    assert set(list_models()) <= set(lines)
    assert re.search(r"torchvision\s+25,611,842\s+25,611,842\s+yes", lines["dalaresnet50"])
    assert re.search(r"torchvision\s+134,268,738\s+134,268,738\s+yes", lines["vgg16"])
    assert re.search(r"timm\s+86,581,250\s+86,582,018\s+no", lines["dinov2_vitb14"])
    assert "ResNet50_Weights.IMAGENET1K_V1" in lines["dalaresnet50"]
    assert re.search(r"torch\s+8,957,666\s+38,139,938\s+no", lines["vgginnet"])
    assert re.search(r"torch\s+51,375,106\s+51,375,106\s+yes\s+224x224\s+-$", lines["vit_paper"])
    assert re.search(r"torchvision\s+27,073,090\s+27,073,090\s+yes", lines["seresnet50_paper"])
    notes = {line.split()[1].rstrip(":"): line for line in out if line.startswith("note: ")}
    assert "resnet34 with a 1000-way head" in notes["resnet50"]
    assert "matches no consistent" in notes["densenet121"]
    assert "29,182,272" in notes["vgginnet"]
    assert "from scratch" in notes["vit_paper"]
