"""Models: the registry of architectures (specs beside builders), pretrained weights, checkpoints
and the input transforms each model expects.

May import ``dala_model.storage`` and ``dala_model.data.breakhis`` (the label names) only.
"""

from dala_model.models.registry import (
    ModelSpec,
    build_model,
    get_model_spec,
    list_models,
    parameter_count,
)

__all__ = ["ModelSpec", "build_model", "get_model_spec", "list_models", "parameter_count"]
