"""The ``cnnscope`` command: thin wrappers that parse, call the library and print."""

from .app import app, main

__all__ = ["app", "main"]
