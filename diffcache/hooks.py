"""Named, instance-level wrappers of methods (``forward``, ``scheduler.step`` ...).

A hook is ``fn(call, *args, **kwargs)`` where ``call`` runs the next layer of the chain. Hooks live
on the instance (``obj._diffcache_hooks``), never on its class, so two objects of one class stay
independent. Removing the last hook of a method restores the instance exactly as it was.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

HOOKS_ATTR = "_diffcache_hooks"
_ABSENT = object()  # the instance had no attribute of its own: the class method shows through

Hook = Callable[..., Any]


class _Entry:
    """The hooks of one method of one instance, innermost first."""

    def __init__(self, original: Any) -> None:
        self.original = original
        self.hooks: dict[str, Hook] = {}


def attach(obj: Any, attr: str, name: str, hook: Hook) -> None:
    """Wrap ``obj.<attr>`` with ``hook`` under ``name`` (outermost). Raises if the name is taken."""
    registry: dict[str, _Entry] = obj.__dict__.setdefault(HOOKS_ATTR, {})
    entry = registry.get(attr)
    if entry is None:
        entry = registry[attr] = _Entry(obj.__dict__.get(attr, _ABSENT))
    if name in entry.hooks:
        raise ValueError(f"hook {name!r} is already attached to {type(obj).__name__}.{attr}")
    entry.hooks[name] = hook
    _rebuild(obj, attr, entry)


def detach(obj: Any, attr: str, name: str) -> None:
    """Remove one hook; with the last one gone the original method is back, bit for bit."""
    registry = obj.__dict__.get(HOOKS_ATTR, {})
    entry = registry.get(attr)
    if entry is None or name not in entry.hooks:
        raise ValueError(f"no hook {name!r} on {type(obj).__name__}.{attr}")
    del entry.hooks[name]
    if entry.hooks:
        _rebuild(obj, attr, entry)
        return
    del registry[attr]
    if entry.original is _ABSENT:
        del obj.__dict__[attr]
    else:
        obj.__dict__[attr] = entry.original
    if not registry:
        del obj.__dict__[HOOKS_ATTR]


def detach_all(obj: Any, prefix: str = "diffcache.") -> None:
    """Remove every hook whose name starts with ``prefix`` from ``obj``."""
    for attr, entry in list(obj.__dict__.get(HOOKS_ATTR, {}).items()):
        for name in [n for n in entry.hooks if n.startswith(prefix)]:
            detach(obj, attr, name)


def hook_names(obj: Any) -> list[str]:
    """``attr:name`` of every hook on ``obj``."""
    return [f"{a}:{n}" for a, e in obj.__dict__.get(HOOKS_ATTR, {}).items() for n in e.hooks]


def _rebuild(obj: Any, attr: str, entry: _Entry) -> None:
    base = entry.original
    if base is _ABSENT:
        base = getattr(type(obj), attr).__get__(obj, type(obj))
    fn = base
    for hook in entry.hooks.values():
        fn = _layer(hook, fn)
    # __wrapped__ -> the original, so inspect.signature() sees the real parameters (pipelines
    # inspect scheduler.step / set_timesteps signatures).
    obj.__dict__[attr] = functools.update_wrapper(fn, base)


def _layer(hook: Hook, inner: Callable[..., Any]) -> Callable[..., Any]:
    def layer(*args: Any, **kwargs: Any) -> Any:
        return hook(inner, *args, **kwargs)

    return layer
