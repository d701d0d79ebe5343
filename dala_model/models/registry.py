"""The model registry: every model by name, built through one entry point.

As in timm's ``_registry.py``, the registry holds the mechanism only (:func:`register`,
:func:`list_models`, :func:`get_model_spec`, :func:`build_model`, :func:`parameter_count`);
each model's facts (library, the paper's Table 7 count, input size, default preset, published
weights) are a :class:`ModelSpec` that its own module defines beside its builder
(``dalaresnet``, ``baselines``, ``vgginnet``, ``vit``, ``seresnet``). The collection below is
explicit, in the order ``dala models`` prints, so importing this module is all it takes to see
every model (no import-order side effects).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dala_model.models import baselines, dalaresnet, seresnet, vgginnet, vit
from dala_model.models._spec import ModelSpec

__all__ = [
    "ModelSpec",
    "build_model",
    "get_model_spec",
    "list_models",
    "parameter_count",
    "register",
]

_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to the registry under ``spec.name``; a name is registered once only."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


for _spec in (
    *dalaresnet.SPECS,
    *baselines.SPECS,
    *vgginnet.SPECS,
    *vit.SPECS,
    *seresnet.SPECS,
):
    register(_spec)


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
