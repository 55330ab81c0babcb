"""The LoRA adapters (peft, as diffusers' ``load_lora_weights`` installs them) that change what a
denoiser computes: which adapters are active or fused, at which weights, and a hash of their
tensors. A calibrated plan records this state (``provenance.lora``) and may require it
(``valid_for.lora``: the hash, or ``none`` for no LoRA); :class:`LoraWatch` checks each run,
and :class:`Rebind` keeps module-site hooks on the modules peft's wrapping puts in their place.

Layers are recognised by what peft's LoRA layers carry (``lora_A``, ``scaling``,
``merged_adapters``), so peft is never imported here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from diffcache.errors import PlanError
from diffcache.hooks import Attachment
from diffcache.sites import Site

logger = logging.getLogger(__name__)
NONE = "none"  # the valid_for.lora / provenance value of a model without LoRA
UNLOADED = "unloaded"  # the weight shown for an adapter fused, then unloaded
_WARNED: set[tuple[str, str]] = set()  # (plan, state) warned about in this process
#: ``valid_for.weights``: the very weights the plan was profiled on (``provenance.weights`` and
#: ``provenance.weights_norm``), not only their storage
PROFILED = "profiled"
#: relative tolerance of :func:`same_weights`. float64 sums of squares in another order differ
#: by about 1e-15, and a float32 LoRA fused then unfused (one rounding each way) moves the norm
#: by up to 2.4e-10 (measured: flux-tiny, wan-shapes-lora, dit-digits-lora); a fused LoRA moves
#: it by 4e-5 (the digits LoRA on dit-digits) to 6e-2 (random ones on flux-tiny)
WEIGHTS_RTOL = 1e-7


def _layers(modules: Sequence[torch.nn.Module]) -> Iterator[tuple[str, Any]]:
    """Every LoRA layer of ``modules`` (run at each run's first call). peft keeps ``scaling``
    in the layer's instance dict: looked for there first, since a missing attribute costs
    ``nn.Module.__getattr__`` an exception on each of the other modules."""
    for e, root in enumerate(modules):
        for name, module in root.named_modules():
            if "scaling" in vars(module) and hasattr(module, "lora_A"):
                yield f"{e}.{name}", module


def _effective(layer: Any) -> tuple[list[str], bool]:
    """The adapters that change ``layer``'s output, and whether they are fused into its weight
    (peft runs the merged weight alone while any adapter is merged)."""
    merged = list(getattr(layer, "merged_adapters", []))
    if merged:
        return merged, True
    if getattr(layer, "disable_adapters", False):
        return [], False
    return [a for a in layer.active_adapters if a in layer.scaling], False


def _tensors(layer: Any, adapter: str) -> list[torch.Tensor]:
    out = []
    for attr in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
        table = getattr(layer, attr, None)
        if table is not None and adapter in table:
            part = table[adapter]
            out.append(part if isinstance(part, torch.Tensor) else part.weight)
    return out


def _weight(layer: Any, adapter: str) -> float:
    """``scaling`` over the adapter's initial scale: the weight ``set_adapters`` gave it."""
    rank = layer.r[adapter]
    rslora = getattr(layer, "use_rslora", {}).get(adapter, False)
    initial = layer.lora_alpha[adapter] / (rank**0.5 if rslora else rank)
    return float(layer.scaling[adapter]) / initial


def _unloaded(modules: Sequence[torch.nn.Module], pipe: Any) -> list[str]:
    """The adapters diffusers fused into the weights (``pipe.fused_loras``) whose LoRA layers
    are gone: ``unload_lora_weights`` after ``fuse_lora`` leaves them in the weights."""
    fused = set(getattr(pipe, "fused_loras", None) or ())
    merged = {a for _, layer in _layers(modules) for a in layer.merged_adapters} if fused else ()
    return sorted(fused - set(merged))


def _plain(root: torch.nn.Module) -> list[torch.Tensor]:
    """The plain tensor parameters of ``root``, detached: quantized ones (tensor subclasses,
    which cannot even be detached in inference mode) are left out."""
    kinds = (torch.nn.Parameter, torch.Tensor)
    return [p.detach() for p in root.parameters() if type(p) in kinds]


def _sums(root: torch.nn.Module) -> list[torch.Tensor]:
    """Each plain tensor parameter of ``root`` in two numbers (on the CPU): its sum and sum of
    squares in float64, reduced on its own device."""
    return [torch.stack([p.double().sum(), p.double().square().sum()]).cpu() for p in _plain(root)]


def _checksum(modules: Sequence[torch.nn.Module]) -> bytes:
    """The weights themselves, cheaply: :func:`_sums` of every parameter."""
    sums = [s for root in modules for s in _sums(root)]
    return torch.cat(sums).numpy().tobytes() if sums else b""


def weights_norm(modules: Sequence[torch.nn.Module]) -> list[float] | None:
    """Each module's squared weight norm (its plain parameters' sum of squares, float64: each
    parameter's norm by ``vector_norm``): what ``diffcache profile`` records
    (``provenance.weights_norm``), so that a run on weights a LoRA was merged into (peft's
    ``merge_and_unload``: no adapter left to see) is told apart; to 12 significant digits, so
    that a plan file does not depend on the machine's summation order. None while some weights
    are not in memory (on the meta device: sequential offloading)."""
    if any(p.is_meta for root in modules for p in root.parameters()):
        return None
    norms = [[torch.linalg.vector_norm(p, dtype=torch.float64) for p in _plain(r)] for r in modules]
    return [float(f"{sum(float(n) ** 2 for n in ns):.12g}") for ns in norms]


def same_weights(recorded: Sequence[float], have: Sequence[float]) -> bool:
    """Whether the norms of :func:`weights_norm` ``have`` are those ``recorded`` (up to float64
    summation order: another device or thread count); a merged LoRA moves them far more."""
    return len(have) == len(recorded) and all(
        math.isclose(a, b, rel_tol=WEIGHTS_RTOL) for a, b in zip(have, recorded, strict=True)
    )


def signature(modules: Sequence[torch.nn.Module], pipe: Any = None) -> tuple:
    """A cheap key that changes whenever :func:`adapter_state` may (adapters loaded, unloaded,
    activated, re-weighted, fused, or their tensors written in place; with a LoRA fused and
    unloaded, the weights' checksum: a run pays one pass over the weights)."""
    unloaded = _unloaded(modules, pipe)
    key: list[tuple] = [("unloaded", *unloaded)]
    if unloaded:  # fusing writes the weights in place (no version bump): read them
        key.append(("weights", _checksum(modules)))
    for name, layer in _layers(modules):
        adapters, fused = _effective(layer)
        for a in adapters:
            parts = tuple((t.data_ptr(), t._version) for t in _tensors(layer, a))
            key.append((name, a, fused, float(layer.scaling[a]), parts))
    return tuple(key)


def adapter_state(modules: Sequence[torch.nn.Module], pipe: Any = None) -> dict[str, Any] | None:
    """``{"adapters": {name: weight}, "fused": bool, "sha256": hex}`` of the LoRA adapters that
    change the output of ``modules`` (a denoiser and its experts, of the pipeline ``pipe``), or
    None without any. The hash covers each layer's adapter tensors, scale and fused flag (not
    the adapter names: the same LoRA under another name is the same model); a weight that
    differs between layers (block-wise scales) is shown as ``per-layer``. An adapter fused and
    then unloaded (named in ``pipe.fused_loras``, its layers gone) stays in the weights: it is
    shown as ``unloaded``, fused, and the hash covers a checksum of the weights."""
    digest = hashlib.sha256()
    weights: dict[str, set[float | str]] = {}
    fused_any = False
    for name, layer in _layers(modules):
        adapters, fused = _effective(layer)
        fused_any = fused_any or fused
        for a in adapters:
            w = _weight(layer, a)
            weights.setdefault(a, set()).add(round(w, 6))
            digest.update(f"{name}|{w!r}|{fused}".encode())
            for t in _tensors(layer, a):
                digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    unloaded = _unloaded(modules, pipe)
    if unloaded:
        fused_any = True
        for a in unloaded:
            weights.setdefault(a, set()).add(UNLOADED)
        digest.update(b"unloaded|" + _checksum(modules))
    if not weights:
        return None
    shown = {a: (ws.pop() if len(ws) == 1 else "per-layer") for a, ws in sorted(weights.items())}
    return {"adapters": shown, "fused": fused_any, "sha256": digest.hexdigest()[:16]}


def state_key(state: Mapping[str, Any] | None) -> str:
    """The ``valid_for.lora`` value of a state: its hash, or ``none``."""
    return NONE if state is None else str(state["sha256"])


def describe(state: Mapping[str, Any] | None) -> str:
    """A state in words: ``no LoRA`` or ``LoRA a=1.0, b=0.5 (fused) [hash]``."""
    if state is None:
        return "no LoRA"
    names = ", ".join(f"{a}={w}" for a, w in state["adapters"].items())
    fused = " (fused)" if state["fused"] else ""
    return f"LoRA {names}{fused} [{state['sha256']}]"


def check_lora(
    plan: Any, modules: Sequence[torch.nn.Module], pipe: Any = None, profile: str | None = None
) -> None:
    """Refuse (PlanError) a plan whose ``valid_for.lora`` is not the state of ``modules`` (of
    ``pipe``); the message names ``profile``, the command that profiles it (default: the
    method's ``profile_hint``)."""
    want = plan.valid_for.get("lora")
    state = adapter_state(modules, pipe) if want is not None else None
    if want is not None and state_key(state) != want:
        raise PlanError(
            f"{plan.source}: valid_for.lora: the plan is valid for LoRA state {want} but the "
            f"pipeline has {describe(state)}; {_FIX} "
            f"({profile or type(plan.config).profile_hint()})."
        )


_FIX = "load the LoRA it was profiled with (provenance.lora) or profile this pipeline"


class LoraWatch:
    """Checks the denoisers' LoRA state at the first call of each run: a plan's
    ``valid_for.lora`` refuses a run under another state (the pipeline stays accelerated); a
    calibrated plan that records the state it was profiled with (``provenance.lora``; none
    recorded: profiled without LoRA) but does not require it warns when they differ: once per
    session, and once per process for a plan and state (``eval`` accelerates again and again).
    Under the state it was profiled with, a plan that records its weights' norm
    (``provenance.weights_norm``) warns alike when they are other weights (a LoRA merged with
    peft alone leaves no adapter to see); a plan that requires them (``valid_for.weights:
    profiled``) is refused instead (``diffcache.weights.WeightsWatch``). Work done once per
    session is done when it opens (``accelerate``), not in its first generation: the weights
    are read then (one pass over them), and the LoRA state is hashed then, so a run rehashes
    only when it changed."""

    def __init__(
        self, modules: Sequence[torch.nn.Module], plan: Any, run: Any, pipe: Any = None
    ) -> None:
        self.modules, self.plan, self.run, self.pipe = list(modules), plan, run, pipe
        calibrated = bool(plan.calibration or plan.tensors)  # profiled data: made on one model
        recorded = plan.provenance.get("lora", NONE) if calibrated else None
        self.recorded = recorded if "lora" not in plan.valid_for else None
        checked = plan.valid_for.get("weights") == PROFILED  # refused, not warned: WeightsWatch
        self.norm = plan.provenance.get("weights_norm") if calibrated and not checked else None
        self.have = weights_norm(self.modules) if self.norm is not None else None
        self.warned = False
        self._sig = signature(self.modules, pipe)
        self._state = adapter_state(self.modules, pipe)

    def state(self) -> dict[str, Any] | None:
        """The current state, rehashed only when :func:`signature` changed."""
        sig = signature(self.modules, self.pipe)
        if sig != self._sig:
            self._sig, self._state = sig, adapter_state(self.modules, self.pipe)
        return self._state

    def facts(self) -> dict[str, Any]:
        """``{"lora": key}`` of this run, after refusing or warning."""
        state = self.state()
        key = state_key(state)
        want = self.plan.valid_for.get("lora")
        if want is not None and key != want:
            raise self.run.refuse(
                f"the plan is valid for LoRA state {want} but this call has {describe(state)}; "
                f"{_FIX} (valid_for.lora)"
            )
        if self.recorded is not None and not self.warned:
            profiled = self.recorded.get("sha256") if isinstance(self.recorded, Mapping) else NONE
            if key != profiled:
                self._warn(
                    key,
                    describe(self.recorded if isinstance(self.recorded, Mapping) else None),
                    describe(state),
                    "with this LoRA",
                )
        norm, self.norm = self.norm, None  # compared at the session's first call
        profiled_state = self.plan.provenance.get("lora")
        if norm is not None and not self.warned and key == state_key(profiled_state):
            have = self.have
            if have is not None and not same_weights(norm, have):
                self._warn(
                    f"weights {have}",
                    "its weights (provenance.weights_norm)",
                    f"{describe(state)} on other weights (their norm differs: a LoRA merged "
                    "into them, e.g. by peft's merge_and_unload, or another checkpoint)",
                    "as you run it",
                )
        return {"lora": key}

    def _warn(self, key: str, profiled: str, have: str, fix: str) -> None:
        """One warning per session, and per plan and ``key`` per process."""
        if (self.plan.source, key) in _WARNED:
            return
        self.warned = True
        _WARNED.add((self.plan.source, key))
        logger.warning(
            "diffcache: %s was calibrated with %s but this run has %s; its calibration may not "
            "fit: run `diffcache profile` on the pipeline %s (diffcache.profile(pipe, %r, "
            "prompts)) for a plan that does.",
            self.plan.name,
            profiled,
            have,
            fix,
            self.plan.method,
        )


class Rebind:
    """Module-site hooks that follow peft's wrapping: peft puts a ``LoraLayer`` in a block's
    attribute in place of a ``Linear`` site when a LoRA loads, and the ``Linear`` back on
    unload. Called before each denoiser call, it moves the hook of every module site whose
    block attribute now holds another module onto that module (``hook(site, handler, name)``
    attaches it again and records it in ``attachments``, the session's list)."""

    def __init__(
        self,
        experts: Sequence[torch.nn.Module],
        attachments: list[Attachment],
        hook: Callable[[Site, Any, str], None],
    ) -> None:
        self.experts, self.attachments, self.hook = list(experts), attachments, hook
        self.hooked: list[tuple[Site, Attachment, Any, str]] = []  # (site, attach, handler, name)

    def add(self, site: Site, attachment: Attachment, handler: Any, name: str) -> None:
        """Follow the module site ``site``, hooked by ``attachment``."""
        self.hooked.append((site, attachment, handler, name))

    def __call__(self) -> None:
        for entry in list(self.hooked):
            site, old, handler, name = entry
            block = getattr(self.experts[site.expert], site.stack.attr)[site.index]
            module = getattr(block, site.spec.attr, None)
            if module is not None and module is not site.module:
                old.detach()
                self.attachments.remove(old)
                self.hooked.remove(entry)
                self.hook(dataclasses.replace(site, module=module), handler, name)
