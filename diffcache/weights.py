"""How a denoiser's weights are stored (``float32``, ``torchao:Int8Tensor``, ``gguf:Q8_0`` ...):
what profiled plans record (``provenance.weights``, ``valid_for.weights``) and what
``accelerate`` and then each run check (:class:`WeightsWatch`). Kept apart from
``diffcache.quant`` (which builds quantized models) so that the engine can import it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from diffcache.errors import PlanError
from diffcache.lora import PROFILED, same_weights, weights_norm


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
    """Refuse ``plan`` (at ``accelerate``) if it is valid for other weights than ``experts``
    have (:func:`weights_problem`)."""
    problem = weights_problem(plan, experts)
    if problem is not None:
        raise PlanError(f"{problem}.")


def weights_problem(
    plan: Any, experts: Sequence[torch.nn.Module], offloaded_ok: bool = False
) -> str | None:
    """Why ``plan`` is not valid for the weights of ``experts`` (None where it is): another
    storage (``valid_for.weights: float32`` ...), or with ``valid_for.weights: profiled``
    other weights than it was profiled on (their storage and norm in ``provenance``: a LoRA
    merged into them leaves no adapter to see, but moves the norm). ``offloaded_ok``: weights
    on the meta device (sequential offloading), which cannot be read, pass."""
    want = plan.valid_for.get("weights")
    if want is None:
        return None
    fix = f"profile the model as you run it ({type(plan.config).profile_hint()})"
    kind = plan.provenance.get("weights") if want == PROFILED else want
    have = weights(experts)
    if kind is not None and kind != have:
        return (
            f"{plan.source}: valid_for.weights: the plan was calibrated on {kind} weights but "
            f"this model's are {have}; {fix}, or load it as it was profiled"
        )
    return _norm_problem(plan, experts, fix, offloaded_ok) if want == PROFILED else None


def _norm_problem(
    plan: Any, experts: Sequence[torch.nn.Module], fix: str, offloaded_ok: bool
) -> str | None:
    """``valid_for.weights: profiled``: the weights' norm is the one the plan records."""
    where = f"{plan.source}: valid_for.weights: profiled"
    recorded = plan.provenance.get("weights_norm")
    if recorded is None:
        return (
            f"{where}: the plan records no weights' norm (provenance.weights_norm) to compare "
            f"with; {fix}"
        )
    have = weights_norm(experts)
    if have is None and not offloaded_ok:
        return (
            f"{where}: this model's weights are not in memory (on the meta device: sequential "
            "offloading), so they cannot be compared; accelerate before offloading, or drop "
            "the key"
        )
    if have is not None and not same_weights(recorded, have):
        return (
            f"{where}: the plan was profiled on weights of squared norm {recorded} but this "
            f"model's is {have} (a LoRA fused or merged into them, or another checkpoint); "
            f"{fix}, or load the weights it was profiled on (pipe.unfuse_lora() undoes fuse_lora())"
        )
    return None


class WeightsWatch:
    """A plan's ``valid_for.weights`` (none: nothing to check) at the first call of each run,
    as at ``accelerate``: weights changed in place since (a LoRA fused, merged by peft, another
    state dict loaded, the model quantized) refuse the run before any denoising step, and the
    pipeline stays accelerated. With ``profiled`` each run reads the weights' norm once: peft
    writes merged weights through ``.data``, which bumps no version counter, so nothing cheaper
    tells that they changed. Weights offloaded to the meta device after ``accelerate`` read
    them (sequential offloading) cannot be read again: they pass."""

    def __init__(self, experts: Sequence[torch.nn.Module], plan: Any, run: Any) -> None:
        self.experts, self.plan, self.run = list(experts), plan, run

    def facts(self) -> dict[str, Any]:
        """No facts; refuses the run where :func:`weights_problem` finds one."""
        problem = weights_problem(self.plan, self.experts, offloaded_ok=True)
        if problem is not None:
            raise self.run.refuse(problem)
        return {}
