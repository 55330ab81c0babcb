"""dKV-Cache (Ma et al., "dKV-Cache: The Cache for Diffusion Language Models", arXiv
2505.15781, NeurIPS 2025; horseee/dKV-Cache): delayed K/V caching of decoded tokens.

A token's K/V is reused only once it is decoded, and only one step later: a token committed at
step t is recomputed at step t+1 with its real id, stored, and served from the store from step
t+2 until the next refresh (research/dlm.md §2.2). Variants (``variant``):

- ``decode``: steps i = 0, every ``refresh_every``-th step and, where the model's sampler is
  semi-autoregressive, i = 1 are full forwards; any other step recomputes exactly the positions
  not decoded before the previous step. A semi-autoregressive sampler (the adapter's KV seam
  says so: LLaDA's) counts i per block, as the reference resets its cache at each block, whose
  step 0 builds none; otherwise (Dream's sampler, blocks or not) i counts the generation's
  steps, as the reference keeps one cache over the answer.
- ``prefill``: the prompt's K/V from step 0 are kept for the whole generation; every later step
  recomputes the generated region (and, for Dream, the last prompt position).
- ``pd``: the prompt as in ``prefill`` plus ``decode``'s delayed cache over the generated region,
  refreshed (generated region only) every ``refresh_every`` steps.
- ``greedy``: the block's decoding order is drawn at random once per block (random remasking,
  as the reference requires: a sampler without it is refused), so the tokens of the next step
  are known: a cached step recomputes only the tokens decoded at the last step, the ones
  scheduled now and, for each scheduled one, its ``window`` nearest still-masked neighbours
  (alternately left and right); every ``refresh_every``-th block step is a full forward
  (paper: 2, window 4).

Dream's logits are shifted (p−1 predicts p), so a Dream position is cacheable when the token
after it is decoded (``shift: un``, the reference default; ``un_right`` needs both, ``right``
ignores the shift); the rows that give the logits of this step's candidates are always
recomputed.

Differences from the reference code: K/V are stored after RoPE by absolute position and rows are
written in place (the reference re-sorts ``[fresh; cached]`` per step and keeps pre-RoPE keys);
batch rows may decode different numbers of tokens (the reference's ``view(B, -1, D)`` needs equal
counts); CFG works (the reference raises for ``cfg_scale > 0``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import torch

from diffcache.adapter import KVSeam, Target
from diffcache.errors import DiffCacheError
from diffcache.kv.method import attach_policy
from diffcache.kv.policy import (
    Candidates,
    DecodeState,
    Policy,
    StepPlan,
    pad_rows,
    row_sets,
    union_rows,
)
from diffcache.methods.base import Calibrated, PositionKVConfig, option, tune_knob
from diffcache.pipelines.sampling.llada import num_transfer_tokens
from diffcache.pipelines.sampling.random import uniform
from diffcache.registry import register_method
from diffcache.session import Session


@dataclasses.dataclass(frozen=True)
class DKVCacheConfig(PositionKVConfig):
    """Options of dKV-Cache (defaults: LLaDA Decode of the paper's Table 1)."""

    name: ClassVar[str] = "dkv_cache"

    variant: Literal["decode", "prefill", "pd", "greedy"] = option(
        "decode", "which tokens are cached"
    )
    window: int = option(4, "greedy: masked neighbours recomputed per scheduled token", min=0)
    refresh_every: int = option(
        8, "full refresh every N steps (decode, pd; paper: LLaDA 8, Dream 4)", min=1
    )
    shift: Literal["un", "un_right", "right"] = option(
        "un", "Dream: when a position is cacheable (see docstring)"
    )

    @classmethod
    def identity(cls) -> DKVCacheConfig:
        return cls(refresh_every=1)

    @classmethod
    def aggressive(cls) -> DKVCacheConfig:
        return cls(variant="pd", refresh_every=1000)

    def calibrate(self, profiling: Any) -> Calibrated:
        """Keep the options, or with a compute target pick the smallest ``refresh_every``
        (decode, pd) or the largest greedy ``window`` whose calibration runs compute at most
        that fraction; prefill has no knob (its cache is fixed)."""
        if profiling.target_compute is not None and self.variant == "prefill":
            raise DiffCacheError(
                "dkv_cache variant prefill has no knob to meet a compute target; "
                "use decode or pd (refresh_every) or greedy (window)"
            )
        if self.variant == "greedy":
            return tune_knob(self, profiling, "window", 1, 256, rising=True, integer=True)
        return tune_knob(self, profiling, "refresh_every", 1, 1024, integer=True)

    def own_reasons(self, target: Target) -> list[str]:
        adapter = target.adapter
        if self.variant == "greedy" and not (adapter.kv and adapter.kv.random_remasking):
            return [
                "dkv_cache variant greedy needs a sampler with random remasking (a fixed "
                f"count per step in a drawn order); {adapter.name}'s sampler has none"
            ]
        return []


class DKVPolicy(Policy):
    name = "dkv_cache"
    uses_store = True

    def __init__(self, cfg: DKVCacheConfig, seam: KVSeam) -> None:
        super().__init__()
        self.cfg, self.seam = cfg, seam
        self.rank: torch.Tensor | None = None  # greedy: [B, L] decoding order in the block

    def decoding(self, settings: dict[str, Any]) -> dict[str, Any]:
        if self.cfg.variant != "greedy":
            return settings
        return {**settings, "remasking": "random", "threshold": None, "factor": None}

    def block_start(self, state: DecodeState) -> None:
        if self.cfg.variant == "greedy":
            start, end = state.block
            draw = uniform((state.ids.shape[0], end - start), state.generator, state.ids.device)
            self.rank = torch.full(state.ids.shape, float("inf"), device=state.ids.device)
            self.rank[:, start:end] = draw.argsort(dim=-1).argsort(dim=-1).to(self.rank.dtype)

    def commit(self, state: DecodeState, candidates: Candidates) -> torch.Tensor:
        """Greedy: the request's count, ranked by the block's drawn order instead of the
        sampler's confidences."""
        if self.rank is None:
            return super().commit(state, candidates)
        c = candidates
        order = -self.rank[: c.targets.shape[0]].gather(1, c.targets).double()
        ranked = dataclasses.replace(c, confidence=order.masked_fill(~c.valid, float("-inf")))
        return super().commit(state, ranked)

    def _scheduled(self, state: DecodeState) -> torch.Tensor:
        """[B, L] the masks this step commits: the next ones in the block's order, as many as
        LLaDA's sampler commits."""
        k = num_transfer_tokens(state.start_masks, state.block_steps)[:, state.block_step]
        rank = self.rank.masked_fill(~state.masked, float("inf"))
        nth = rank.argsort(dim=-1, stable=True).argsort(dim=-1)
        return (nth < k.to(nth.device)[:, None]) & state.masked

    def _greedy(self, state: DecodeState) -> StepPlan:
        scheduled = self._scheduled(state)
        targets, _ = pad_rows(row_sets(scheduled))  # only the scheduled masks need logits
        refresh = state.block_step % self.cfg.refresh_every == 0
        self.trace(
            "refresh",
            "computed" if refresh else "partial",
            position=state.block_step,
            refresh_every=self.cfg.refresh_every,
            scheduled=row_sets(scheduled),
        )
        if refresh:
            return StepPlan(rows=None, targets=targets)
        need = scheduled | (state.decoded_at == state.step - 1)
        need |= neighbours(scheduled, state.masked & ~scheduled, self.cfg.window)
        rows, counts = union_rows(need, targets, state.logit_shift)
        return StepPlan(rows=rows, targets=targets, counts=counts)

    def _position(self, state: DecodeState) -> int:
        """Where this step is in the refresh schedule: its block step (a semi-autoregressive
        sampler, whose cache is reset at each block) or its step."""
        return state.block_step if self.seam.semi_autoregressive else state.step

    def _refresh(self, state: DecodeState) -> bool:
        i = self._position(state)
        first = self.seam.semi_autoregressive and i == 1  # the block's first cache
        return i == 0 or i % self.cfg.refresh_every == 0 or first

    def cacheable(self, state: DecodeState) -> torch.Tensor:
        """[B, L] positions whose stored K/V this step may use (decoded before the last step)."""
        decoded = state.decoded_before(state.step - 1)
        if state.logit_shift == 0 or self.cfg.shift == "right":
            return decoded
        after = torch.zeros_like(decoded)
        after[:, :-1] = decoded[:, 1:]
        return after & decoded if self.cfg.shift == "un_right" else after

    def plan(self, state: DecodeState, targets: torch.Tensor) -> StepPlan:
        if self.cfg.variant == "greedy":
            return self._greedy(state)
        variant, p = self.cfg.variant, state.prompt_len - state.logit_shift
        refresh = self._refresh(state)
        full = state.step == 0 or (variant == "decode" and refresh)
        self.trace(
            "refresh",
            "computed" if full else "partial",
            position=self._position(state),
            refresh_every=self.cfg.refresh_every,
            refresh=refresh and variant in ("decode", "pd"),
        )
        if full:
            return StepPlan(rows=None, targets=targets)
        need = torch.zeros_like(state.ids, dtype=torch.bool)
        if variant == "prefill" or (variant == "pd" and self._refresh(state)):
            need[:, p:] = True
        else:
            need = ~self.cacheable(state)
            if variant == "pd":
                need[:, :p] = False
        rows, counts = union_rows(need, targets, state.logit_shift)
        return StepPlan(rows=rows, targets=targets, counts=counts)


def neighbours(scheduled: torch.Tensor, masked: torch.Tensor, window: int) -> torch.Tensor:
    """[B, L] for each scheduled position, its ``window`` nearest ``masked`` positions, taken
    alternately left and right (the reference's ``find_window_tokens``)."""
    out = torch.zeros_like(masked)
    for b in range(masked.shape[0]):
        free = masked[b].nonzero().flatten().tolist()
        for s in scheduled[b].nonzero().flatten().tolist():
            left = [p for p in reversed(free) if p < s]
            right = [p for p in free if p > s]
            taken: list[int] = []
            while len(taken) < window and (left or right):
                for side in (left, right):
                    if side and len(taken) < window:
                        taken.append(side.pop(0))
            out[b, taken] = True
    return out


@register_method(DKVCacheConfig)
def apply(session: Session, cfg: DKVCacheConfig) -> None:
    seam = session.target.adapter.kv
    attach_policy(session, cfg.name, lambda: DKVPolicy(cfg, seam))
