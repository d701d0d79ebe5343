"""dala_model: DALAResNet50 and the BreakHis pipeline as a plain library (no Prefect imports)."""

from dala_model.checkpoint import load_model, save_model
from dala_model.models import build_model, get_model_spec, list_models

__all__ = ["build_model", "get_model_spec", "list_models", "load_model", "save_model"]
__version__ = "0.1.0"
