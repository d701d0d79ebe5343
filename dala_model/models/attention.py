"""The lightweight channel attention of DALAResNet50 (Liu, Achuthan et al., IEEE Access 2024).

The published module is an SE-style block with a "dual activation": LeakyReLU after the
reduction layer and ReLU (not Sigmoid) as the gate. Keeping the gate and the reduction ratio
as constructor options lets the SE-style ablation (``gate="sigmoid"``) run on the identical
network instead of a hand-copied variant.
"""

from __future__ import annotations

import torch
from torch import nn

GATES: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}


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
