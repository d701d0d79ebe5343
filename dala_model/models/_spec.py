"""What the registry knows about one model (:class:`ModelSpec`) and the one step every builder ends with.

Private support for the model modules (``dalaresnet``, ``baselines``, ``vgginnet``, ``vit``,
``seresnet``): each defines its builder and, beside it, the builder's spec, as timm keeps a
model's config next to its ``@register_model`` function. The registry (``registry.py``) only
collects the specs; it holds no model facts of its own.

Every model built here records how it was built in ``model.dala_build`` (name, num_classes,
options) so :func:`dala_model.models.checkpoint.save_model` can write a config that rebuilds it exactly.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from dala_model.models.pretrained import WeightsSource, load_backbone

# How a Grad-CAM layer's output becomes a (N, C, h, w) map (implemented in
# dala_model.report.explain; the names are data here so a spec can be checked when it is made):
# "vit_tokens": (N, 1 + h*w, C) tokens with a CLS token first -> drop it, lay the rest on the grid.
CAM_RESHAPES = ("vit_tokens",)


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one model.

    ``fresh`` names the modules that pretrained weights never initialise (the head, and the
    attention block of DALAResNet50). ``unused`` names key prefixes of the published weights file
    that the architecture does not have (VGGIN-Net keeps only VGG16's blocks 1-4); they are dropped
    before loading instead of failing it. ``note`` explains a mismatch with the paper's count where
    the cause is known. ``input_size`` is the side of the square images the model is specified at
    (the paper's 224 for all); a model that accepts no other size says so in its note.

    ``cam_layer`` is the dotted module path (``model.get_submodule``) whose output Grad-CAM
    explains: the last spatial feature map before pooling (``layer4`` for the ResNets).
    ``cam_reshape`` names how that output becomes a ``(N, C, h, w)`` map when it is not one
    already (one of :data:`CAM_RESHAPES`; None: it is a map). The ViTs (``vit_paper``,
    ``vit_b_16``, ``dinov2_vitb14``) are explained at their last block's first LayerNorm, whose
    output is a token sequence ``(N, 1 + h*w, C)`` with the CLS token first: ``"vit_tokens"``
    drops the CLS token and lays the patch tokens out on their grid, the reshape pytorch-grad-cam
    documents for ViTs (the last block's *output* would not do: only its CLS token reaches the
    head, so the patch tokens there have no gradient). ``cam_layer`` is None where no honest map
    exists yet (Swin: windowed stages whose tokens the package's ViT reshape does not describe),
    and ``dala explain`` says "not supported" instead.
    """

    name: str
    builder: Callable[..., nn.Module]
    source: str  # "torchvision", "timm" or "torch" (built here from torch modules)
    paper_params: int | None
    input_size: int
    preset: str  # the transforms preset its weights expect by default
    weights: WeightsSource | None
    fresh: tuple[str, ...]
    note: str = ""
    unused: tuple[str, ...] = ()
    cam_layer: str | None = None
    cam_reshape: str | None = None

    def __post_init__(self) -> None:
        if self.cam_reshape is not None and self.cam_reshape not in CAM_RESHAPES:
            raise ValueError(
                f"{self.name}: cam_reshape={self.cam_reshape!r} is not one of {CAM_RESHAPES}"
            )
        if self.cam_reshape is not None and self.cam_layer is None:
            raise ValueError(f"{self.name}: cam_reshape is set but cam_layer is None")

    @property
    def options(self) -> dict[str, Any]:
        """The builder's model options and their defaults (beyond num_classes and pretrained)."""
        return {
            name: parameter.default
            for name, parameter in inspect.signature(self.builder).parameters.items()
            if name not in ("num_classes", "pretrained")
        }


def finish(
    model: nn.Module,
    spec: ModelSpec,
    num_classes: int,
    pretrained: bool | str,
    options: dict[str, Any],
) -> nn.Module:
    """Load backbone weights if asked and record how the model was built."""
    if pretrained is not False:
        load_backbone(model, pretrained, spec.weights, spec.fresh, spec.name, unused=spec.unused)
    model.dala_build = {"name": spec.name, "num_classes": num_classes, "options": dict(options)}
    return model


def check_dropout(model: str, dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{model}: dropout={dropout} must be in [0, 1)")
