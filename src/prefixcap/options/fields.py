"""The fields of the option schemas (and of the model and training configs): a help text and the
range of each field in its metadata, and the one validator of loose values (parsed from JSON or
YAML, given by a caller or on the command line) against a dataclass's annotations and ranges, so
that the CLI, the server, config files and the Python API say the same line for the same value.
It imports nothing of prefixcap, so every layer may use it."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_TYPE_NAMES = {
    int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object", type(None): "null",
}  # fmt: skip


@dataclass(frozen=True)
class Bounds:
    """The range of a numeric field: each end None (unbounded), inclusive, or open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is out of range
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        return low_ok and (self.high is None or (value < self.high if self.high_open else value <= self.high))

    def __str__(self) -> str:
        """As messages write it: "in [1, 64]", "in (0, 1]", ">= 1", "> 0", "<= 10"."""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"{'<' if self.high_open else '<='} {self.high}"


def at_least(low: float) -> Bounds:
    return Bounds(low)


def above(low: float) -> Bounds:
    return Bounds(low, low_open=True)


def between(low: float, high: float) -> Bounds:
    return Bounds(low, high)


def option(default: Any = dataclasses.MISSING, help: str = "", *, bounds: Bounds | None = None, **cli: Any) -> Any:
    """A dataclass field with its help text, its range (`bounds`), and `flag="--name"` where the
    command line's flag differs."""
    return field(default=default, metadata={"help": help, "bounds": bounds, **cli})


def field_bounds(cls: type) -> dict[str, Bounds]:
    """The range of each of the dataclass `cls`'s fields that has one."""
    return {f.name: f.metadata["bounds"] for f in dataclasses.fields(cls) if f.metadata.get("bounds") is not None}


def range_problem(value: Any, bounds: Bounds | None) -> str | None:
    """What is wrong with the number `value` for `bounds` ("must be in [1, 64], got 0"), or None.
    NaN and infinities are refused whatever the bounds: `inf` would pass a lower bound, and NaN
    passes no comparison at all."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if bounds is not None and isinstance(value, int | float) and value not in bounds:
        return f"must be {bounds}, got {value}"
    return None


def check_fields(
    cls: type, values: Mapping[str, Any], *, prefix: str = "", error: type[Exception] = ValueError, ranges: bool = True
) -> None:
    """The validator: raise `error` naming the first value whose type is not the dataclass field's
    annotated one (`{prefix}{name} must be an integer, got '5'`), or, with `ranges`, that is not a
    finite number in the field's `bounds` (`{prefix}{name} must be in [1, 64], got 0`). JSON
    semantics: an int is a valid float, a bool is not an int. Names that `cls` lacks are left to
    the caller."""
    hints, limits = _type_hints(cls), _bounds(cls)
    for name, value in values.items():
        hint = hints.get(name)
        if hint is None:
            continue
        if not _has_type(value, hint):
            allowed = typing.get_args(hint) if _is_union(hint) else (hint,)
            wanted = " or ".join(_TYPE_NAMES[typing.get_origin(t) or t] for t in allowed)
            raise error(f"{prefix}{name} must be {wanted}, got {value!r}")
        if ranges and (problem := range_problem(value, limits.get(name))):
            raise error(f"{prefix}{name} {problem}")


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _bounds(cls: type) -> dict[str, Bounds]:
    return field_bounds(cls)


def _has_type(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if _is_union(hint):
        return any(_has_type(value, option) for option in typing.get_args(hint))
    kind = typing.get_origin(hint) or hint  # dict[str, Any] -> dict
    if kind is type(None):
        return value is None
    if kind in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if kind is float else kind)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)
