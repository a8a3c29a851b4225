"""Method options, declared once with their type, default, range and one line of help.

Every method class declares ``options`` as an :class:`Options` table of :class:`Option` entries. The
declaration is the single source for:

- checking and converting what a caller passes (``Options.resolve``): the Python API, ``--option
  KEY=VALUE`` on the command line (values arrive as text) and the web API's JSON all go through it,
  so a wrong name or value gets the same one-line error everywhere, naming the allowed values;
- listing (``cnnscope methods [--json]``, ``GET /api/methods``, the web page's option form and the
  README's option table, which a test checks against these declarations).

Parsing is strict: a boolean is ``True``/``False`` or the text ``true``/``false``; a number must be a
number (or its text) inside the declared range; a choice must be one of the listed words.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._registry import did_you_mean
from .errors import MethodError

#: Texts that mean "no value" (the automatic choice) for options that allow None.
_NONE_WORDS = ("none", "auto", "null")


@dataclass(frozen=True)
class Option:
    """One option: ``kind`` is ``"bool"``, ``"int"``, ``"float"``, ``"choice"`` or ``"object"``.

    ``low``/``high`` bound numbers inclusively, ``above``/``below`` exclusively. ``optional`` lets the
    value be None (the automatic choice, described in ``help``). ``accepts`` names further Python types
    the library takes as they are (a baseline tensor, a label array); ``web=False`` keeps the option off
    the web form (values that only make sense from Python or a file). ``check`` validates an
    ``"object"`` value and returns it converted (or raises ``ValueError`` with the reason)."""

    kind: str
    default: Any
    help: str
    choices: tuple[str, ...] | Callable[[], Sequence[str]] = ()
    low: float | None = None
    high: float | None = None
    above: float | None = None
    below: float | None = None
    optional: bool = False
    accepts: tuple[type, ...] = ()
    web: bool = True
    reads_files: bool = False
    check: Callable[[Any], Any] | None = field(default=None, compare=False)

    def allowed(self) -> tuple[str, ...]:
        return tuple(self.choices() if callable(self.choices) else self.choices)

    def describe_range(self) -> str:
        """The allowed values in words: 'true or false', '1 to 100000', 'one of: a, b'."""
        if self.kind == "bool":
            text = "true or false"
        elif self.kind == "choice":
            text = "one of: " + ", ".join(self.allowed())
            if self.accepts:
                text += " (or a " + " / ".join(t.__name__ for t in self.accepts) + ")"
        elif self.kind in ("int", "float"):
            kind = "a whole number" if self.kind == "int" else "a number"
            parts = []
            if self.low is not None:
                parts.append(f">= {_number(self.low)}")
            if self.above is not None:
                parts.append(f"> {_number(self.above)}")
            if self.high is not None:
                parts.append(f"<= {_number(self.high)}")
            if self.below is not None:
                parts.append(f"< {_number(self.below)}")
            text = kind + (" " + " and ".join(parts) if parts else "")
        else:
            text = self.help
        if self.optional:
            text += " (or none: automatic)"
        return text

    def parse(self, value: Any, name: str, owner: str) -> Any:
        """``value`` checked and converted, or a ``MethodError`` naming ``owner``'s option and its range."""

        def bad(reason: str = "") -> MethodError:
            got = f"{value!r}" if not isinstance(value, str) else f"'{value}'"
            detail = f" ({reason})" if reason else ""
            return MethodError(f"option {name} of {owner} takes {self.describe_range()}; got {got}{detail}")

        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS and self.optional):
            if self.optional:
                return None
            raise bad()
        if self.accepts and isinstance(value, self.accepts):
            return value
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "false"):
                return value.strip().lower() == "true"
            raise bad()
        if self.kind in ("int", "float"):
            number = _as_number(value, integer=self.kind == "int")
            if number is None:
                raise bad()
            if (
                (self.low is not None and number < self.low)
                or (self.high is not None and number > self.high)
                or (self.above is not None and number <= self.above)
                or (self.below is not None and number >= self.below)
            ):
                raise bad()
            return number
        if self.kind == "choice":
            allowed = self.allowed()
            if isinstance(value, str):
                lowered = {choice.lower(): choice for choice in allowed}
                if value.strip().lower() in lowered:
                    return lowered[value.strip().lower()]
                hint = did_you_mean(value.strip(), list(allowed))
                raise bad(hint.lstrip("; ").rstrip("?") + "?" if hint else "")
            raise bad()
        if self.kind == "object":
            if isinstance(value, str) and self.check is not None and value.strip()[:1] in "[{":
                value = _literal(value)
            if self.check is None:
                return value
            try:
                return self.check(value)
            except (ValueError, TypeError) as exc:
                raise MethodError(f"option {name} of {owner}: {exc}") from None
        raise MethodError(f"option {name} of {owner} has an unknown kind {self.kind!r}")  # a declaration error

    def to_json(self) -> dict:
        """The declaration as JSON (for ``cnnscope methods --json`` and ``GET /api/methods``)."""
        entry: dict[str, Any] = {"type": self.kind, "default": _json_value(self.default), "help": self.help}
        if self.kind == "choice":
            entry["choices"] = list(self.allowed())
        for key in ("low", "high", "above", "below"):
            if getattr(self, key) is not None:
                entry[key] = getattr(self, key)
        entry["optional"] = self.optional
        entry["web"] = self.web
        entry["range"] = self.describe_range()
        return entry


def flag(default: bool, help: str) -> Option:
    return Option("bool", default, help)


def integer(default: int | None, help: str, *, low: int | None = None, high: int | None = None, **more) -> Option:
    return Option("int", default, help, low=low, high=high, optional=default is None or more.pop("optional", False))


def number(default: float | None, help: str, **bounds) -> Option:
    optional = default is None or bounds.pop("optional", False)
    return Option("float", default, help, optional=optional, **bounds)


def choice(default: str | None, choices, help: str, **more) -> Option:
    return Option("choice", default, help, choices=choices, optional=default is None, **more)


def anything(
    default: Any, help: str, check: Callable[[Any], Any] | None = None, *, web: bool = True, reads_files: bool = False
) -> Option:
    return Option("object", default, help, optional=True, check=check, web=web, reads_files=reads_files)


class Options(Mapping[str, Option]):
    """An immutable name -> :class:`Option` table; ``a | b`` adds or overrides entries (subclasses
    extend their base's options that way)."""

    def __init__(self, entries: Mapping[str, Option] | None = None, /, **more: Option) -> None:
        self._entries: dict[str, Option] = {**(entries or {}), **more}

    def __getitem__(self, name: str) -> Option:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __or__(self, other: Mapping[str, Option]) -> Options:
        return Options({**self._entries, **other})

    def __repr__(self) -> str:
        return f"Options({', '.join(self._entries)})"

    def without(self, *names: str) -> Options:
        return Options({k: v for k, v in self._entries.items() if k not in names})

    def defaults(self) -> dict[str, Any]:
        return {name: option.default for name, option in self._entries.items()}

    def resolve(self, given: Mapping[str, Any], owner: str) -> dict[str, Any]:
        """Defaults updated with ``given``, every value checked; unknown names are an error with the
        closest known name."""
        unknown = sorted(set(given) - set(self._entries))
        if unknown:
            hint = did_you_mean(unknown[0], list(self._entries))
            known = ", ".join(self._entries) or "none"
            raise MethodError(f"{owner} has no option {unknown[0]!r}{hint} (its options: {known})")
        config = self.defaults()
        for name, value in given.items():
            config[name] = self._entries[name].parse(value, name, owner)
        return config

    def to_json(self) -> dict[str, dict]:
        return {name: option.to_json() for name, option in self._entries.items()}


def split_options(methods: Sequence[tuple[str, Options]], options: Mapping[str, Any]) -> list[dict[str, Any]]:
    """For several methods given one set of options (``cnnscope explain --method a,b --option k=v``):
    the options each method declares. An option that no method declares is an error (a typo must not
    be silently ignored)."""
    known = {name for _, table in methods for name in table}
    for key in options:
        if key not in known:
            hint = did_you_mean(key, sorted(known))
            listed = ", ".join(sorted(known)) or "none"
            owners = ", ".join(name for name, _ in methods)
            raise MethodError(f"option {key!r} belongs to none of {owners}{hint} (their options: {listed})")
    return [{k: v for k, v in options.items() if k in table} for _, table in methods]


def parse_pairs(pairs: Sequence[str]) -> dict[str, str]:
    """``['steps=16', 'relu=false']`` -> ``{'steps': '16', 'relu': 'false'}``: texts, converted later by
    each method's declaration (so a wrong value is reported with the option's range)."""
    from .errors import InputError

    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"option {pair!r} is not KEY=VALUE (for example steps=16)")
        options[key.strip()] = value.strip()
    return options


def markdown_table(methods: Sequence[tuple[str, Options]]) -> str:
    """The README's option table: one row per option of every method."""
    lines = ["| method | option | default | values | what it does |", "| --- | --- | --- | --- | --- |"]
    for method, table in methods:
        for name, option in table.items():
            default = "auto" if option.default is None else json.dumps(_json_value(option.default))
            values, text = (part.replace("|", "\\|") for part in (option.describe_range(), option.help))
            lines.append(f"| `{method}` | `{name}` | {default} | {values} | {text} |")
    return "\n".join(lines)


def _as_number(value: Any, *, integer: bool) -> int | float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        if integer:
            return int(value) if value.is_integer() else None
        return value
    if isinstance(value, int):
        return value if integer else float(value)
    return None


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _literal(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
