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

from diffcache.adapter import Capabilities
from diffcache.compiled import unwrap
from diffcache.distributed import context_parallel_group, mean_across
from diffcache.errors import RunError
from diffcache.fewstep import StepLimit
from diffcache.methods.base import Calibrated, MethodConfig, option, tune_knob
from diffcache.output import rebuild_output, sample_of, split_residual, with_extra
from diffcache.registry import register_method
from diffcache.session import Call, Session


@dataclasses.dataclass(frozen=True)
class EasyCacheConfig(MethodConfig):
    """EasyCache (arXiv 2507.02860): skip a whole denoiser call and return
    ``x_i + (v_c − x_c)``, the transformation vector of the last computed step ``c``.

    Rules, as the reference code implements them (``mean|·|`` = mean absolute value):

    - Steps ``i < warmup_steps`` and the last step are always computed (accumulator reset).
    - Otherwise, on the decision branch: ``Δx_i = mean|x_i − x_{i−1}|`` (``x_{i−1}`` is the previous
      call's input, computed or skipped), ``E += k · Δx_i / mean|v_c|`` and the call reuses iff
      ``E < threshold``; on compute ``E = 0``. Before ``k`` exists the call is computed.
    - After each computed call ``i``: ``k = mean|v_i − v_c'| / mean|x_i − x_c'|`` with ``c'`` the
      previous computed call.
    - CFG: the decision is taken on the first denoiser call of the step (cond, as the reference's
      "even" call) and applied to every branch of that step; each branch keeps its own residual.

    ``compute_fraction`` = computed denoiser calls / denoiser calls.

    Reference defaults: Wan2.1 ``threshold=0.05, warmup_steps=10``; HunyuanVideo
    ``threshold=0.025, warmup_steps=5`` (the bundled plans carry these). ``diffcache profile
    --method easycache --target-compute F`` tunes ``threshold`` on calibration prompts.

    Deliberate differences from the reference code:

    - State is per call (the reference keeps ``k`` and the last output on the class across
      videos; with ``warmup_steps >= 2`` this changes nothing).
    - Residuals are kept in float32 and the reused output is cast back to the model's output
      dtype, so the pipeline sees the dtype a computed call gives (the reference returns float32).
    - Batched-CFG pipelines (one call holds both branches) take the decision on the whole batch,
      i.e. the mean of both branches' probes; the reference has no batched-CFG model.
    - Only the latent channels count as the input (Wan I2V conditioning channels are ignored, as
      the reference does by taking the input before concatenation); output channels beyond the
      input's (DiT's learned variance) are cached raw.
    - A zero denominator in ``k`` or in the normaliser forces a compute (the reference divides
      by zero and ends up computing too).
    - Under diffusers' context parallelism every mean above is taken over all ranks' shares (sums
      and element counts all-reduced over the CP group) before the decision, so every rank
      reuses the same steps.
    - Each expert of a multi-expert pipeline (Wan2.2) keeps its own state; a second-order
      scheduler's sub-steps are decided like steps (warm-up and last step count user steps).
    """

    name: ClassVar[str] = "easycache"
    granularity: ClassVar[str] = "step"
    needs: ClassVar[Capabilities] = Capabilities(("step",), denoiser="latent")
    kernels: ClassVar[tuple[str, ...]] = ("l1_change", "add_residual")

    threshold: float = option(
        0.05, "tau: accumulated predicted change below which a step is reused", min=0.0
    )
    warmup_steps: int = option(10, "R: the first R steps are always computed", min=0)

    @classmethod
    def identity(cls) -> EasyCacheConfig:
        return cls(threshold=0.0, warmup_steps=0)

    @classmethod
    def aggressive(cls) -> EasyCacheConfig:
        return cls(threshold=1e6, warmup_steps=2)

    def own_reasons(self, target: Any) -> list[str]:
        if target.driver == "timestep" and "num_inference_steps" not in target.valid_for:
            return [
                "a bare denoiser has no scheduler to tell the step count, and EasyCache always "
                "computes the last step: set valid_for.num_inference_steps in the plan"
            ]
        return []

    def step_limit(self, steps: int) -> StepLimit | None:
        """The first reusable step is the warm-up's end, and never before step 2 (``k`` needs
        two computed steps); the last step computes: so ``max(R, 2) + 2`` steps at least."""
        least = max(self.warmup_steps, 2) + 2
        if steps >= least:
            return None
        fix = steps - 2 if steps >= 4 else None
        return StepLimit(least, "warmup_steps", self.warmup_steps, fix)

    def calibrate(self, profiling: Any) -> Calibrated:
        """Keep the options, or with a compute target pick the smallest ``threshold`` whose
        calibration runs compute at most that fraction (bisection on a log scale)."""
        return tune_knob(self, profiling, "threshold", lo=1e-4, hi=1e3)


@dataclasses.dataclass
class _Branch:
    """State of one (expert, branch); the decision fields are used on branch 0 only."""

    residual: torch.Tensor | None = None  # v_c − x_c on the latent channels, float32
    extra: torch.Tensor | None = None  # output channels beyond the input's, raw (DiT's sigma)
    template: Any = None  # output of the last compute (structure to rebuild on reuse)
    shape: tuple[int, ...] | None = None  # latent input shape of the run
    prev_input: torch.Tensor | None = None  # x_{i−1}
    anchor_input: torch.Tensor | None = None  # x_{c'}
    prev_output: torch.Tensor | None = None  # v_c
    prev_output_norm: float = 0.0  # mean|v_c|
    k: float | None = None
    acc: float = 0.0
    compute: bool = True
    dx: float | None = None  # this call's mean|x_i − x_{i−1}|, when the decision measured it


class _EasyCache:
    """The rule above, as small functions over one branch's state."""

    def __init__(self, session: Session, cfg: EasyCacheConfig) -> None:
        t = session.target
        self.cfg, self.run, self.kernel = cfg, session.run, session.kernel
        self.latent_arg, self.latent_pos = t.adapter.latent_arg, t.arg_index(t.adapter.latent_arg)
        self.cdim = t.adapter.channel_dim
        self.denoiser = unwrap(t.denoiser)  # compiled whole: the module its hooks live on
        self.module = type(self.denoiser).__name__
        self.channels: int | None = None  # latent channels shared by input and output

    def l1(self, a: torch.Tensor, b: torch.Tensor) -> list[float]:
        """``l1_change``'s three means; under context parallelism, over every rank's share, so
        that all ranks take the same decision."""
        from diffcache import kernels

        means = self.kernel(kernels.l1_change, a, b)
        return mean_across(context_parallel_group(self.denoiser), means, a.numel()).tolist()

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        n = self.channels
        return x if n is None or x.shape[self.cdim] == n else x.narrow(self.cdim, 0, n)

    def decide(self, call: Call, lead: _Branch, x: torch.Tensor) -> None:
        """Set ``lead.compute`` for this step; the trace gets the rule's reason or its values
        (``acc``: the accumulated change compared with ``threshold``, before any reset)."""
        lead.dx = None
        if self.run.step < self.cfg.warmup_steps or self.run.is_last_step():
            lead.compute, lead.acc = True, 0.0
            call.explain(reason="warmup" if self.run.step < self.cfg.warmup_steps else "last")
        elif lead.prev_input is None or lead.prev_output is None or lead.k is None:
            lead.compute = True
            call.explain(reason="no k")
        else:
            dx = lead.dx = self.l1(x, lead.prev_input)[0]
            lead.acc += lead.k * _ratio(dx, lead.prev_output_norm)
            lead.compute = not lead.acc < self.cfg.threshold
            call.explain(
                dx=dx,
                k=lead.k,
                norm=lead.prev_output_norm,
                acc=lead.acc,
                threshold=self.cfg.threshold,
            )
            if lead.compute:
                lead.acc = 0.0

    def reuse(self, st: _Branch, x: torch.Tensor) -> Any:
        from diffcache import kernels

        dtype = sample_of(st.template).dtype
        out = self.kernel(kernels.add_residual, x, st.residual, dtype)
        return rebuild_output(st.template, with_extra(out, st.extra, self.cdim))

    def store(self, st: _Branch, x: torch.Tensor, output: Any, lead: bool) -> None:
        v = sample_of(output)
        st.residual, st.extra = split_residual(x, v, self.cdim)
        st.template, st.shape = output, x.shape
        if lead:  # the measurements below also see any NaN / inf in the output
            if st.prev_output is not None:
                out_change, norm, _ = self.l1(v, st.prev_output)
                if st.anchor_input is not None:
                    # after a computed step the anchor is x_{i−1}: the decision measured it
                    consecutive = st.dx is not None and st.anchor_input is st.prev_input
                    in_change = st.dx if consecutive else self.l1(x, st.anchor_input)[0]
                    st.k = _ratio(out_change, in_change)
            else:
                norm = self.l1(v, v)[1]
            st.prev_output_norm = norm
            st.prev_output = v.detach().clone()
        else:
            norm = st.residual.sum().item()
        if not math.isfinite(norm):
            raise self.run.fail(
                RunError(
                    f"easycache: the output of {self.module} has NaN/inf and would enter the "
                    f"cache ({self.run.where()}); check the model and inputs (dtype overflow?)."
                )
            )

    def __call__(self, call: Call) -> Any:
        if self.cfg.threshold == 0:  # E < 0 never holds: nothing can be reused, nothing to measure
            call.explain(reason="threshold 0")
            return call.compute()
        x = self.latent(call.arg(self.latent_arg, self.latent_pos))
        lead = call.state(_Branch, branch=0)
        st = lead if call.branch == 0 else call.state(_Branch)
        if st.shape is not None and x.shape != st.shape:
            raise self.run.fail(
                RunError(
                    f"easycache: {self.module} input shape changed from {tuple(st.shape)} to "
                    f"{tuple(x.shape)} within a run ({self.run.where()}); generate at one size "
                    "per call."
                )
            )
        if call.branch == 0:
            self.decide(call, lead, x)
        if not lead.compute and st.residual is not None:
            out = self.reuse(st, x)
        else:
            out = call.compute()
            if self.channels is None:  # the first compute tells the latent channels
                self.channels = min(x.shape[self.cdim], sample_of(out).shape[self.cdim])
                x = self.latent(x)
            self.store(st, x, out, lead=call.branch == 0)
            if call.branch == 0:  # k as measured after this compute, for the next decisions
                call.explain(new_k=lead.k)
        if call.branch == 0:  # a private copy: pipelines may reuse the input buffer
            lead.prev_input = x.detach().clone()
            if call.computed:
                lead.anchor_input = lead.prev_input
        return out


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.inf


@register_method(EasyCacheConfig)
def apply(session: Session, cfg: EasyCacheConfig) -> None:
    """Answer every denoiser call (the whole-step site) with the EasyCache rule."""
    session.on_step(_EasyCache(session, cfg))
