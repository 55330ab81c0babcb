"""Adapter (one per model family, pure data) and Target (one resolved model)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

CFG_STYLES = ("separate", "batched", "none")
MEDIA = ("video", "image", "text")
REQUEST_FIELDS = (
    "prompt",
    "negative_prompt",
    "height",
    "width",
    "frames",
    "steps",
    "guidance",
    "class_label",
)


@dataclass(frozen=True)
class Adapter:
    """Where diffcache finds things in one model family. Data only; no upstream code is copied.

    Args:
        name: family name used in plan files (``model: wan2.1``).
        pipelines: pipeline class names this adapter matches (exact names, no prefixes).
        denoisers: denoiser class names it matches (for bare-transformer use).
        denoiser_attr: pipeline attribute holding the denoiser.
        latent_arg: denoiser argument carrying the latent (``hidden_states``).
        timestep_arg: denoiser argument carrying the timestep.
        channel_dim: latent channel axis of the denoiser input and output (``-1``: packed tokens).
        cfg: how the stock pipeline runs classifier-free guidance: ``separate`` (one denoiser call
            per branch, cond first), ``batched`` (both branches in one call) or ``none``
            (guidance-distilled, one call).
        block_lists: attributes of the denoiser holding its transformer block lists.
        media: what the pipeline produces: ``video`` (``.frames``) or ``image`` (``.images``).
        call_args: generation request field -> pipeline keyword (see ``REQUEST_FIELDS``); a field
            missing here is not accepted by this family.
    """

    name: str
    pipelines: tuple[str, ...]
    denoisers: tuple[str, ...]
    denoiser_attr: str = "transformer"
    latent_arg: str = "hidden_states"
    timestep_arg: str = "timestep"
    channel_dim: int = 1
    cfg: str = "separate"
    block_lists: tuple[str, ...] = ("blocks",)
    media: str = "video"
    call_args: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.cfg in CFG_STYLES, f"{self.name}: cfg {self.cfg!r} not in {CFG_STYLES}"
        assert self.media in MEDIA, f"{self.name}: media {self.media!r} not in {MEDIA}"
        unknown = set(self.call_args) - set(REQUEST_FIELDS)
        assert not unknown, f"{self.name}: unknown request fields {sorted(unknown)}"
        object.__setattr__(self, "call_args", MappingProxyType(dict(self.call_args)))

    def matches(self, obj: Any) -> bool:
        name = type(obj).__name__
        return name in self.pipelines or name in self.denoisers


@dataclass
class Target:
    """One model resolved through its adapter: the things hooks attach to."""

    adapter: Adapter
    root: Any  # what the user passed to accelerate()
    denoiser: torch.nn.Module
    pipe: Any | None = None  # the pipeline, when root is one
    scheduler: Any | None = None
    num_steps_hint: int | None = None  # from the plan's valid_for, for bare denoisers

    @classmethod
    def resolve(cls, adapter: Adapter, obj: Any) -> Target:
        if type(obj).__name__ in adapter.denoisers:
            return cls(adapter, obj, obj)
        denoiser = getattr(obj, adapter.denoiser_attr, None)
        if not isinstance(denoiser, torch.nn.Module):
            from diffcache.errors import UnsupportedModelError

            raise UnsupportedModelError(
                f"{type(obj).__name__}: attribute {adapter.denoiser_attr!r} is not a torch module "
                f"(adapter {adapter.name!r}); load the pipeline with its denoiser."
            )
        return cls(adapter, obj, denoiser, pipe=obj, scheduler=getattr(obj, "scheduler", None))

    def latent_index(self) -> int | None:
        """Positional index of the latent argument in the denoiser's forward, if it has one."""
        params = list(inspect.signature(self.denoiser.forward).parameters)
        return params.index(self.adapter.latent_arg) if self.adapter.latent_arg in params else None
