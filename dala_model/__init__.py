"""dala_model: DALAResNet50 and the BreakHis pipeline as a plain library (no Prefect imports).

The model API is exported here but imported on first use (PEP 562), so data-only work such as
ingest does not load torch: that keeps an ingest worker's memory at the size of its images.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_model": "dala_model.models.registry",
    "get_model_spec": "dala_model.models.registry",
    "list_models": "dala_model.models.registry",
    "load_model": "dala_model.models.checkpoint",
    "save_model": "dala_model.models.checkpoint",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dala_model' has no attribute {name!r}")
