"""The web page: upload an image, see the top-5, explain any class with any registered method."""

from .app import create_app

__all__ = ["create_app"]
