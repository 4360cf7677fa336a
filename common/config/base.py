"""The config's building blocks: the section base class that type-checks every
field in ``__post_init__`` and collects its problems, and the value checks the
sections share.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Literal

from fedtune.common.errors import ConfigError

Scalar = bool | int | float | str
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, list | tuple) and all(_type_ok(v, item) for v in value)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return {bool: "true or false", int: "an integer", float: "a number"}.get(
        hint, "a string"
    )


class _Section:
    """Validation shared by every config section (types first, then values)."""

    SECTION = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        problems = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]  # a dataclass mixin
            value = getattr(self, f.name)
            numeric_text = isinstance(value, str) and _NUMBER.match(value)
            if hints[f.name] is float and numeric_text:
                value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
                object.__setattr__(self, f.name, value)
            if hints[f.name] is float and isinstance(value, int):
                if not isinstance(value, bool):  # accept 1 where 1.0 is meant
                    object.__setattr__(self, f.name, float(value))
                    continue
            if isinstance(value, list):  # lists from YAML become (hashable) tuples
                value = tuple(value)
                object.__setattr__(self, f.name, value)
            if not _type_ok(value, hints[f.name]):
                problems.append(
                    f"{self.SECTION}.{f.name}: expected {_describe(hints[f.name])}, "
                    f"got {value!r}"
                )
        try:  # value checks too, so one error lists everything
            problems += [f"{self.SECTION}.{p}" for p in self._check()]
        except TypeError:
            pass  # a wrongly typed field was already reported above
        if problems:
            raise ConfigError(problems)

    def _check(self) -> list[str]:
        """Return ``"field: problem"`` lines for values of the right type."""
        return []


def _positive(obj: object, *names: str) -> list[str]:
    return [f"{n}: must be > 0, got {getattr(obj, n)!r}" for n in names
            if _is_num(getattr(obj, n)) and getattr(obj, n) <= 0]


def _non_negative(obj: object, *names: str) -> list[str]:
    return [f"{n}: must be >= 0, got {getattr(obj, n)!r}" for n in names
            if _is_num(getattr(obj, n)) and getattr(obj, n) < 0]


def _is_num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
