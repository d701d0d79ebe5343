"""The paper's SE-ResNet50 baseline (``seresnet50_paper``), rebuilt to its Table 7 count.

27,073,090 = torchvision's ResNet50 trunk (23,508,032) + a bias-free squeeze-and-excitation block
with reduction 16 in every one of the 16 bottlenecks (Hu et al.: Linear C -> C/16 -> C, ReLU,
Sigmoid, no biases; 2,514,944 in all) + a head Linear 2048 -> 512 -> ReLU -> Dropout -> Linear
512 -> 2 (1,050,114). timm's ``seresnet50`` (SE blocks with biases, a plain Linear head) stays in
the registry as the library's own variant.

The network is torchvision's ``ResNet`` with a Bottleneck subclass that applies SE after ``bn3``,
before the residual sum, as in the SE paper. Every torchvision module keeps its name, so
"pretrained" loads torchvision's ImageNet ResNet50 file into the trunk; the SE blocks and the
head keep their fresh initialisation.
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.resnet import Bottleneck

from dala_model.models._spec import ModelSpec, check_dropout, finish
from dala_model.models.dalaresnet import RESNET50_V1
from dala_model.paper import PAPER_PARAMS

LAYERS = (3, 4, 6, 3)  # ResNet50's bottlenecks per stage
REDUCTION = 16
HIDDEN = 512


class SqueezeExcite(nn.Module):
    """Channel gates from global context: pool -> Linear C/r -> ReLU -> Linear C -> Sigmoid, no biases."""

    def __init__(self, channels: int, reduction: int = REDUCTION) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Linear(channels, channels // reduction, bias=False)
        self.activation = nn.ReLU(inplace=True)
        self.expand = nn.Linear(channels // reduction, channels, bias=False)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.gate(self.expand(self.activation(self.reduce(self.pool(x).flatten(1)))))
        return x * weights[:, :, None, None]


class SEBottleneck(Bottleneck):
    """torchvision's Bottleneck with squeeze-and-excitation on the residual branch."""

    def __init__(self, inplanes: int, planes: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(inplanes, planes, *args, **kwargs)
        self.se = SqueezeExcite(planes * self.expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        return self.relu(out + identity)


def seresnet50_paper(
    *, num_classes: int = 2, pretrained: bool | str = False, dropout: float = 0.25
) -> nn.Module:
    """ResNet50 + SE in every bottleneck + a 512-wide MLP head: 27,073,090 with 2 classes."""
    check_dropout("seresnet50_paper", dropout)
    model = tvm.ResNet(SEBottleneck, list(LAYERS))
    model.fc = nn.Sequential(
        nn.Linear(2048, HIDDEN),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(HIDDEN, num_classes),
    )
    return finish(model, SERESNET50_PAPER, num_classes, pretrained, {"dropout": dropout})


SERESNET50_PAPER = ModelSpec(
    name="seresnet50_paper",
    builder=seresnet50_paper,
    source="torchvision",
    paper_params=PAPER_PARAMS["seresnet50_paper"],
    input_size=224,
    preset="imagenet",
    weights=RESNET50_V1,
    fresh=(
        *(f"layer{stage}.{block}.se" for stage, n in enumerate(LAYERS, 1) for block in range(n)),
        "fc",
    ),
    cam_layer="layer4",
    note="the paper's SE-ResNet50: torchvision ResNet50 with bias-free SE (r=16) in every "
    "bottleneck and a Linear 2048->512->2 head",
)

SPECS = (SERESNET50_PAPER,)
