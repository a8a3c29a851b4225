"""The ``cnnscope`` command: thin wrappers that parse, call the library and print."""

from . import audit, features  # register `cnnscope audit` and the feature commands on the app
from . import evaluate as _evaluate  # noqa: F401 (registers `cnnscope evaluate`)
from . import training as _training  # noqa: F401 (registers movie and compare-models on the app)
from .app import app, main

__all__ = ["app", "audit", "features", "main"]
