"""Typed, documented option fields and strict coercion of plain (YAML) data into them.

``option`` declares a dataclass field with its documentation and numeric bounds; ``coerce``
builds a frozen dataclass from a plan's mapping and reports every problem at once, each named by
its key path (``options.quantiles.attn``); ``to_plain`` turns it back into plain data.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, Union

import torch

from diffcache.errors import PlanError, did_you_mean

MISSING: Any = dataclasses.MISSING
_BAD: Any = object()  # a value whose problems are already recorded


def option(
    default: Any = MISSING,
    doc: str = "",
    *,
    min: float | None = None,
    max: float | None = None,
    default_factory: Callable[[], Any] = MISSING,
) -> Any:
    """A documented dataclass field; min/max bound numbers (inclusive), also every number inside
    containers. Without a default or default_factory the field is required."""
    meta = {"doc": doc, "min": min, "max": max}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def coerce(value: Any, hint: Any, where: str, meta: Mapping[str, Any] | None = None) -> Any:
    """``value`` (plain YAML data) as type ``hint`` (bounded by ``meta``'s min / max), or a
    PlanError naming ``where`` (a key path like ``options.quantiles.attn``) for every problem
    found, one per line. A dataclass ``hint`` is built from a mapping: unknown keys, missing
    required fields, wrong types and out-of-range values (fields with defaults may be absent)."""
    problems: list[str] = []
    out = _coerce(value, hint, meta or {}, where, problems)
    if problems:
        raise PlanError("\n".join(problems))
    return out


def to_plain(obj: Any) -> Any:
    """Dataclass / tuple / Mapping / tensor -> plain dict / list / scalars, in field order (for
    YAML, and for a trace's values).

    Only ``init`` fields of a dataclass are written, so ``coerce`` reads the result back.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def _from_mapping(cls: type, data: Any, where: str, errs: list[str]) -> Any:
    if not isinstance(data, Mapping):
        return _fail(errs, where, f"expected {_name(cls)}, got {_got(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    before, values = len(errs), {}
    path = f"{where}.{{}}" if where else "{}"  # a key's path ("" where: the keys at the top)
    for key, value in data.items():
        f = fields.get(key) if isinstance(key, str) else None
        if f is None:
            known = ", ".join(fields) or "(none)"
            close = did_you_mean(str(key), fields)
            errs.append(f"{path.format(key)}: unknown key{close}; known: {known}")
            continue
        values[key] = _coerce(value, hints[key], f.metadata, path.format(key), errs)
    for name, f in fields.items():
        if name not in data and f.default is MISSING and f.default_factory is MISSING:
            errs.append(f"{path.format(name)}: required key is missing")
    if len(errs) > before:
        return _BAD
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:  # the dataclass's own __post_init__ checks
        return _fail(errs, where, str(e))


def _coerce(value: Any, hint: Any, meta: Mapping[str, Any], where: str, errs: list[str]) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        allowed = [a for a in args if a is not type(None)]
        if value is None and len(allowed) < len(args):
            return None
        if len(allowed) == 1:
            return _coerce(value, allowed[0], meta, where, errs)
        for alt in allowed:
            scratch: list[str] = []
            out = _coerce(value, alt, meta, where, scratch)
            if not scratch:
                return out
        return _fail(errs, where, f"expected {_name(hint)}, got {_got(value)}")
    if origin is Literal:
        if any(type(value) is type(c) and value == c for c in args):
            return value
        words = [c for c in args if isinstance(c, str)]
        close = did_you_mean(value, words) if isinstance(value, str) else ""
        return _fail(errs, where, f"expected {_name(hint)}, got {_short(value)}{close}")
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else _from_mapping(hint, value, where, errs)
    if hint in (bool, int, float, str):
        return _scalar(value, hint, meta, where, errs)
    if origin in (tuple, list) or hint in (tuple, list):
        return _sequence(value, hint, meta, where, errs)
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return _mapping(value, hint, meta, where, errs)
    raise TypeError(f"{where}: options of type {hint!r} are not supported")


def _scalar(value: Any, hint: type, meta: Mapping[str, Any], where: str, errs: list[str]) -> Any:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {bool: isinstance(value, bool), int: number and isinstance(value, int), float: number}
    if not ok.get(hint, isinstance(value, str)):
        remedy = ""
        if hint in (int, float) and isinstance(value, str) and _finite(value):
            remedy = "; write the number without quotes"
        return _fail(errs, where, f"expected {hint.__name__}, got {_got(value)}{remedy}")
    if hint is float:
        if not _finite(value):
            return _fail(errs, where, f"must be a finite number, got {_short(value)}")
        value = float(value)
    if hint in (int, float):
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and value < lo:
            return _fail(errs, where, f"must be >= {lo}, got {_short(value)}")
        if hi is not None and value > hi:
            return _fail(errs, where, f"must be <= {hi}, got {_short(value)}")
    return value


def _sequence(value: Any, hint: Any, meta: Mapping[str, Any], where: str, errs: list[str]) -> Any:
    if not isinstance(value, (list, tuple)):
        return _fail(errs, where, f"expected {_name(hint)}, got {_got(value)}")
    args = typing.get_args(hint)
    if not args:
        items = [Any] * len(value)
    elif typing.get_origin(hint) is list or args[-1] is Ellipsis:
        items = [args[0]] * len(value)
    elif len(args) != len(value):
        return _fail(errs, where, f"expected {_name(hint)}, got {_got(value)}")
    else:
        items = list(args)
    before = len(errs)
    out = [
        _coerce(v, h, meta, f"{where}[{i}]", errs)
        for i, (v, h) in enumerate(zip(value, items, strict=True))
    ]
    if len(errs) > before:
        return _BAD
    return out if (typing.get_origin(hint) or hint) is list else tuple(out)


def _mapping(value: Any, hint: Any, meta: Mapping[str, Any], where: str, errs: list[str]) -> Any:
    if not isinstance(value, Mapping):
        return _fail(errs, where, f"expected {_name(hint)}, got {_got(value)}")
    key_hint, value_hint = typing.get_args(hint) or (Any, Any)
    before, out = len(errs), {}
    for k, v in value.items():
        key = _coerce(k, key_hint, {}, f"{where} (key {k!r})", errs)
        out[key] = _coerce(v, value_hint, meta, f"{where}.{k}", errs)
    return out if len(errs) == before else _BAD


def _fail(errs: list[str], where: str, problem: str) -> Any:
    errs.append(f"{where}: {problem}" if where else problem)
    return _BAD


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError, OverflowError):
        return False


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _got(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item{'' if len(value) == 1 else 's'}"
    return f"{type(value).__name__} {_short(value)}"


def _name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in args)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return f"a mapping ({hint.__name__})"
    if origin in (tuple, list) or hint in (tuple, list):
        if args and args[-1] is not Ellipsis and origin is tuple:
            return f"a list of {len(args)} items ({', '.join(_name(a) for a in args)})"
        return f"a list of {_name(args[0])}" if args else "a list"
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return f"a mapping of {_name(args[0])} to {_name(args[1])}" if args else "a mapping"
    return {type(None): "null", Any: "anything"}.get(hint) or getattr(hint, "__name__", repr(hint))
