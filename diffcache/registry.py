"""Registries of methods and adapters, with did-you-mean lookups (``errors.did_you_mean``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diffcache.adapter import Adapter
from diffcache.errors import PlanError, UnsupportedModelError, did_you_mean

_METHODS: dict[str, tuple[type, Callable]] = {}
_ADAPTERS: dict[str, Adapter] = {}


def register_method(config_cls: type) -> Callable[[Callable], Callable]:
    """Bind ``apply(session, config)`` to a MethodConfig subclass, keyed by its ``name``."""

    def decorator(apply: Callable) -> Callable:
        name = config_cls.name
        missing = [m for m in ("identity", "aggressive", "needs") if not hasattr(config_cls, m)]
        if missing:
            raise TypeError(f"method {name!r} must define {', '.join(missing)}")
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        _METHODS[name] = (config_cls, apply)
        return apply

    return decorator


def get_method(name: str, where: str = "method") -> tuple[type, Callable]:
    """The (config class, apply function) of a registered method, or a PlanError."""
    if name not in _METHODS:
        raise PlanError(
            f"{where}: unknown method {name!r}{did_you_mean(name, _METHODS)}; "
            f"registered: {', '.join(sorted(_METHODS))}."
        )
    return _METHODS[name]


def methods() -> dict[str, type]:
    return {name: cfg for name, (cfg, _) in sorted(_METHODS.items())}


def register_adapter(adapter: Adapter) -> Adapter:
    """Add a model family; a request field it shares with another family must mean the same."""
    if adapter.name in _ADAPTERS:
        raise ValueError(f"adapter {adapter.name!r} is registered twice")
    for f in adapter.fields:
        for other in (a.field(f.name) for a in _ADAPTERS.values()):
            if other is not None and (other.type, other.help) != (f.type, f.help):
                raise ValueError(
                    f"adapter {adapter.name!r}: request field {f.name!r} differs from another "
                    "family's"
                )
    _ADAPTERS[adapter.name] = adapter
    return adapter


def adapters() -> dict[str, Adapter]:
    return dict(sorted(_ADAPTERS.items()))


def find_adapter(obj: Any) -> Adapter:
    """The adapter matching ``obj`` by exact class name, or UnsupportedModelError."""
    for adapter in _ADAPTERS.values():
        if adapter.matches(obj):
            return adapter
    known = "; ".join(
        f"{a.name} ({', '.join(a.pipelines + a.denoisers)})" for a in _ADAPTERS.values()
    )
    raise UnsupportedModelError(
        f"no adapter for {type(obj).__name__}; known families: {known}. "
        "Pass a pipeline or denoiser of a supported family, or add an adapter in pipelines/src/."
    )
