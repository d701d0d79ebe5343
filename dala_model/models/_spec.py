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
    explains: the last spatial feature map before pooling (``layer4`` for the ResNets). It is
    None for the transformers (ViT, Swin, DINOv2), whose last maps are token sequences: without a
    model-specific reshape a class activation map of them would not be honest, so
    ``dala explain`` says "not supported" for them instead.
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
