"""How a denoiser's weights are stored (``float32``, ``torchao:Int8Tensor``, ``gguf:Q8_0`` ...):
what profiled plans record (``provenance.weights``, ``valid_for.weights``) and ``accelerate``
checks. Kept apart from ``diffcache.quant`` (which builds quantized models) so that the engine
can import it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from diffcache.errors import PlanError


def weights(modules: Iterable[torch.nn.Module]) -> str:
    """How the linear layers of ``modules`` store their weights: the dtype of plain ones
    (``float32``, ``bfloat16``), ``<library>:<kind>`` for quantized ones (``torchao:Int8Tensor``,
    ``gguf:Q8_0``, ``bitsandbytes:Int8Params``, ``bitsandbytes:nf4``); several kinds are joined
    with ``+``. A model without linear layers is described by all its parameters (``none`` if it
    has none)."""
    modules = list(modules)
    linear = [m.weight for x in modules for m in x.modules() if isinstance(m, torch.nn.Linear)]
    tensors = linear or [p for x in modules for p in x.parameters()]
    return "+".join(sorted({_kind(t) for t in tensors})) or "none"


def _kind(weight: torch.Tensor) -> str:
    """``<library>:<quant type>`` for a weight that names its quantization (diffusers'
    ``GGUFParameter``: ``gguf:Q8_0``; bitsandbytes' ``Params4bit``: ``bitsandbytes:nf4``),
    ``<library>:<class>`` for other tensor subclasses, the dtype of plain tensors."""
    cls = type(weight)
    if cls in (torch.Tensor, torch.nn.Parameter):
        return str(weight.dtype).removeprefix("torch.")
    library = "gguf" if cls.__name__ == "GGUFParameter" else cls.__module__.split(".")[0]
    quant_type = getattr(weight, "quant_type", None)
    return f"{library}:{getattr(quant_type, 'name', quant_type) or cls.__name__}"


def check_weights(plan: Any, experts: Sequence[torch.nn.Module]) -> None:
    """Refuse ``plan`` if it is valid for other weights than ``experts`` have."""
    want = plan.valid_for.get("weights")
    have = weights(experts)
    if want is not None and want != have:
        raise PlanError(
            f"{plan.source}: valid_for.weights: the plan was calibrated on {want} weights but "
            f"this model's are {have}; profile the model as you run it "
            f"({type(plan.config).profile_hint()}), or load it as it was profiled."
        )
