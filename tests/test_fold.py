"""BatchNorm folded into the convolution before it: the served model's function, one pass fewer."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from dala_model.engine.inference import fold_batchnorm, predict_proba
from dala_model.models.registry import build_model

CPU = torch.device("cpu")


def trained_looking(name: str) -> nn.Module:
    """A registry model whose BatchNorms hold non-trivial statistics and affine terms, as after
    training (at initialisation they are the identity, which would fold trivially)."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=2)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.1, 0.1)
    return model.eval()


@pytest.mark.parametrize("name", ["dalaresnet50", "seresnet50"])
def test_folded_model_scores_what_the_model_scores(name):
    model = trained_looking(name)
    pixels = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    kwargs = {"preset": "paper", "device": CPU, "batch_size": 4, "channels_last": False}
    want = predict_proba(model, pixels, **kwargs)
    folded, done = fold_batchnorm(copy.deepcopy(model))
    assert done
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 0
    np.testing.assert_allclose(predict_proba(folded, pixels, **kwargs), want, rtol=0, atol=1e-5)


class DataDependent(nn.Module):
    """A branch on a tensor's value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y


def test_an_untraceable_model_is_scored_as_it_is():
    model = DataDependent()
    same, done = fold_batchnorm(model)
    assert same is model and not done
    assert isinstance(model.bn, nn.BatchNorm2d) and not model.training


def test_a_model_without_batchnorm_is_not_traced():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.LayerNorm([4, 6, 6]))
    same, done = fold_batchnorm(model)
    assert same is model and not done and isinstance(model, nn.Sequential)
