"""One registry type for every pluggable name: methods, zoo models, colormaps, objectives.

Names are case-insensitive and unique; registering a name twice is an error, and looking up an
unknown name answers with the closest registered ones. The CLI, the web page and the tests list
what is registered instead of keeping their own lists.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import CnnscopeError, MethodError

T = TypeVar("T")


def did_you_mean(name: str, choices: list[str], n: int = 3) -> str:
    """'; did you mean 'a' or 'b'?' for the closest choices, or '' when none is close."""
    lowered = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.6)
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(lowered[c]) for c in close) + "?"


class Registry(Generic[T]):
    """A case-insensitive name -> object table with decorator registration."""

    def __init__(self, kind: str, error: type[CnnscopeError] = CnnscopeError, list_hint: str = "") -> None:
        self.kind = kind
        self._error = error
        self._list_hint = list_hint
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator."""

        def add(item: T) -> T:
            key = name.lower()
            if key in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[key] = item
            return item

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> T:
        """Remove ``name`` (and the aliases that point to it); returns what it named."""
        key = name.lower()
        if key not in self._items:
            raise self._error(f"unknown {self.kind} {name!r}")
        self._aliases = {alias: target for alias, target in self._aliases.items() if target != key}
        return self._items.pop(key)

    def alias(self, alias: str, name: str) -> None:
        """Let ``alias`` stand for the registered ``name`` (not listed by :meth:`names`)."""
        if alias.lower() in self._items or alias.lower() in self._aliases:
            raise ValueError(f"{self.kind} {alias!r} is registered twice")
        self._aliases[alias.lower()] = name.lower()

    def get(self, name: str) -> T:
        try:
            return self._items[self._aliases.get(name.lower(), name.lower())]
        except KeyError:
            hint = did_you_mean(name, self.names())
            if not hint:
                hint = "; choose one of: " + ", ".join(self.names())
            more = f" ({self._list_hint})" if self._list_hint else ""
            raise self._error(f"unknown {self.kind} {name!r}{hint}{more}") from None

    def names(self) -> list[str]:
        return list(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(self._items.items())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name.lower() in self._items or name.lower() in self._aliases)

    def __len__(self) -> int:
        return len(self._items)


# The registries themselves. Entries are added by the modules that define them
# (cnnscope.methods, cnnscope.models.zoo, cnnscope.render.colormaps) on import.
METHODS: Registry = Registry("method", error=MethodError, list_hint="`cnnscope methods` lists them")
MODELS: Registry = Registry("model", list_hint="`cnnscope models` lists them")
COLORMAPS: Registry = Registry("colormap")
OBJECTIVES: Registry = Registry("objective kind", list_hint="e.g. class:goldfish, channel:LAYER:INDEX")
