"""The ``cnnscope`` command: thin wrappers that parse, call the library and print."""

from . import features  # registers the feature commands on the app
from .app import app, main

__all__ = ["app", "features", "main"]
