"""Dataclass trees as JSON and back, by their type hints.

A render plan is computed once and read by other processes (the farm's units). JSON rather
than pickle: a stored file that was tampered with can at worst describe a wrong plan, never run
code. The type hints restore what JSON cannot say (tuples, sets, bytes, paths, enums, integer
keys), and :func:`shape` fingerprints the hints themselves, so a file written for dataclasses
of another shape is recognised as such instead of being read wrongly.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import functools
import hashlib
import types
import typing
from pathlib import Path
from typing import Any

_NONE = type(None)


class ShapeError(ValueError):
    """The data does not have the shape its type hints promise."""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional(tp: Any) -> Any | None:
    """``X`` of ``X | None`` (None for any other type)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not _NONE]
        if len(arms) == 1 and len(typing.get_args(tp)) == 2:
            return arms[0]
        raise TypeError(f"only X | None unions can be stored, not {tp}")
    return None


def dump(value: Any, tp: Any) -> Any:
    """``value`` (of type ``tp``) as JSON data."""
    if tp is Any:
        return value
    inner = _optional(tp)
    if inner is not None:
        return None if value is None else dump(value, inner)
    if dataclasses.is_dataclass(tp):
        hints = _hints(tp)  # type: ignore[arg-type]
        return {f.name: dump(getattr(value, f.name), hints[f.name])
                for f in dataclasses.fields(tp)}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return value.value
    if tp is Path:
        return str(value)
    if tp is bytes:
        return base64.b64encode(value).decode("ascii")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is dict:
        return {str(dump(k, args[0])): dump(v, args[1]) for k, v in value.items()}
    if origin in (list, set, frozenset) or (origin is tuple and args[-1:] == (...,)):
        items = [dump(v, args[0]) for v in value]
        return sorted(items) if origin in (set, frozenset) else items
    if origin is tuple:
        return [dump(v, a) for v, a in zip(value, args, strict=True)]
    return value


def load(data: Any, tp: Any) -> Any:
    """JSON data back as a value of type ``tp``; :class:`ShapeError` when it is not one."""
    try:
        return _load(data, tp)
    except ShapeError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ShapeError(f"not a {tp}: {exc}") from None


def _load(data: Any, tp: Any) -> Any:
    if tp is Any:
        return data
    inner = _optional(tp)
    if inner is not None:
        return None if data is None else _load(data, inner)
    if dataclasses.is_dataclass(tp):
        if not isinstance(data, dict) or set(data) != {f.name for f in dataclasses.fields(tp)}:
            raise ShapeError(f"not a {tp.__name__}")  # type: ignore[union-attr]
        hints = _hints(tp)  # type: ignore[arg-type]
        return tp(**{name: _load(value, hints[name])  # type: ignore[operator]
                     for name, value in data.items()})
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(data)
    if tp is Path:
        return Path(_checked(data, str))
    if tp is bytes:
        return base64.b64decode(_checked(data, str), validate=True)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is dict:
        key = args[0]
        return {(int(k) if key is int else _load(k, key)): _load(v, args[1])
                for k, v in _checked(data, dict).items()}
    if origin in (list, set, frozenset) or (origin is tuple and args[-1:] == (...,)):
        return origin(_load(v, args[0]) for v in _checked(data, list))
    if origin is tuple:
        return tuple(_load(v, a) for v, a in zip(_checked(data, list), args, strict=True))
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise ShapeError(f"{data!r} is not a number")
        return float(data)
    if tp in (int, str, bool):
        if type(data) is not tp:
            raise ShapeError(f"{data!r} is not a {tp.__name__}")
        return data
    raise TypeError(f"cannot load a {tp}")


def _checked(data: Any, kind: type) -> Any:
    if not isinstance(data, kind):
        raise ShapeError(f"{type(data).__name__} where a {kind.__name__} belongs")
    return data


@functools.cache
def shape(tp: Any) -> str:
    """A fingerprint of ``tp``'s stored form: changes whenever a field, nested or not, is
    added, removed, renamed or retyped."""
    return hashlib.sha256(_describe(tp, ()).encode()).hexdigest()[:16]


def _describe(tp: Any, seen: tuple[Any, ...]) -> str:
    if dataclasses.is_dataclass(tp):
        name = f"{tp.__module__}.{tp.__qualname__}"  # type: ignore[union-attr]
        if tp in seen:
            return name
        hints = _hints(tp)  # type: ignore[arg-type]
        fields = ",".join(f"{f.name}:{_describe(hints[f.name], (*seen, tp))}"
                          for f in dataclasses.fields(tp))
        return f"{name}({fields})"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return f"{tp.__qualname__}[{','.join(str(m.value) for m in tp)}]"
    args = typing.get_args(tp)
    if args:
        name = getattr(typing.get_origin(tp), "__name__", str(typing.get_origin(tp)))
        return f"{name}[{','.join(_describe(a, seen) for a in args)}]"
    return getattr(tp, "__name__", repr(tp))
