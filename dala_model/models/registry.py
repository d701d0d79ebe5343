"""DALAResNet50 and the paper's baselines: one small builder per model plus a registry by name.

Builders follow torchvision (``resnet50(*, weights=None, ...)``): keyword-only, a few lines each,
delegating to shared helpers, so models differ in data, not in copied code. The registry keeps
each model's facts (library, the paper's Table 7 count, input size, default preset, published
weights) as :class:`ModelSpec` data that ``dala models`` prints and ``build_model`` dispatches on.

Every model built here records how it was built in ``model.dala_build`` (name, num_classes,
options) so :func:`dala_model.models.checkpoint.save_model` can write a config that rebuilds it exactly.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torchvision.models as tvm
from torch import nn

from dala_model.models.attention import LightweightAttention
from dala_model.models.pretrained import WeightsSource, load_backbone
from dala_model.paper import PAPER_PARAMS

# torchvision's DenseNet files predate its module names ("norm.1" is now "norm1"); this is the
# rewrite torchvision applies when it loads them itself.
_DENSENET_LEGACY_KEYS = (
    (
        r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$",
        r"\1\2",
    ),
)


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one model.

    ``fresh`` names the modules that pretrained weights never initialise (the head, and the
    attention block of DALAResNet50). ``note`` explains a mismatch with the paper's count where
    the cause is known.
    """

    name: str
    builder: Callable[..., nn.Module]
    source: str  # "torchvision" or "timm"
    paper_params: int | None
    input_size: int
    preset: str  # the transforms preset its weights expect by default
    weights: WeightsSource | None
    fresh: tuple[str, ...]
    note: str = ""

    @property
    def options(self) -> dict[str, Any]:
        """The builder's model options and their defaults (beyond num_classes and pretrained)."""
        return {
            name: parameter.default
            for name, parameter in inspect.signature(self.builder).parameters.items()
            if name not in ("num_classes", "pretrained")
        }


def _finish(
    model: nn.Module, name: str, num_classes: int, pretrained: bool | str, options: dict[str, Any]
) -> nn.Module:
    """Load backbone weights if asked and record how the model was built."""
    spec = _REGISTRY[name]
    if pretrained is not False:
        load_backbone(model, pretrained, spec.weights, spec.fresh, name)
    model.dala_build = {"name": name, "num_classes": num_classes, "options": dict(options)}
    return model


def _torchvision(
    name: str, factory: Callable[..., nn.Module], num_classes: int, pretrained: bool | str
) -> nn.Module:
    return _finish(factory(num_classes=num_classes), name, num_classes, pretrained, {})


def _timm(
    name: str, arch: str, num_classes: int, pretrained: bool | str, **kwargs: Any
) -> nn.Module:
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    return _finish(model, name, num_classes, pretrained, {})


def dalaresnet50(
    *,
    num_classes: int = 2,
    pretrained: bool | str = False,
    reduction: int = 4,
    gate: str = "relu",
    dropout: float = 0.25,
) -> nn.Module:
    """torchvision ResNet50 + LightweightAttention as ``layer4[-1]`` + Dropout -> Linear head.

    With the defaults and 2 classes: exactly 25,611,842 parameters, as published.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dalaresnet50: dropout={dropout} must be in [0, 1)")
    model = tvm.resnet50()
    model.layer4.append(LightweightAttention(2048, reduction=reduction, gate=gate))
    model.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(2048, num_classes))
    options = {"reduction": reduction, "gate": gate, "dropout": dropout}
    return _finish(model, "dalaresnet50", num_classes, pretrained, options)


def resnet50(*, num_classes: int = 2, pretrained: bool | str = False) -> nn.Module:
    return _torchvision("resnet50", tvm.resnet50, num_classes, pretrained)


def seresnet50(*, num_classes: int = 2, pretrained: bool | str = False) -> nn.Module:
    return _timm("seresnet50", "seresnet50", num_classes, pretrained)


def densenet121(*, num_classes: int = 2, pretrained: bool | str = False) -> nn.Module:
    return _torchvision("densenet121", tvm.densenet121, num_classes, pretrained)


def vgg16(*, num_classes: int = 2, pretrained: bool | str = False) -> nn.Module:
    return _torchvision("vgg16", tvm.vgg16, num_classes, pretrained)


def vit_b_16(*, num_classes: int = 2, pretrained: bool | str = False) -> nn.Module:
    return _torchvision("vit_b_16", tvm.vit_b_16, num_classes, pretrained)


def swin_b(*, num_classes: int = 2, pretrained: bool | str = False) -> nn.Module:
    return _torchvision("swin_b", tvm.swin_b, num_classes, pretrained)


def dinov2_vitb14(*, num_classes: int = 2, pretrained: bool | str = False) -> nn.Module:
    """timm DINOv2 ViT-B/14 at its native 518 px position grid, interpolated to any input size.

    ``dynamic_img_size`` keeps the published position embedding (and parameter count) while
    accepting the paper's 224 px inputs, as Meta's own implementation does.
    """
    return _timm(
        "dinov2_vitb14", "vit_base_patch14_dinov2", num_classes, pretrained, dynamic_img_size=True
    )


_RESNET50_V1 = WeightsSource.torchvision(tvm.ResNet50_Weights.IMAGENET1K_V1)

_REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="dalaresnet50",
            builder=dalaresnet50,
            source="torchvision",
            paper_params=PAPER_PARAMS["dalaresnet50"],
            input_size=224,
            preset="paper",
            weights=_RESNET50_V1,
            fresh=("layer4.3", "fc"),
        ),
        ModelSpec(
            name="resnet50",
            builder=resnet50,
            source="torchvision",
            paper_params=PAPER_PARAMS["resnet50"],
            input_size=224,
            preset="imagenet",
            weights=_RESNET50_V1,
            fresh=("fc",),
            note="the paper's count equals torchvision resnet34 with a 1000-way head",
        ),
        ModelSpec(
            name="seresnet50",
            builder=seresnet50,
            source="timm",
            paper_params=PAPER_PARAMS["seresnet50"],
            input_size=224,
            preset="imagenet",
            weights=WeightsSource.hf_hub("timm/seresnet50.a1_in1k"),
            fresh=("fc",),
        ),
        ModelSpec(
            name="densenet121",
            builder=densenet121,
            source="torchvision",
            paper_params=PAPER_PARAMS["densenet121"],
            input_size=224,
            preset="imagenet",
            weights=WeightsSource.torchvision(
                tvm.DenseNet121_Weights.IMAGENET1K_V1, _DENSENET_LEGACY_KEYS
            ),
            fresh=("classifier",),
        ),
        ModelSpec(
            name="vgg16",
            builder=vgg16,
            source="torchvision",
            paper_params=PAPER_PARAMS["vgg16"],
            input_size=224,
            preset="imagenet",
            weights=WeightsSource.torchvision(tvm.VGG16_Weights.IMAGENET1K_V1),
            fresh=("classifier.6",),
        ),
        ModelSpec(
            name="vit_b_16",
            builder=vit_b_16,
            source="torchvision",
            paper_params=PAPER_PARAMS["vit_b_16"],
            input_size=224,
            preset="imagenet",
            weights=WeightsSource.torchvision(tvm.ViT_B_16_Weights.IMAGENET1K_V1),
            fresh=("heads.head",),
        ),
        ModelSpec(
            name="swin_b",
            builder=swin_b,
            source="torchvision",
            paper_params=PAPER_PARAMS["swin_b"],
            input_size=224,
            preset="imagenet",
            weights=WeightsSource.torchvision(tvm.Swin_B_Weights.IMAGENET1K_V1),
            fresh=("head",),
        ),
        ModelSpec(
            name="dinov2_vitb14",
            builder=dinov2_vitb14,
            source="timm",
            paper_params=PAPER_PARAMS["dinov2_vitb14"],
            input_size=224,
            preset="imagenet",
            weights=WeightsSource.hf_hub("timm/vit_base_patch14_dinov2.lvd142m"),
            fresh=("head",),
            note="the paper's count includes the 768-value mask_token of Meta's reference "
            "implementation (used only in self-supervised pretraining); timm omits it",
        ),
    )
}


def list_models() -> list[str]:
    return list(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {list_models()}") from None


def build_model(
    name: str, num_classes: int = 2, pretrained: bool | str = False, **options: Any
) -> nn.Module:
    """Build a registry model by name; ``options`` are the model's own (see ``spec.options``).

    ``pretrained``: False (random init), True (the published ImageNet weights, from the torch
    hub cache or downloaded into it) or a path/fsspec URL of a state dict for the backbone.
    """
    spec = get_model_spec(name)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ValueError(
            f"model {name!r} does not take option(s) {unknown}; its options are {spec.options}"
        )
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    return spec.builder(num_classes=num_classes, pretrained=pretrained, **options)


def parameter_count(name: str, num_classes: int = 2, **options: Any) -> int:
    """Parameters of a registry model, counted on the meta device (no memory, no init time)."""
    with torch.device("meta"):
        model = build_model(name, num_classes=num_classes, **options)
    return sum(p.numel() for p in model.parameters())
