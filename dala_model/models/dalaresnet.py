"""DALAResNet50 (Liu, Achuthan et al., IEEE Access 2024): its attention module, builder and spec.

The published module is an SE-style block with a "dual activation": LeakyReLU after the
reduction layer and ReLU (not Sigmoid) as the gate. Keeping the gate and the reduction ratio
as constructor options lets the SE-style ablation (``gate="sigmoid"``) run on the identical
network instead of a hand-copied variant.

Builders follow torchvision (``resnet50(*, weights=None, ...)``): keyword-only, a few lines each,
so models differ in data, not in copied code; the spec beside the builder is what ``dala models``
prints and ``build_model`` dispatches on.
"""

from __future__ import annotations

import torch
import torchvision.models as tvm
from torch import nn

from dala_model.models._spec import ModelSpec, check_dropout, finish
from dala_model.models.pretrained import WeightsSource
from dala_model.paper import PAPER_PARAMS

GATES: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}

# torchvision's ImageNet ResNet50 (V1, the weights of the paper's era); shared with the
# ResNet50-based baselines.
RESNET50_V1 = WeightsSource.torchvision(tvm.ResNet50_Weights.IMAGENET1K_V1)


class LightweightAttention(nn.Module):
    """Re-weight the channels of a feature map by weights computed from its global context.

    The submodules are named in the published order (``pool`` -> ``reduce`` -> ``activation``
    -> ``expand`` -> ``gate``) so the architecture can be checked by inspecting the module.
    With the defaults (2048 channels, reduction 4, biases) it holds 2,099,712 parameters, the
    share of the paper's 25,611,842 total that is not plain ResNet50.
    """

    def __init__(
        self,
        channels: int = 2048,
        reduction: int = 4,
        gate: str = "relu",
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__()
        if channels < 1 or reduction < 1 or channels % reduction:
            raise ValueError(
                f"LightweightAttention: reduction={reduction} must be a positive divisor of "
                f"channels={channels} (the published module uses 2048 channels, reduction 4)"
            )
        if gate not in GATES:
            raise ValueError(
                f"LightweightAttention: gate={gate!r} is not one of {sorted(GATES)} "
                "('relu' is the published gate, 'sigmoid' the SE-style ablation)"
            )
        hidden = channels // reduction
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Linear(channels, hidden)
        self.activation = nn.LeakyReLU(negative_slope)
        self.expand = nn.Linear(hidden, channels)
        self.gate = GATES[gate]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.pool(x).flatten(1)
        weights = self.gate(self.expand(self.activation(self.reduce(weights))))
        return x * weights[:, :, None, None]


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
    check_dropout("dalaresnet50", dropout)
    model = tvm.resnet50()
    model.layer4.append(LightweightAttention(2048, reduction=reduction, gate=gate))
    model.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(2048, num_classes))
    options = {"reduction": reduction, "gate": gate, "dropout": dropout}
    return finish(model, DALARESNET50, num_classes, pretrained, options)


DALARESNET50 = ModelSpec(
    name="dalaresnet50",
    builder=dalaresnet50,
    source="torchvision",
    paper_params=PAPER_PARAMS["dalaresnet50"],
    input_size=224,
    preset="paper",
    weights=RESNET50_V1,
    fresh=("layer4.3", "fc"),
    cam_layer="layer4",  # its last block is the attention module: the re-weighted map
)

SPECS = (DALARESNET50,)
