"""MethodConfig: the frozen, strictly validated settings of one caching method."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

from diffcache.errors import PlanError
from diffcache.registry import did_you_mean

GRANULARITIES = ("step", "block", "module", "kv")


def option(default: Any, doc: str, *, min: float | None = None, max: float | None = None) -> Any:
    """A documented config field; ``min``/``max`` bound numeric values (inclusive)."""
    return dataclasses.field(default=default, metadata={"doc": doc, "min": min, "max": max})


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of every method config. Subclasses are frozen dataclasses declared with ``option``.

    Class attributes: ``name`` (the YAML key and registry key), ``granularity``
    (``step | block | module | kv``), ``kernels`` (the kernel ops the method calls),
    ``requires_calibration`` and ``profile_hint`` (the command that makes the calibration).

    Every subclass also defines two classmethods, checked at registration: ``identity()``, a
    setting that never reuses anything (outputs equal the un-accelerated model), and
    ``aggressive()``, a setting that reuses as much as the method allows (contract tests, demos).
    """

    name: ClassVar[str]
    granularity: ClassVar[str]
    kernels: ClassVar[tuple[str, ...]] = ()
    requires_calibration: ClassVar[bool] = False
    profile_hint: ClassVar[str] = ""

    def not_supported_reasons(self, target: Any) -> list[str]:
        """Every reason this method cannot run on ``target`` (a resolved Target); [] if it can."""
        return []

    @classmethod
    def from_options(cls, options: Mapping[str, Any], where: str = "options") -> MethodConfig:
        """Build from a plan's ``options`` mapping: unknown keys, wrong types and out-of-range
        values raise PlanError naming ``where.key``; all problems are reported at once."""
        if not isinstance(options, Mapping):
            raise PlanError(f"{where}: expected a mapping of options, got {type(options).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        problems, values = [], {}
        for key, value in options.items():
            if key not in fields:
                problems.append(
                    f"{where}.{key}: unknown option for method {cls.name!r}"
                    f"{did_you_mean(str(key), fields)}; known: {', '.join(fields)}"
                )
                continue
            try:
                values[key] = _coerce(value, hints[key], fields[key].metadata)
            except ValueError as e:
                problems.append(f"{where}.{key}: {e}")
        if problems:
            raise PlanError("\n".join(problems))
        return cls(**values)

    def to_options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def check_calibration(cls, calibration: Mapping[str, Any], where: str) -> None:
        """Refuse a plan whose calibration does not fit the method (missing or unexpected)."""
        if cls.requires_calibration and not calibration:
            raise PlanError(
                f"{where}: method {cls.name!r} needs calibration data and the plan has none; "
                f"make it with: {cls.profile_hint}"
            )
        if calibration and not cls.requires_calibration:
            raise PlanError(f"{where}: method {cls.name!r} takes no calibration data; remove it.")


def _coerce(value: Any, hint: Any, meta: Mapping[str, Any]) -> Any:
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ValueError("must not be null")
    for typ in allowed:
        if typ is bool and isinstance(value, bool):
            return value
        if typ is int and isinstance(value, int) and not isinstance(value, bool):
            return _bounded(value, meta)
        if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError(f"must be a finite number, got {value!r}")
            return _bounded(float(value), meta)
        if typ is str and isinstance(value, str):
            return value
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ValueError(f"expected {names}, got {type(value).__name__} {value!r}")


def _bounded(value: float, meta: Mapping[str, Any]) -> Any:
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise ValueError(f"must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"must be <= {hi}, got {value}")
    return value
