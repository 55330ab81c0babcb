"""Fast-dLLM (Wu et al., "Fast-dLLM: Training-free Acceleration of Diffusion LLM by Enabling KV
Cache and Parallel Decoding", arXiv 2505.22618; NVlabs/Fast-dLLM): the baseline every text
diffusion cache compares against.

Rules (research/dlm.md §2.1): at the start of each semi-autoregressive block one full forward
refreshes every position's K/V and its logits decode the block's first step. Inside the block,
``prefix`` mode recomputes the block and everything after it and reuses the prefix's K/V;
``dual`` mode recomputes only the block and reuses the prefix's and the masked suffix's K/V.
Confidence-aware parallel decoding commits, per step, the most confident masked token and every
other one with confidence >= ``threshold`` (0.9 in all the paper's scripts) — or the factor rule
with ``factor`` — until the block is done.

Differences from the reference code: K/V are stored after RoPE by absolute position and written
in place (the reference keeps pre-RoPE keys and re-rotates them every step); every batch row has
its own positions and masks (the reference's dual cache flattens the batch, PR #17; its Dream path
overwrites left-padding positions). For Dream, whose logits are shifted, the reference commits the
block's first token at the refresh step by argmax; we recompute the row before the block instead,
so that position is scored like the others (``reference_compat: true`` is not offered for this:
it changes the decoding rule, not the cache). ``refresh_every`` adds refreshes inside a block
(None: only at block starts, as the paper); 1 recomputes everything (identity).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import torch

from diffcache.adapter import Target
from diffcache.kv.method import attach_policy
from diffcache.kv.policy import Candidates, DecodeState, Policy, StepPlan
from diffcache.methods.base import Calibrated, PositionKVConfig, option, tune_knob
from diffcache.pipelines.sampling import rules
from diffcache.registry import register_method
from diffcache.session import Session


@dataclasses.dataclass(frozen=True)
class FastDLLMConfig(PositionKVConfig):
    """Options of Fast-dLLM's prefix / dual cache and parallel decoding."""

    name: ClassVar[str] = "fast_dllm"

    mode: Literal["prefix", "dual"] = option(
        "prefix", "prefix: reuse K/V before the block; dual: also after it"
    )
    threshold: float | None = option(
        0.9,
        "parallel decoding: commit every candidate this confident (null: the sampler's count)",
        min=0.0,
        max=1.0,
    )
    factor: float | None = option(
        None, "parallel decoding by the factor rule instead of the threshold", min=0.0
    )
    refresh_every: int | None = option(
        None, "also refresh every N steps inside a block (null: block starts only)", min=1
    )

    @classmethod
    def identity(cls) -> FastDLLMConfig:
        return cls(threshold=None, refresh_every=1)

    @classmethod
    def aggressive(cls) -> FastDLLMConfig:
        return cls(mode="dual", threshold=0.5)

    def calibrate(self, profiling: Any) -> Calibrated:
        """Keep the options, or with a compute target pick the parallel-decoding knob: the
        largest ``threshold`` (or, with ``factor`` set, the smallest factor) whose calibration
        runs compute at most that fraction."""
        if self.factor is not None:
            return tune_knob(self, profiling, "factor", lo=1e-2, hi=1e2)
        return tune_knob(self, profiling, "threshold", 0.05, 1.0, rising=True, near_one=True)

    def own_reasons(self, target: Target) -> list[str]:
        if self.threshold is not None and self.factor is not None:
            return ["fast_dllm: give threshold or factor, not both"]
        return []


class FastDLLMPolicy(Policy):
    name = "fast_dllm"
    uses_store = True

    def __init__(self, cfg: FastDLLMConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def _parallel(self) -> bool:
        """The plan sets a parallel-decoding rule (else the request's rule decodes)."""
        return self.cfg.threshold is not None or self.cfg.factor is not None

    def block_done(self, state: DecodeState) -> bool:
        """A parallel rule runs a block until it has no masks left."""
        return False if self._parallel() else super().block_done(state)

    def commit(self, state: DecodeState, candidates: Candidates) -> torch.Tensor:
        """The plan's threshold or factor rule (replacing the request's), else the request's."""
        if not self._parallel():
            return super().commit(state, candidates)
        c, cfg = candidates, self.cfg
        return rules.commit_parallel(c.confidence, c.valid, cfg.threshold, cfg.factor)

    def plan(self, state: DecodeState, targets: torch.Tensor) -> StepPlan:
        i, every = state.block_step, self.cfg.refresh_every
        if i == 0 or (every is not None and i % every == 0):
            self.trace("refresh", "computed", block_step=i, refresh_every=every)
            return StepPlan(rows=None, targets=targets)
        start, end = state.block
        lo = max(start - state.logit_shift, 0)
        hi = end if self.cfg.mode == "dual" else state.length
        self.trace("refresh", "partial", block_step=i, refresh_every=every, rows=[lo, hi])
        rows = torch.arange(lo, hi, device=state.ids.device).expand(state.ids.shape[0], -1)
        return StepPlan(rows=rows, targets=targets)

    def step_end(self, state: DecodeState, plan: StepPlan, committed: torch.Tensor) -> None:
        """Trace the parallel-decoding decision: each candidate's confidence and the rule."""
        if not self.tracing or state.confidence is None:
            return
        batch = state.confidence.shape[0]
        valid = state.confidence > float("-inf")  # the real candidates of each batch row
        rows = list(zip(plan.targets[:batch], state.confidence, valid, strict=True))
        self.trace(
            "parallel_decode",
            "committed",
            threshold=self.cfg.threshold,
            factor=self.cfg.factor,
            candidates=[t[v] for t, _, v in rows],
            confidence=[c[v] for _, c, v in rows],
        )


@register_method(FastDLLMConfig)
def apply(session: Session, cfg: FastDLLMConfig) -> None:
    attach_policy(session, cfg.name, lambda: FastDLLMPolicy(cfg))
