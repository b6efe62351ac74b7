"""Typed records that round-trip through JSON: ``from_dict(cls, to_dict(x)) == x``.

What crosses a process or file boundary (a verification report in a cache manifest, a stage
record from a pytest-xdist worker into ``results.json``) is a dataclass, serialized to builtin
types by :func:`to_dict` and rebuilt from its type hints by :func:`from_dict` — not a dict whose
keys a reader sniffs to guess what it holds.

``from_dict`` understands dataclasses, ``list[T]``, ``tuple[T, ...]``, ``dict[str, T]``,
``T | None`` and builtin scalars; keys that are not fields (derived values a ``to_dict`` adds for
readers, like ``passed``) are ignored, so a record written by a newer version still reads.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

__all__ = ["to_dict", "from_dict", "to_builtin"]

T = TypeVar("T")


def to_builtin(value: Any) -> Any:
    """Dataclasses, tuples and NumPy scalars/arrays → dicts, lists and Python scalars."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        to = getattr(value, "to_dict", None)
        if to is not None:
            return to()
        return {f.name: to_builtin(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_builtin(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_builtin(v) for v in value]
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy scalar or array
        return value.tolist()
    return value


def to_dict(record: Any) -> dict:
    """The fields of a dataclass as builtin types (nested records included)."""
    return {f.name: to_builtin(getattr(record, f.name)) for f in dataclasses.fields(record)}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(tp: Any, value: Any) -> Any:
    if tp is Any or value is None:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return _convert(option, value)
            except (TypeError, ValueError):
                continue
        raise TypeError(f"{value!r} matches none of {tp}")
    if origin in (list, typing.List):  # noqa: UP006
        return [_convert(args[0] if args else Any, v) for v in value]
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v) for v in value)
        return tuple(_convert(a, v) for a, v in zip(args, value)) if args else tuple(value)
    if origin in (dict, typing.Dict):  # noqa: UP006
        key_t, val_t = args if args else (Any, Any)
        return {_convert(key_t, k): _convert(val_t, v) for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError(f"expected an object for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError(f"expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict) -> T:
    """Rebuild a dataclass ``cls`` from ``data`` (as written by :func:`to_dict`)."""
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not f.init:
            continue
        if f.name in data:
            kwargs[f.name] = _convert(hints.get(f.name, Any), data[f.name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            raise ValueError(f"{cls.__name__}: required field {f.name!r} is missing")
    return cls(**kwargs)

