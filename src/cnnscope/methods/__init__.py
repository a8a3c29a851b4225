"""Every attribution method, registered by name on import (one module per family)."""

from .._registry import METHODS
from .base import Computed, Method, register_method
from .cam import CAM, CAMBase, GradCAM

__all__ = ["CAM", "CAMBase", "Computed", "GradCAM", "Method", "get_method", "list_methods", "register_method"]


def list_methods() -> list[str]:
    """Names of the registered methods."""
    return METHODS.names()


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name`` (with suggestions for unknown names)."""
    return METHODS.get(name)
