"""The fields of the option schemas (and of the model and training configs): a help text in each
field's metadata, and type checks of loose values (parsed from JSON, given by a caller) against a
dataclass's annotations. It imports nothing of prefixcap, so every layer may use it."""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Mapping
from dataclasses import field
from typing import Any

_TYPE_NAMES = {
    int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object", type(None): "null",
}  # fmt: skip


def check_types(cls: type, values: Mapping[str, Any], *, prefix: str = "", error: type[Exception] = ValueError) -> None:
    """Raise `error` naming the first value whose type is not the dataclass field's annotated one
    (`{prefix}{name} must be an integer, got '5'`). JSON semantics: an int is a valid float, a
    bool is not an int. Names that `cls` lacks are left to the caller."""
    hints = _type_hints(cls)
    for name, value in values.items():
        hint = hints.get(name)
        if hint is not None and not _has_type(value, hint):
            allowed = typing.get_args(hint) if _is_union(hint) else (hint,)
            wanted = " or ".join(_TYPE_NAMES[typing.get_origin(t) or t] for t in allowed)
            raise error(f"{prefix}{name} must be {wanted}, got {value!r}")


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


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


def option(default: Any, help: str, **cli: Any) -> Any:
    """A dataclass field with its help text, and `flag="--name"` where the command line's flag differs."""
    return field(default=default, metadata={"help": help, **cli})
