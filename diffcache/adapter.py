"""Adapter (one per model family, pure data: where diffcache finds things in it) and Target
(one resolved model). No upstream code is copied."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from diffcache.compiled import check_site, unwrap
from diffcache.errors import UnsupportedModelError
from diffcache.request import Field
from diffcache.sites import Site, Stack

CFG_STYLES = ("separate", "batched", "none")
MEDIA = ("video", "image", "text")
DRIVERS = ("scheduler", "timestep", "pipeline")
#: The capability vocabulary: site kinds resolved (attention: blocks split into qkv / attend /
#: finish), the KV store a pipeline runs a method's policy with (position: rows by absolute
#: position; history: each layer's K/V of earlier scales) and the kind of denoiser.
SITES = ("step", "block", "module", "attention")
KV_STORES = ("position", "history")
DENOISERS = ("latent", "masked-token", "next-scale")


@dataclass(frozen=True)
class Capabilities:
    """What a family's model offers methods (``Adapter.provides``), or what a method needs of it
    (``MethodConfig.needs``): site kinds (``SITES``), a KV store kind (``KV_STORES``) and the
    denoiser kind (``DENOISERS``); "" is none (a method: needs none). Data only."""

    sites: tuple[str, ...] = ("step",)
    kv_store: str = ""
    denoiser: str = ""

    def __post_init__(self) -> None:
        assert set(self.sites) <= set(SITES), f"sites {self.sites} not in {SITES}"
        assert self.kv_store in ("", *KV_STORES), f"kv_store {self.kv_store!r}"
        assert self.denoiser in ("", *DENOISERS), f"denoiser {self.denoiser!r}"


@dataclass(frozen=True)
class KVSeam:
    """Where a KV method meets a model whose attention keeps K/V in a store (the protocol of
    ``diffcache.kv.Store``): the model's attention writes each layer's fresh rows to the
    generation's store and attends over what the store reads back. The kind of store is the
    adapter's ``provides.kv_store``.

    Args:
        policy: the pipeline method that returns each generation's policy (which rows to
            recompute, when to refresh); a KV method wraps it to hand in its own, and the
            pipeline gives the policy the generation's store (``Policy.start``).
        semi_autoregressive: the family's own sampler decodes in semi-autoregressive blocks
            (LLaDA's ``generate``), not the whole answer at once (Dream's).
        random_remasking: the sampler can commit its fixed count per step in a random order
            (LLaDA's ``remasking="random"``), so the next step's tokens can be drawn ahead.
    """

    policy: str
    semi_autoregressive: bool = False
    random_remasking: bool = False


@dataclass(frozen=True)
class Adapter:
    """Where diffcache finds things in one model family. Data only.

    Args:
        name: registry name (`diffcache models` families); plans name its ``family``.
        pipelines: pipeline class names this adapter matches (exact names, no prefixes).
        denoisers: denoiser class names it matches (for bare-denoiser use).
        experts: pipeline attributes holding denoisers, in order (Wan2.2: ``transformer`` and
            ``transformer_2``); absent or ``None`` ones are skipped.
        driver: who tells runs and steps (``diffcache.drivers``): ``scheduler`` or ``pipeline``;
            a bare denoiser always uses ``timestep``.
        latent_arg: denoiser argument carrying the latent (``hidden_states``).
        timestep_arg: denoiser argument carrying the timestep.
        channel_dim: latent channel axis of the denoiser input and output (``-1``: packed tokens).
        cfg: how the pipeline runs classifier-free guidance: ``separate`` (one denoiser call per
            branch, cond first), ``batched`` (both branches in one call) or ``none``.
        stacks: the denoiser's block lists, with the modules inside each block.
        media: what the pipeline produces: ``video``, ``image`` or ``text``.
        provides: what the model offers methods (``Capabilities``); its block and module sites
            are those ``stacks`` describe.
        fields: the generation request fields it takes (CLI flags and pipeline keywords).
        rules: checks across fields (text LMs: ``gen_length`` a multiple of ``block_length``),
            each given a request's values and returning its problem or None; run, like the
            fields' own bounds, before any model is built.
        valid_for: extra ``valid_for`` keys plans for this family may carry, with their types.
        output: the attribute of the pipeline's return value holding its batch of samples
            (``frames``, ``images``, ``texts``): ``generate`` returns the first (empty: the
            family is used through its bare denoiser only).
        call_args: keywords every generation passes (diffusers: ``output_type="np"``).
        seed_arg: the keyword that takes a ``torch.Generator`` seeded with the request's seed
            (declared with ``output``).
        kv: where KV methods meet the model (:class:`KVSeam`); None: the model keeps no KV store.
        family: the family whose plans it takes (``model:`` in plan files); a pipeline variant
            (img2img, inpaint, image-to-video, video-to-video: ``diffcache.variants``) takes its
            base family's plans. Empty: ``name``.
        steps_run: ``steps_run(steps, strength)``, the steps a request denoises where its
            ``strength`` trims the schedule (``diffcache.variants``); None: its step count.
    """

    name: str
    pipelines: tuple[str, ...]
    denoisers: tuple[str, ...]
    experts: tuple[str, ...] = ("transformer",)
    driver: str = "scheduler"
    latent_arg: str = "hidden_states"
    timestep_arg: str = "timestep"
    channel_dim: int = 1
    cfg: str = "separate"
    stacks: tuple[Stack, ...] = ()
    media: str = "video"
    provides: Capabilities = Capabilities(denoiser="latent")
    fields: tuple[Field, ...] = ()
    rules: tuple[Callable[[Mapping[str, Any]], str | None], ...] = ()
    valid_for: Mapping[str, type] = field(default_factory=dict)
    output: str = ""
    call_args: Mapping[str, Any] = field(default_factory=dict)
    seed_arg: str = ""
    kv: KVSeam | None = None
    family: str = ""
    steps_run: Callable[[int, float], int] | None = None

    def __post_init__(self) -> None:
        assert self.cfg in CFG_STYLES, f"{self.name}: cfg {self.cfg!r} not in {CFG_STYLES}"
        assert self.media in MEDIA, f"{self.name}: media {self.media!r} not in {MEDIA}"
        assert self.driver in DRIVERS, f"{self.name}: driver {self.driver!r} not in {DRIVERS}"
        sites = self.provides.sites
        assert ("block" in sites) == bool(self.stacks), f"{self.name}: block sites and stacks"
        modules = any(s.modules for s in self.stacks)
        assert ("module" in sites) == modules, f"{self.name}: module sites and stack modules"
        assert self.kv is None or self.provides.kv_store, f"{self.name}: kv needs a kv_store"
        names = [f.name for f in self.fields]
        assert len(names) == len(set(names)), f"{self.name}: duplicate request fields {names}"
        inputs = [f.name for f in self.fields if f.input]
        assert len(inputs) <= 1, f"{self.name}: more than one input field {inputs}"
        assert bool(self.output) == bool(self.seed_arg), f"{self.name}: output and seed_arg"
        object.__setattr__(self, "valid_for", MappingProxyType(dict(self.valid_for)))
        object.__setattr__(self, "call_args", MappingProxyType(dict(self.call_args)))
        object.__setattr__(self, "family", self.family or self.name)

    def matches(self, obj: Any) -> bool:
        name = type(unwrap(obj)).__name__
        return name in self.pipelines or name in self.denoisers

    def field(self, name: str) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)

    @property
    def input_field(self) -> Field | None:
        """The field a command's inputs fill (``Field.input``), if the family has one."""
        return next((f for f in self.fields if f.input), None)


@dataclass
class Target:
    """One model resolved through its adapter: the objects hooks attach to, and its sites."""

    adapter: Adapter
    root: Any  # what the user passed to accelerate()
    experts: list[torch.nn.Module]
    expert_names: list[str]
    pipe: Any | None = None  # the pipeline, when root is one
    scheduler: Any | None = None
    driver: str = "scheduler"
    valid_for: Mapping[str, Any] = field(default_factory=dict)  # the plan's, once resolved

    @classmethod
    def resolve(cls, adapter: Adapter, obj: Any) -> Target:
        if type(unwrap(obj)).__name__ in adapter.denoisers:  # named as in its pipeline, so that the
            name = adapter.experts[0]  # site names of a plan profiled there match
            return cls(adapter, obj, [obj], [name], driver="timestep")
        experts, names = [], []
        for attr in adapter.experts:
            module = getattr(obj, attr, None)
            if module is None:
                continue
            if not isinstance(module, torch.nn.Module):
                raise UnsupportedModelError(
                    f"{type(obj).__name__}: attribute {attr!r} is not a torch module "
                    f"(adapter {adapter.name!r}); load the pipeline with its denoiser."
                )
            experts.append(module)
            names.append(attr)
        if not experts:
            raise UnsupportedModelError(
                f"{type(obj).__name__} has no denoiser in {', '.join(adapter.experts)} "
                f"(adapter {adapter.name!r}); load the pipeline with its denoiser."
            )
        scheduler = getattr(obj, "scheduler", None) if adapter.driver == "scheduler" else None
        if adapter.driver == "scheduler" and scheduler is None:
            raise UnsupportedModelError(
                f"{type(obj).__name__} has no scheduler; diffcache counts steps with it."
            )
        return cls(adapter, obj, experts, names, obj, scheduler, adapter.driver)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The first (or only) expert."""
        return self.experts[0]

    def arg_index(self, name: str) -> int | None:
        """Positional index of a denoiser argument, if its forward takes it positionally."""
        params = list(inspect.signature(unwrap(self.denoiser).forward).parameters)
        return params.index(name) if name in params else None

    def sites(self, kind: str) -> list[Site]:
        """The ``block`` or ``module`` sites of every expert, in call order."""
        out: list[Site] = []
        for e, (module, prefix) in enumerate(zip(self.experts, self.expert_names, strict=True)):
            for stack in self.adapter.stacks:
                for i, block in enumerate(getattr(module, stack.attr, None) or ()):
                    name = f"{prefix}.{stack.attr}.{i}"
                    check_site(module, block, name, kind)
                    if kind == "block":
                        out.append(Site("block", name, block, e, stack, i))
                    elif kind == "module":
                        for m in stack.modules:
                            sub = getattr(block, m.attr, None)
                            if isinstance(sub, torch.nn.Module):
                                out.append(Site("module", f"{name}.{m.attr}", sub, e, stack, i, m))
        return out
