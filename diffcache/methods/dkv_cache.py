"""dKV-Cache (Ma et al., "dKV-Cache: The Cache for Diffusion Language Models", arXiv
2505.15781, NeurIPS 2025; horseee/dKV-Cache): delayed K/V caching of decoded tokens.

A token's K/V is reused only once it is decoded, and only one step later: a token committed at
step t is recomputed at step t+1 with its real id, stored, and served from the store from step
t+2 until the next refresh (research/dlm.md §2.2). Variants (``variant``):

- ``decode``: at block step i (LLaDA: the cache is reset at each block; Dream: no blocks)
  steps i = 0, every ``refresh_every``-th step and, for LLaDA, i = 1 are full forwards; any
  other step recomputes exactly the positions not decoded before the previous step.
- ``prefill``: the prompt's K/V from step 0 are kept for the whole generation; every later step
  recomputes the generated region (and, for Dream, the last prompt position).
- ``pd``: the prompt as in ``prefill`` plus ``decode``'s delayed cache over the generated region,
  refreshed (generated region only) every ``refresh_every`` steps.

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
from typing import ClassVar, Literal

import torch

from diffcache.adapter import Target
from diffcache.kv.method import attach_policy
from diffcache.kv.policy import DecodeState, Policy, StepPlan, union_rows
from diffcache.methods.base import MethodConfig, option
from diffcache.registry import register_method
from diffcache.session import Session

FAMILIES = ("llada", "dream")


@dataclasses.dataclass(frozen=True)
class DKVCacheConfig(MethodConfig):
    """Options of dKV-Cache (defaults: LLaDA Decode of the paper's Table 1)."""

    name: ClassVar[str] = "dkv_cache"
    granularity: ClassVar[str] = "kv"
    kind: ClassVar[str] = "token_layer"
    kernels: ClassVar[tuple[str, ...]] = ("kv_scatter",)

    variant: Literal["decode", "prefill", "pd"] = option("decode", "which tokens are cached")
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

    def not_supported_reasons(self, target: Target) -> list[str]:
        if target.adapter.name not in FAMILIES:
            return [
                f"dkv_cache runs on {' and '.join(FAMILIES)} pipelines, not {target.adapter.name}"
            ]
        return []


class DKVPolicy(Policy):
    name = "dkv_cache"
    uses_store = True

    def __init__(self, cfg: DKVCacheConfig, family: str) -> None:
        super().__init__()
        self.cfg, self.family = cfg, family

    def _refresh(self, state: DecodeState) -> bool:
        i = state.block_step if self.family == "llada" else state.step
        return i == 0 or i % self.cfg.refresh_every == 0 or (self.family == "llada" and i == 1)

    def cacheable(self, state: DecodeState) -> torch.Tensor:
        """[B, L] positions whose stored K/V this step may use (decoded before the last step)."""
        decoded = state.decoded_before(state.step - 1)
        if state.logit_shift == 0 or self.cfg.shift == "right":
            return decoded
        after = torch.zeros_like(decoded)
        after[:, :-1] = decoded[:, 1:]
        return after & decoded if self.cfg.shift == "un_right" else after

    def plan(self, state: DecodeState, targets: torch.Tensor) -> StepPlan:
        variant, p = self.cfg.variant, state.prompt_len - state.logit_shift
        if state.step == 0 or (variant == "decode" and self._refresh(state)):
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


@register_method(DKVCacheConfig)
def apply(session: Session, cfg: DKVCacheConfig) -> None:
    family = session.target.adapter.name
    attach_policy(session, cfg.name, lambda: DKVPolicy(cfg, family))
