"""Toy models with exact arithmetic, and toy methods that prove the core's seams.

``ToyDenoiser`` returns ``2*x + e`` (e = +1 cond, -1 uncond) through two blocks whose modules
scale by powers of two, so skipped and computed work give different exact numbers. ``ToyPipeline``
runs separate, batched or no CFG like the diffusers pipelines do, with a scheduler that either
integrates with a binary-exact step or replays scripted latents.

Toy methods (registered on import): ``toy_blocks`` (block sites), ``toy_modules`` (module sites)
and ``toy_static`` (a calibrated step method with a sidecar tensor).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
import torch

from diffcache.adapter import Adapter, Capabilities
from diffcache.methods.base import Calibrated, MethodConfig, option
from diffcache.output import rebuild_output, sample_of
from diffcache.registry import register_method
from diffcache.request import Field
from diffcache.session import Call, Session
from diffcache.sites import ModuleSite, Stack
from diffcache.streams import BlockStreams

TOY = Adapter(
    name="toy",
    pipelines=("ToyPipeline",),
    denoisers=("ToyDenoiser",),
    cfg="separate",
    stacks=(Stack("blocks", modules=(ModuleSite("attn", "self_attn"), ModuleSite("ff", "ff"))),),
    media="image",
    provides=Capabilities(("step", "block", "module"), denoiser="latent"),
    output="images",
    call_args={"output_type": "np"},
    seed_arg="generator",
    fields=(
        Field("prompt", str, "what to generate", "prompt", required=True, input=True),
        Field("steps", int, "denoising steps", "steps", min=1, max=1000),
    ),
)


@dataclasses.dataclass
class ToyOutput:
    sample: torch.Tensor


class Scale(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.factor


class ToyBlock(torch.nn.Module):
    """``h + attn(h) + ff(h)`` with attn and ff scaling by ``a``."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.attn, self.ff = Scale(a), Scale(a)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.attn(hidden_states) + self.ff(hidden_states)


class ToyDenoiser(torch.nn.Module):
    """``2*x + e`` through blocks x2 and x0.5; counts real forward passes; optional NaN."""

    def __init__(self, nan_at_call: int | None = None) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))
        self.blocks = torch.nn.ModuleList([ToyBlock(0.5), ToyBlock(-0.25)])
        self.calls = 0
        self.nan_at_call = nan_at_call

    def forward(self, hidden_states, timestep, encoder_hidden_states=None, return_dict=True):
        e = encoder_hidden_states if encoder_hidden_states is not None else 0.0
        if isinstance(e, torch.Tensor):
            e = e.view(-1, *([1] * (hidden_states.ndim - 1)))
        h = hidden_states
        for block in self.blocks:
            h = block(h)
        out = self.scale * h + e
        if self.nan_at_call is not None and self.calls == self.nan_at_call:
            out = out * float("nan")
        self.calls += 1
        return ToyOutput(out) if return_dict else (out,)


class ToyScheduler:
    """``x <- x - v/8`` (exact in binary), or replays ``script`` latents when given."""

    def __init__(self, script: list[torch.Tensor] | None = None) -> None:
        self.script = script
        self.timesteps = torch.tensor([])
        self.outputs: list[torch.Tensor] = []

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        self.timesteps = torch.arange(num_inference_steps, 0, -1, dtype=torch.float32) * 10
        self.num_inference_steps = num_inference_steps
        self._i = 0
        self.outputs = []

    def step(self, model_output, timestep, sample, return_dict=True):
        self.outputs.append(model_output.clone())
        self._i += 1
        if self.script is not None:
            prev = self.script[min(self._i, len(self.script) - 1)].clone()
        else:
            prev = sample - model_output / 8
        return (prev,)


class Img2ImgScheduler(ToyScheduler):
    """A :class:`ToyScheduler` that img2img pipelines start part-way: they call
    ``set_begin_index(t_start)`` after ``set_timesteps`` and run the rest (``strength``)."""

    def set_begin_index(self, begin_index: int = 0) -> None:
        self.begin_index = begin_index


@dataclasses.dataclass
class ToyImages:
    images: list[np.ndarray]


class ToyPipeline:
    """Runs a denoising loop the way diffusers pipelines do, with a chosen CFG style."""

    def __init__(self, cfg: str = "separate", script=None, nan_at_call=None) -> None:
        self.transformer = ToyDenoiser(nan_at_call)
        self.scheduler = ToyScheduler(script)
        self.cfg = cfg

    @torch.no_grad()
    def __call__(
        self,
        latents: torch.Tensor | None = None,
        steps: int = 6,
        guidance_scale: float = 2.0,
        prompt: str | None = None,
        generator: torch.Generator | None = None,
        output_type: str | None = None,
    ):
        if latents is None:  # the prompt sets the scale of the starting noise
            noise = torch.randn((1, 3, 4), generator=generator)
            latents = noise * (1 + sum(map(ord, prompt or "")) % 7 / 8)
        self.scheduler.set_timesteps(steps)
        x = latents
        cfg_on = guidance_scale > 1 and self.cfg != "none"
        for t in self.scheduler.timesteps:
            if cfg_on and self.cfg == "separate":
                cond = self.transformer(
                    x, t, encoder_hidden_states=torch.tensor([1.0]), return_dict=False
                )[0]
                unc = self.transformer(
                    hidden_states=x, timestep=t, encoder_hidden_states=torch.tensor([-1.0])
                ).sample
                v = unc + guidance_scale * (cond - unc)
            elif cfg_on and self.cfg == "batched":
                both = self.transformer(
                    torch.cat([x, x]),
                    t.expand(2 * x.shape[0]),
                    torch.tensor([1.0, -1.0]).repeat_interleave(x.shape[0]),
                )
                cond, unc = both.sample.chunk(2)
                v = unc + guidance_scale * (cond - unc)
            else:
                v = self.transformer(x, t, torch.tensor([1.0])).sample
            x = self.scheduler.step(v, t, x, return_dict=False)[0]
        if output_type == "np":
            return ToyImages([x[0].unsqueeze(-1).sigmoid().numpy()])
        return x


# ----------------------------------------------------------------------------- toy methods
@dataclasses.dataclass(frozen=True)
class ToyBlocksConfig(MethodConfig):
    """Block sites: compute every block on steps divisible by ``every``, else reuse each
    block's residual (output - input, per stream) from its last computed call."""

    name: ClassVar[str] = "toy_blocks"
    granularity: ClassVar[str] = "block"
    needs: ClassVar[Capabilities] = Capabilities(("block",), denoiser="latent")
    every: int = option(2, "compute blocks on steps divisible by this", min=1)

    @classmethod
    def identity(cls) -> ToyBlocksConfig:
        return cls(every=1)

    @classmethod
    def aggressive(cls) -> ToyBlocksConfig:
        return cls(every=1000)


@dataclasses.dataclass
class _Residual:
    residual: Any = None


@register_method(ToyBlocksConfig)
def _apply_blocks(session: Session, cfg: ToyBlocksConfig) -> None:
    sites = session.target.sites("block")
    streams = BlockStreams(sites)

    def block(call: Call) -> Any:
        st = call.state(_Residual)
        x = streams.inputs(call)
        if call.step % cfg.every == 0 or st.residual is None:
            out = call.compute()
            parts = out if isinstance(out, tuple) else (out,)
            st.residual = tuple(p - i for p, i in zip(parts, x, strict=True))
            return out
        parts = tuple(i + r for i, r in zip(x, st.residual, strict=True))
        return parts if len(parts) > 1 else parts[0]

    session.on_sites(sites, block, "toy_blocks")


@dataclasses.dataclass(frozen=True)
class ToyModulesConfig(MethodConfig):
    """Module sites: on steps not divisible by ``every``, modules whose role is in ``roles``
    return their last computed output."""

    name: ClassVar[str] = "toy_modules"
    granularity: ClassVar[str] = "module"
    needs: ClassVar[Capabilities] = Capabilities(("module",), denoiser="latent")
    every: int = option(2, "compute modules on steps divisible by this", min=1)
    roles: tuple[str, ...] = option(("self_attn", "ff"), "module roles that may be reused")

    @classmethod
    def identity(cls) -> ToyModulesConfig:
        return cls(every=1)

    @classmethod
    def aggressive(cls) -> ToyModulesConfig:
        return cls(every=1000)


@register_method(ToyModulesConfig)
def _apply_modules(session: Session, cfg: ToyModulesConfig) -> None:
    sites = [s for s in session.target.sites("module") if s.role in cfg.roles]

    def module(call: Call) -> Any:
        st = call.state(_Residual)
        if call.step % cfg.every == 0 or st.residual is None:
            st.residual = call.compute()
        return st.residual

    session.on_sites(sites, module, "toy_modules")


@dataclasses.dataclass(frozen=True)
class ToyStaticCalibration:
    """Steps to reuse, and per-step output scale factors (in the sidecar)."""

    reuse_steps: tuple[int, ...] = option((), "steps that reuse the last output")
    scale: torch.Tensor = dataclasses.field(default=None)  # type: ignore[assignment]


@dataclasses.dataclass(frozen=True)
class ToyStaticConfig(MethodConfig):
    """A calibrated step method: ``calibrate`` picks the ``reuse_fraction`` of inner steps whose
    output changed least on the calibration trace; a reused step returns the last computed output
    times the profiled ratio of output magnitudes."""

    name: ClassVar[str] = "toy_static"
    granularity: ClassVar[str] = "step"
    needs: ClassVar[Capabilities] = Capabilities(("step",), denoiser="latent")
    calibration: ClassVar[type] = ToyStaticCalibration
    reuse_fraction: float = option(0.5, "share of the inner steps to reuse", min=0.0, max=1.0)

    @classmethod
    def identity(cls) -> ToyStaticConfig:
        return cls(reuse_fraction=0.0)

    @classmethod
    def aggressive(cls) -> ToyStaticConfig:
        return cls(reuse_fraction=1.0)

    def calibrate(self, profiling: Any) -> Calibrated:
        records = [r for r in profiling.trace.select(kind="step") if r.branch == 0]
        steps = max(r.step for r in records) + 1
        change = torch.zeros(steps)
        size = torch.zeros(steps)
        for r in records:
            change[r.step] += r.values["out_change"] or 0.0
            size[r.step] += r.values["out_abs"]
        inner = sorted(range(1, steps - 1), key=lambda i: (float(change[i]), i))
        reuse = tuple(sorted(inner[: int(self.reuse_fraction * len(inner))]))
        scale = torch.ones(steps)
        scale[1:] = size[1:] / size[:-1].clamp_min(1e-12)
        return Calibrated(self, ToyStaticCalibration(reuse, scale))


@register_method(ToyStaticConfig)
def _apply_static(session: Session, cfg: ToyStaticConfig) -> None:
    cal: ToyStaticCalibration = session.calibration

    def step(call: Call) -> Any:
        st = call.state(_Residual)
        if call.step in cal.reuse_steps and st.residual is not None:
            out = sample_of(st.residual) * cal.scale[call.step]
            return rebuild_output(st.residual, out)
        st.residual = call.compute()
        return st.residual

    session.on_step(step)


def tiny_request(model: str, steps: int) -> tuple[Any, list[str], Any]:
    """For a built-in tiny model: a small request (32x32 where it has a size, ``steps``, its
    defaults otherwise), two calibration inputs (class ids for DiT) and one generation request."""
    from diffcache.generate import Request
    from diffcache.models import builtin_models

    defaults = builtin_models()[model].defaults
    small = {"height": 32, "width": 32} if "height" in defaults else {}
    req = Request(steps=steps, **small).merged(defaults)
    if model == "dit-tiny":
        return req, ["1", "2"], req.replace(class_label=1)
    return req, ["a cat", "a red fox"], req.replace(prompt="a cat")


def clean(*objs: Any, exact: bool = True) -> bool:
    """No diffcache layer anywhere on these objects; with ``exact`` also no instance attribute
    (``forward``, ``step`` ...) left where the class method should show through."""
    from diffcache import hooks

    return all(
        not hooks.layers(o) and not any(isinstance(v, hooks.Layer) for v in vars(o).values())
        for o in objs
    ) and not (
        exact
        and any(
            attr in vars(o)
            for o in objs
            for attr in (
                "forward",
                "step",
                "set_timesteps",
                "set_begin_index",
                "begin_run",
                "begin_step",
                "end_run",
                "keep",
            )
        )
    )


def plan_for(pipe: Any, config: MethodConfig, model: str = "toy", **valid_for: Any) -> Any:
    """A plan dict for ``config``; calibrated methods are profiled on ``pipe`` first (a Plan)."""
    if config.calibration is None:
        plan = {"diffcache": 1, "model": model, "method": config.name}
        return {**plan, "options": config.to_options(), "valid_for": valid_for}
    import diffcache

    made = diffcache.profile(pipe, config, prompts=["a cat"], request=_request(valid_for))
    return dataclasses.replace(made, valid_for={**made.valid_for, **valid_for})


def _request(valid_for: dict) -> Any:
    from diffcache.generate import Request

    steps = valid_for.get("num_inference_steps")
    return Request(steps=steps) if steps else Request()


def unexplained_nulls(report: dict) -> list[str]:
    """The null metrics of an eval report (baseline and runs) that ``notes`` gives no reason
    for (every null needs one)."""
    rows = [report["baseline"], *report["runs"]]
    nulls = {k for row in rows for k, v in row.items() if v is None}
    return sorted(nulls - set(report["notes"]))


def bright(class_label: int, image: np.ndarray) -> bool:
    """A toy task scorer: is the image brighter than mid-grey?"""
    assert isinstance(class_label, int)
    return float(image.mean()) > 0.5
