"""The errors cnnscope raises for bad input: one line each, naming the problem and the fix.

Everything a user can get wrong raises a subclass of :class:`CnnscopeError`; the CLI prints its
message on one line and exits with status 2. Anything else escaping the library is a bug.
"""

from __future__ import annotations


class CnnscopeError(Exception):
    """Base class of every error caused by the caller's input; its message is one line."""


class InputError(CnnscopeError, ValueError):
    """An image, tensor or option that cannot be used as given."""


class ModelError(CnnscopeError, ValueError):
    """A model that cannot be loaded, or that a method cannot explain."""


class LayerNotFoundError(ModelError, KeyError):
    """A layer name that is not in the model."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TargetError(CnnscopeError, ValueError):
    """A target class that cannot be resolved against the model's labels."""


class MethodError(CnnscopeError, ValueError):
    """A method that does not apply to this model or these options."""


class CnnscopeWarning(UserWarning):
    """Something the user should know about a result (a model in train mode, an empty map, ...)."""
