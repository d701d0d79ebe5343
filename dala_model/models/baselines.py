"""The paper's baselines as the libraries publish them (torchvision, timm), each builder beside its spec.

Each is the library's own architecture with a ``num_classes``-way head, so its published ImageNet
weights load into everything but the head. The paper's own variants of some baselines, rebuilt to
its Table 7 counts, live in ``vgginnet``, ``vit`` and ``seresnet``; these stay as the standard,
pretrainable references.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torchvision.models as tvm
from torch import nn

from dala_model.models._spec import ModelSpec, finish
from dala_model.models.dalaresnet import RESNET50_V1
from dala_model.models.pretrained import WeightsSource
from dala_model.paper import PAPER_PARAMS

# torchvision's DenseNet files predate its module names ("norm.1" is now "norm1"); this is the
# rewrite torchvision applies when it loads them itself.
_DENSENET_LEGACY_KEYS = (
    (
        r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$",
        r"\1\2",
    ),
)

VGG16_V1 = WeightsSource.torchvision(tvm.VGG16_Weights.IMAGENET1K_V1)


def _torchvision(
    spec: ModelSpec, factory: Callable[..., nn.Module], num_classes: int, pretrained: bool | str
) -> nn.Module:
    return finish(factory(num_classes=num_classes), spec, num_classes, pretrained, {})


def _timm(
    spec: ModelSpec, arch: str, num_classes: int, pretrained: bool | str, **kwargs: Any
) -> nn.Module:
    import timm  # here, not at import: timm costs every process about 0.5 s it rarely needs

    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    return finish(model, spec, num_classes, pretrained, {})


def resnet50(*, num_classes: int = 2, pretrained: bool | str = False) -> nn.Module:
    return _torchvision(RESNET50, tvm.resnet50, num_classes, pretrained)


def seresnet50(*, num_classes: int = 2, pretrained: bool | str = False) -> nn.Module:
    return _timm(SERESNET50, "seresnet50", num_classes, pretrained)


def densenet121(*, num_classes: int = 2, pretrained: bool | str = False) -> nn.Module:
    return _torchvision(DENSENET121, tvm.densenet121, num_classes, pretrained)


def vgg16(*, num_classes: int = 2, pretrained: bool | str = False) -> nn.Module:
    return _torchvision(VGG16, tvm.vgg16, num_classes, pretrained)


def vit_b_16(*, num_classes: int = 2, pretrained: bool | str = False) -> nn.Module:
    return _torchvision(VIT_B_16, tvm.vit_b_16, num_classes, pretrained)


def swin_b(*, num_classes: int = 2, pretrained: bool | str = False) -> nn.Module:
    return _torchvision(SWIN_B, tvm.swin_b, num_classes, pretrained)


def dinov2_vitb14(*, num_classes: int = 2, pretrained: bool | str = False) -> nn.Module:
    """timm DINOv2 ViT-B/14 at its native 518 px position grid, interpolated to any input size.

    ``dynamic_img_size`` keeps the published position embedding (and parameter count) while
    accepting the paper's 224 px inputs, as Meta's own implementation does.
    """
    return _timm(
        DINOV2_VITB14, "vit_base_patch14_dinov2", num_classes, pretrained, dynamic_img_size=True
    )


RESNET50 = ModelSpec(
    name="resnet50",
    builder=resnet50,
    source="torchvision",
    paper_params=PAPER_PARAMS["resnet50"],
    input_size=224,
    preset="imagenet",
    weights=RESNET50_V1,
    fresh=("fc",),
    cam_layer="layer4",
    note="the paper's count equals torchvision resnet34 with a 1000-way head",
)
SERESNET50 = ModelSpec(
    name="seresnet50",
    builder=seresnet50,
    source="timm",
    paper_params=PAPER_PARAMS["seresnet50"],
    input_size=224,
    preset="imagenet",
    weights=WeightsSource.hf_hub("timm/seresnet50.a1_in1k"),
    fresh=("fc",),
    cam_layer="layer4",
    note="timm's SE-ResNet50 (SE blocks with biases, a plain Linear head); the paper's count is "
    "that of seresnet50_paper",
)
DENSENET121 = ModelSpec(
    name="densenet121",
    builder=densenet121,
    source="torchvision",
    paper_params=PAPER_PARAMS["densenet121"],
    input_size=224,
    preset="imagenet",
    weights=WeightsSource.torchvision(tvm.DenseNet121_Weights.IMAGENET1K_V1, _DENSENET_LEGACY_KEYS),
    fresh=("classifier",),
    cam_layer="features.norm5",
    note="the paper's count matches no consistent DenseNet architecture",
)
VGG16 = ModelSpec(
    name="vgg16",
    builder=vgg16,
    source="torchvision",
    paper_params=PAPER_PARAMS["vgg16"],
    input_size=224,
    preset="imagenet",
    weights=VGG16_V1,
    fresh=("classifier.6",),
    cam_layer="features.29",  # block 5's last ReLU (14x14), before the last max-pool
)
VIT_B_16 = ModelSpec(
    name="vit_b_16",
    builder=vit_b_16,
    source="torchvision",
    paper_params=PAPER_PARAMS["vit_b_16"],
    input_size=224,
    preset="imagenet",
    weights=WeightsSource.torchvision(tvm.ViT_B_16_Weights.IMAGENET1K_V1),
    fresh=("heads.head",),
    # encoder.layers[-1].ln_1: (N, 1 + 14*14, 768) tokens, CLS first (see ModelSpec).
    cam_layer="encoder.layers.encoder_layer_11.ln_1",
    cam_reshape="vit_tokens",
    note="the pretrainable ViT-B/16; the paper's count is that of vit_paper, a 6-layer ViT "
    "trained from scratch",
)
SWIN_B = ModelSpec(
    name="swin_b",
    builder=swin_b,
    source="torchvision",
    paper_params=PAPER_PARAMS["swin_b"],
    input_size=224,
    preset="imagenet",
    weights=WeightsSource.torchvision(tvm.Swin_B_Weights.IMAGENET1K_V1),
    fresh=("head",),
)
DINOV2_VITB14 = ModelSpec(
    name="dinov2_vitb14",
    builder=dinov2_vitb14,
    source="timm",
    paper_params=PAPER_PARAMS["dinov2_vitb14"],
    input_size=224,
    preset="imagenet",
    weights=WeightsSource.hf_hub("timm/vit_base_patch14_dinov2.lvd142m"),
    fresh=("head",),
    # blocks[-1].norm1: (N, 1 + h*w, 768) tokens, CLS first and no register tokens.
    cam_layer="blocks.11.norm1",
    cam_reshape="vit_tokens",
    note="the paper's count includes the 768-value mask_token of Meta's reference "
    "implementation (used only in self-supervised pretraining); timm omits it",
)

SPECS = (RESNET50, SERESNET50, DENSENET121, VGG16, VIT_B_16, SWIN_B, DINOV2_VITB14)
