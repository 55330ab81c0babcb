"""Named, instance-level wrappers of callables (``forward``, ``scheduler.step`` ...).

``attach(obj, attr, name, hook)`` puts a :class:`Layer` in the instance's slot for ``attr``; a hook
is ``hook(call, *args, **kwargs)`` where ``call`` runs whatever the slot held before. Nothing is
patched on classes, so two objects of one class stay independent.

Other libraries wrap ``forward`` the same way and keep the callable they wrapped: accelerate's
offload hooks in ``module._old_forward``, diffusers' hook registry in its function references.
These rules make us compose with them in either order:

- On a module that carries an accelerate hook, a layer goes *under* it (into ``_old_forward``):
  diffusers removes and re-adds that hook after every pipeline call, restoring ``forward`` from
  ``_old_forward``, so a layer above it would be dropped.
- On a module whose input diffusers' context parallelism splits, a layer goes where
  :func:`diffcache.distributed.split_below` says.
- :meth:`Attachment.detach` unlinks the layer wherever it now sits: in the slot, under another of
  our layers, or in accelerate's / diffusers' saved reference. A layer that cannot be found any
  more (a library dropped it) is made inert, so whoever still holds it calls straight through.
- On a module compiled in place, a layer goes on its compiled call (``diffcache.compiled``).

A deep copy of a hooked object is a plain copy running its own weights; pickling one raises.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

from diffcache import compiled
from diffcache.distributed import split_below
from diffcache.errors import DiffCacheError

Hook = Callable[..., Any]
_ACCELERATE_SLOT = "_old_forward"  # where accelerate's add_hook_to_module keeps the wrapped forward


class Layer:
    """One hook around the callable that a slot held before (``inner``)."""

    __slots__ = ("hook", "inner", "name", "owner_type", "owns_slot", "run")

    def __init__(self, name: str, hook: Hook, inner: Callable, owner: Any, owns: bool) -> None:
        self.name, self.hook, self.inner = name, hook, inner
        self.owner_type = type(owner).__name__
        self.owns_slot = owns  # the slot was empty (the class attribute showed through)
        self.run = compiled.runner()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.hook is None:  # detached, but still held by a foreign wrapper
            return self.inner(*args, **kwargs)
        return self.run(self.hook, self.inner, *args, **kwargs)

    @property
    def __wrapped__(self) -> Callable:  # inspect.signature() sees the real parameters
        return self.inner

    def __deepcopy__(self, memo: dict) -> Any:
        return copy.deepcopy(self.inner, memo)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise DiffCacheError(
            f"cannot pickle {self.owner_type} while diffcache is attached ({self.name}); "
            "call diffcache.remove(model) first, or save model.state_dict()."
        )


class Attachment:
    """Record of one attach: (object, attribute, name) and the layer it installed."""

    def __init__(self, obj: Any, attr: str, layer: Layer, slot: str) -> None:
        self.obj, self.attr, self.layer, self.slot = obj, attr, layer, slot

    def detach(self) -> None:
        """Unlink the layer wherever it sits now; idempotent."""
        layer = self.layer
        if layer.hook is None:
            return
        layer.hook = None
        d = self.obj.__dict__
        for slot in dict.fromkeys((self.attr, "forward", _ACCELERATE_SLOT, compiled.SLOT)):
            if d.get(slot) is layer:
                if layer.owns_slot and slot == self.attr:
                    del d[slot]
                else:
                    d[slot] = layer.inner
                return
        for outer in layers(self.obj):
            if outer.inner is layer:
                outer.inner, outer.owns_slot = layer.inner, outer.owns_slot or layer.owns_slot
                return
        for ref, field in _diffusers_refs(self.obj):
            if getattr(ref, field, None) is layer:
                setattr(ref, field, layer.inner)
                return
        # Not found: a library dropped the layer; it stays inert wherever it may still be held.


def attach(obj: Any, attr: str, name: str, hook: Hook) -> Attachment:
    """Wrap ``obj.<attr>`` with ``hook`` under ``name`` (outermost among our layers there)."""
    d = obj.__dict__
    slot = attr
    if attr == "forward" and compiled.compiled_in_place(obj):
        slot = compiled.SLOT
    elif attr == "forward" and "_hf_hook" in d and _ACCELERATE_SLOT in d:
        slot = _ACCELERATE_SLOT
    split = split_below(obj) if attr == "forward" else None
    if any(layer.name == name for layer in _chain(split.forward if split else d.get(slot))):
        raise ValueError(f"hook {name!r} is already attached to {type(obj).__name__}.{attr}")
    if split is not None:  # directly under diffusers' split hook
        layer = Layer(name, hook, split.forward, obj, owns=False)
        split.forward = layer
        return Attachment(obj, attr, layer, slot)
    owns = slot not in d
    layer = Layer(name, hook, getattr(obj, attr) if owns else d[slot], obj, owns)
    d[slot] = layer
    return Attachment(obj, attr, layer, slot)


def hooked(value: Any) -> bool:
    """``value`` (a callable held in some slot) is one of our active layers, or wraps one."""
    return next(_chain(value), None) is not None


def layers(obj: Any) -> list[Layer]:
    """Every active layer of ours on ``obj``, found by walking its slots' wrapper chains."""
    held = [getattr(ref, field, None) for ref, field in _diffusers_refs(obj)]
    values = [*getattr(obj, "__dict__", {}).values(), *held]
    return list(dict.fromkeys(layer for value in values for layer in _chain(value)))


def _diffusers_refs(obj: Any) -> Iterator[tuple[Any, str]]:
    """(function reference, field) where diffusers' hook registry on ``obj`` keeps a forward."""
    registry = getattr(obj, "__dict__", {}).get("_diffusers_hook")
    for ref in getattr(registry, "_fn_refs", ()):
        for field in ("forward", "original_forward"):
            yield ref, field


def _chain(value: Any) -> Iterator[Layer]:
    while isinstance(value, Layer):
        if value.hook is not None:
            yield value
        value = value.inner
