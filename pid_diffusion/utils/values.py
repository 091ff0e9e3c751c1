"""Plain values in and out of the library's objects: an enum member from its value, and plain data (what JSON and
`torch.load(weights_only=True)` hold) from configurations and constructor arguments."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["parse_enum", "plain"]

E = TypeVar("E", bound=enum.Enum)


def parse_enum(enum_type: type[E], value: E | str, name: str) -> E:
    """The member of `enum_type` with value `value` (or `value` itself), or a ValueError naming `name` and the
    choices."""
    try:
        return enum_type(value)
    except ValueError:
        choices = ", ".join(str(member.value) for member in enum_type)
        raise ValueError(f"{name}={value!r} is not supported: {value!r} is not one of {choices} (choose one of "
                         "these)") from None


def plain(value: Any, name: str = "value") -> Any:
    """`value` as plain data: dataclasses and mappings become dicts (string keys), tuples lists, enums their values,
    NumPy and 0-dim torch scalars numbers; a TypeError names `name` (a dotted path) for anything else."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: plain(getattr(value, field.name), f"{name}.{field.name}")
                for field in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(key): plain(item, f"{name}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item, f"{name}[{index}]") for index, item in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # NumPy or 0-dim torch scalars.
        return value.item()
    raise TypeError(f"{name} is a {type(value).__name__}; plain data is numbers, strings, lists and dicts")
