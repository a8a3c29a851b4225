"""The model adapter: ``Model``, ``load_model`` and the zoo (imported here so it registers)."""

from . import zoo as _zoo  # noqa: F401  (registers the zoo models)
from .layers import LayerCall
from .loaders import DEFAULT_MODEL, list_models, load_model
from .model import Batch, Model, Prediction
from .preprocess import Preprocess

__all__ = [
    "DEFAULT_MODEL",
    "Batch",
    "LayerCall",
    "Model",
    "Prediction",
    "Preprocess",
    "list_models",
    "load_model",
]
