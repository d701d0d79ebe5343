"""BatchNorm folded into the convolution before it: the served model's function, one pass fewer,
its module names kept, and no process-wide patching while it folds."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
from torch import nn

from dala_model.engine.inference import fold_batchnorm, predict_proba
from dala_model.models.registry import build_model

CPU = torch.device("cpu")
KWARGS = {"preset": "paper", "device": CPU, "batch_size": 4, "channels_last": False}


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


def batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name", ["dalaresnet50", "seresnet50_paper"])
def test_folded_model_scores_what_the_model_scores_and_keeps_its_names(name):
    model = trained_looking(name)
    pixels = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    folded = copy.deepcopy(model)
    want = predict_proba(model, pixels, **KWARGS)
    seen: dict[str, torch.Tensor] = {}
    model.layer4.register_forward_hook(lambda m, i, out: seen.__setitem__("unfolded", out))
    predict_proba(model, pixels[:2], **KWARGS)

    names = [n for n, _ in model.named_modules()]
    # ResNet50: the stem, 3 per bottleneck (16 of them) and 4 downsample branches
    assert batchnorms(model) == 53
    assert fold_batchnorm(folded) == 53
    assert batchnorms(folded) == 0
    assert [n for n, _ in folded.named_modules()] == names  # Grad-CAM's "layer4" is still there
    np.testing.assert_allclose(predict_proba(folded, pixels, **KWARGS), want, rtol=0, atol=1e-5)
    # a hook on layer4 (Grad-CAM's target) sees its output as before
    folded.layer4.register_forward_hook(lambda m, i, out: seen.__setitem__("folded", out))
    predict_proba(folded, pixels[:2], **KWARGS)
    scale = seen["unfolded"].abs().max()  # thousands: random weights, trained-looking BatchNorms
    assert scale > 1 and (seen["folded"] - seen["unfolded"]).abs().max() <= 2e-5 * scale
    assert fold_batchnorm(folded) == 0  # nothing left to fold


class ActNorm(nn.BatchNorm2d):
    """A BatchNorm subclass with its own forward (as timm's BatchNormAct2d adds an activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


class Unlisted(nn.Module):
    """conv and bn as attributes of a type whose forward the fold does not know: here the
    BatchNorm comes first, so folding it into the convolution would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


def test_only_pairs_whose_order_is_known_fold():
    shared = nn.Conv2d(3, 4, 3)
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3), ActNorm(4)),  # subclass: its forward is not an affine map
        nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1)),  # BatchNorm before the convolution
        nn.Sequential(shared, nn.BatchNorm2d(4)),  # the convolution is used twice below
        nn.Sequential(shared, nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)),
        Unlisted(),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)),  # the one foldable pair
    )
    # shapes aside (this model is only folded, never run), the fold must leave all but one alone
    assert fold_batchnorm(model) == 1
    assert isinstance(model[0][1], ActNorm) and isinstance(model[1][0], nn.BatchNorm2d)
    assert isinstance(model[2][1], nn.BatchNorm2d) and isinstance(model[4][1], nn.BatchNorm2d)
    assert isinstance(model[5].bn, nn.BatchNorm2d)
    assert isinstance(model[6][1], nn.Identity) and not model.training


def test_a_model_without_a_convolution_before_its_batchnorm_is_left_as_it_is():
    model = trained_looking("vgginnet")  # its one BatchNorm follows the Inception concatenation
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert fold_batchnorm(model) == 0
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_folding_never_disturbs_a_model_another_thread_is_running():
    """The torch.fx fold this replaced patched nn.Module.__call__ process-wide while tracing, and
    the inference flow's other score threads failed mid-call. Here one thread folds models while
    another runs a model throughout; every call must succeed and give the same logits."""
    torch.manual_seed(1)
    runner = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten()).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        want = runner(x)
    errors: list[BaseException] = []
    stop = threading.Event()

    def run() -> None:
        try:
            while not stop.is_set():
                with torch.inference_mode():
                    torch.testing.assert_close(runner(x), want)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        for _ in range(3):
            assert fold_batchnorm(build_model("dalaresnet50", num_classes=2)) == 53
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
