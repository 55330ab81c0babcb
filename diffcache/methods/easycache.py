"""EasyCache: runtime-adaptive reuse of whole denoiser steps.

Paper: Zhou et al., "Less is Enough: Training-Free Video Diffusion Acceleration via Runtime-Adaptive
Caching" (EasyCache, arXiv 2507.02860); reference code H-EmbodVis/EasyCache (Wan2.1 and
HunyuanVideo scripts).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch

from diffcache import hooks
from diffcache.adapter import Target
from diffcache.errors import RunError
from diffcache.methods.base import MethodConfig, option
from diffcache.output import rebuild_output, sample_of
from diffcache.registry import register_method
from diffcache.runstate import RunState

HOOK = "diffcache.easycache"


@dataclasses.dataclass(frozen=True)
class EasyCacheConfig(MethodConfig):
    """EasyCache (arXiv 2507.02860): skip a whole denoiser call and return
    ``x_i + (v_c − x_c)``, the transformation vector of the last computed step ``c``.

    Rules, as the reference code implements them (``mean|·|`` = mean absolute value):

    - Steps ``i < warmup_steps`` and the last step are always computed (accumulator reset).
    - Otherwise, on the decision branch: ``Δx_i = mean|x_i − x_{i−1}|`` (``x_{i−1}`` is the previous
      step's input, computed or skipped), ``E += k · Δx_i / mean|v_c|`` and the step reuses iff
      ``E < threshold``; on compute ``E = 0``. Before ``k`` exists the step is computed.
    - After each computed step ``i``: ``k = mean|v_i − v_c'| / mean|x_i − x_c'|`` with ``c'`` the
      previous computed step.
    - CFG: the decision is taken on the first denoiser call of the step (cond, as the reference's
      "even" call) and applied to every branch of that step; each branch keeps its own residual.

    ``compute_fraction`` = computed denoiser calls / denoiser calls.

    Reference defaults: Wan2.1 ``threshold=0.05, warmup_steps=10``; HunyuanVideo
    ``threshold=0.025, warmup_steps=5`` (the bundled plans carry these).

    Deliberate differences from the reference code:

    - State resets at the start of every call (the reference keeps ``k`` and the last output on
      the class across videos; with ``warmup_steps >= 2`` this changes nothing).
    - Residuals are kept in float32 and the reused output is cast back to the model's output
      dtype, so the pipeline sees the dtype a computed call gives (the reference returns float32).
    - Batched-CFG pipelines (one call holds both branches) take the decision on the whole batch,
      i.e. the mean of both branches' probes; the reference has no batched-CFG model.
    - Only the latent channels count as the input (Wan I2V conditioning channels are ignored, as
      the reference does by taking the input before concatenation); output channels beyond the
      input's (DiT's learned variance) are cached raw.
    - A zero denominator in ``k`` or in the normaliser forces a compute (the reference divides
      by zero and ends up computing too).
    """

    name: ClassVar[str] = "easycache"
    granularity: ClassVar[str] = "step"
    kernels: ClassVar[tuple[str, ...]] = ("l1_change", "add_residual")

    threshold: float = option(
        0.05, "tau: accumulated predicted change below which a step is reused", min=0.0
    )
    warmup_steps: int = option(10, "R: the first R steps are always computed", min=0)

    @classmethod
    def identity(cls) -> EasyCacheConfig:
        return cls(threshold=0.0)

    @classmethod
    def aggressive(cls) -> EasyCacheConfig:
        return cls(threshold=1e6, warmup_steps=2)

    def not_supported_reasons(self, target: Target) -> list[str]:
        if target.scheduler is None and target.num_steps_hint is None:
            return [
                "a bare denoiser has no scheduler to tell the step count, and EasyCache always "
                "computes the last step: set valid_for.num_inference_steps in the plan"
            ]
        return []


@dataclasses.dataclass
class _Branch:
    residual: torch.Tensor | None = None  # v_c − x_c, float32
    template: Any = None  # output of the last compute (structure to rebuild on reuse)
    channels: int | None = None  # latent channels shared by input and output
    # decision branch only
    prev_input: torch.Tensor | None = None  # x_{i−1}
    anchor_input: torch.Tensor | None = None  # x_{c'}
    prev_output: torch.Tensor | None = None  # v_c
    prev_output_norm: float = 0.0  # mean|v_c|
    k: float | None = None
    acc: float = 0.0
    compute: bool = True
    dx: float | None = None  # this step's mean|x_i − x_{i−1}|, when the decision measured it


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.inf


@register_method(EasyCacheConfig)
def apply(target: Target, cfg: EasyCacheConfig, run: RunState) -> None:
    """Attach EasyCache to the denoiser's forward (the whole-transformer step site)."""
    from diffcache import kernels

    latent_arg, latent_pos = target.adapter.latent_arg, target.latent_index()
    cdim = target.adapter.channel_dim
    module = type(target.denoiser).__name__

    def l1(a: torch.Tensor, b: torch.Tensor) -> list[float]:
        out = kernels.l1_change(a, b, backend=run.kernels).tolist()
        run.stats.kernels["l1_change"] = kernels.last_backend["l1_change"]
        return out

    def latent(x: torch.Tensor, n: int | None) -> torch.Tensor:
        return x if n is None or x.shape[cdim] == n else x.narrow(cdim, 0, n)

    def decide(st: _Branch, x: torch.Tensor, step: int) -> None:
        st.dx = None
        if step < cfg.warmup_steps or run.is_last_step():
            st.compute, st.acc = True, 0.0
        elif st.prev_input is None or st.prev_output is None or st.k is None:
            st.compute = True
        else:
            dx = st.dx = l1(x, st.prev_input)[0]
            st.acc += st.k * _ratio(dx, st.prev_output_norm)
            st.compute = not st.acc < cfg.threshold
            if st.compute:
                st.acc = 0.0

    def reuse(st: _Branch, x: torch.Tensor) -> Any:
        r, dtype = st.residual, sample_of(st.template).dtype
        x_lat, r_lat = latent(x, st.channels), latent(r, st.channels)
        if r_lat is r:
            out = kernels.add_residual(x_lat, r, dtype, backend=run.kernels)
        else:  # extra raw output channels (learned variance) ride along unchanged
            out = r.to(dtype, copy=True)
            latent(out, st.channels).copy_(
                kernels.add_residual(x_lat, r_lat, dtype, backend=run.kernels)
            )
        run.stats.kernels["add_residual"] = kernels.last_backend["add_residual"]
        return rebuild_output(st.template, out)

    def store(st: _Branch, x: torch.Tensor, output: Any, decision: _Branch | None) -> None:
        v = sample_of(output)
        n = min(x.shape[cdim], v.shape[cdim])
        x_lat = latent(x, n)
        r = (
            v.float() - x_lat.float()
            if v.shape == x_lat.shape
            else _partial_residual(v, x_lat, cdim)
        )
        if not math.isfinite(r.sum().item()):  # one reduction; NaN or ±inf anywhere shows here
            raise run.fail(
                RunError(
                    f"easycache: the output of {module} has NaN/inf and would enter the cache "
                    f"({run.where()}); check the model and inputs (dtype overflow?) before caching."
                )
            )
        st.residual, st.template, st.channels = r, output, n
        if decision is None:
            return
        if st.prev_output is not None:
            out_change, st.prev_output_norm, _ = l1(v, st.prev_output)
            if st.anchor_input is not None:
                # after a computed step the anchor is x_{i−1}: the decision already measured it
                consecutive = st.dx is not None and st.anchor_input is st.prev_input
                in_change = st.dx if consecutive else l1(x_lat, st.anchor_input)[0]
                st.k = _ratio(out_change, in_change)
        else:
            st.prev_output_norm = l1(v, v)[1]
        st.prev_output = v.detach().clone()

    def forward(call: Any, *args: Any, **kwargs: Any) -> Any:
        step, branch = run.begin_call()
        x = kwargs[latent_arg] if latent_arg in kwargs else args[latent_pos]
        lead = run.state(_Branch, branch=0)
        st = lead if branch == 0 else run.state(_Branch)
        if (
            st.residual is not None
            and latent(x, st.channels).shape != latent(st.residual, st.channels).shape
        ):
            raise run.fail(
                RunError(
                    f"easycache: {module} input shape changed from "
                    f"{tuple(latent(st.residual, st.channels).shape)} to {tuple(x.shape)} within a "
                    f"run ({run.where()}); generate at one size per call."
                )
            )
        if branch == 0:
            decide(lead, latent(x, lead.channels), step)
        if not lead.compute and st.residual is not None:
            out = reuse(st, x)
            computed = False
        else:
            out = call(*args, **kwargs)
            store(st, x, out, lead if branch == 0 else None)
            computed = True
        if branch == 0:  # a private copy: pipelines may reuse the input buffer
            lead.prev_input = latent(x, lead.channels).detach().clone()
            if computed:
                lead.anchor_input = lead.prev_input
        run.record(float(computed))
        return out

    hooks.attach(target.denoiser, "forward", HOOK, forward)


def _partial_residual(v: torch.Tensor, x_lat: torch.Tensor, cdim: int) -> torch.Tensor:
    """Residual on the channels shared with the input; extra output channels stay raw."""
    r = v.float().clone()
    r.narrow(cdim, 0, x_lat.shape[cdim]).sub_(x_lat.float())
    return r
