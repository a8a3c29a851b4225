"""Turning maps into pictures. Nothing here runs a model."""

from .colormaps import DIVERGING, SEQUENTIAL, colorize, default_colormap
from .overlay import overlay, png_bytes, resize_map, save_png

__all__ = [
    "DIVERGING",
    "SEQUENTIAL",
    "colorize",
    "default_colormap",
    "overlay",
    "png_bytes",
    "resize_map",
    "save_png",
]
