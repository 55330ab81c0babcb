"""d²Cache (Jiang et al., "d²Cache: Accelerating Diffusion-Based LLMs via Dual Adaptive
Caching", arXiv 2509.23094, ICLR 2026; Kamichanw/d2Cache): per-token adaptive K/V refresh.

Rules (research/dlm.md §2.4): step 0 is a full forward. Every later step recomputes only its query
set, chosen at the end of the previous step as the union of
1. *certainty prior*: the ``current_k`` masked positions with the highest confidence × certainty
   density (a Gaussian-weighted share of decoded neighbours, σ = ``sigma``), searched from the
   block start up to the block boundary that holds ``current_k`` masks, current block preferred;
2. the tokens decoded at that step (they turn from mask to real tokens);
3. *attention rollout*: the smallest set of the remaining positions holding ``rollout_p`` of the
   rollout importance (column sums of the product over layers of (A + I)/2 restricted to the
   recomputed rows, heads averaged);
4. with ``inflate_w`` > 0, every gap of at most that length between two selected positions.
There is no periodic refresh. Only recomputed masked positions get logits, and decoding scores
them by confidence × certainty density of width ``decode_sigma`` (the reference's separate
``generation.sigma``, which its ``gen_args.py`` sets to 10 with this cache; 0 decodes by
confidence alone, as its docs advise with parallel decoding).

Differences from the reference code: the rollout's column sums are computed by an exact reverse
recursion over the recomputed rows, O(layers · |Q| · L) instead of dense L×L×L products, from
the layer's attention probabilities in fp32. The reference's stage-1 confidence is frozen at step
0 (an operator-precedence slip); we update it with each recomputed mask's latest confidence, and
``reference_compat: true`` keeps it frozen. Batch rows have ragged query sets (the reference tops
rows up with extra tokens, which makes a row depend on its batch-mates).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from diffcache.adapter import Target
from diffcache.kv import prior
from diffcache.kv.method import attach_policy
from diffcache.kv.policy import DecodeState, LayerView, Policy, StepPlan, pad_rows, row_sets
from diffcache.methods.base import Calibrated, MethodConfig, option, tune_knob
from diffcache.registry import register_method
from diffcache.session import Session

FAMILIES = ("llada", "dream")


@dataclasses.dataclass(frozen=True)
class D2CacheConfig(MethodConfig):
    """Options of d²Cache (defaults: the reference's configs/cache/d2cache.yaml)."""

    name: ClassVar[str] = "d2cache"
    granularity: ClassVar[str] = "kv"
    kind: ClassVar[str] = "token_layer"
    kernels: ClassVar[tuple[str, ...]] = ("kv_scatter", "token_confidence")

    current_k: int = option(32, "masked positions chosen by the certainty prior per step", min=1)
    rollout_p: float = option(0.1, "share of the rollout importance recomputed", min=0.0, max=1.0)
    sigma: float = option(
        10.0, "certainty density width of the stage-1 selection (0: confidence only)", min=0.0
    )
    decode_sigma: float = option(
        10.0, "certainty density width of the decoding prior (0: plain confidence)", min=0.0
    )
    inflate_w: int = option(
        0, "also recompute gaps of at most this length between chosen rows", min=0
    )
    reference_compat: bool = option(
        False, "freeze stage-1 confidence at step 0, as the reference code"
    )

    @classmethod
    def identity(cls) -> D2CacheConfig:
        return cls(
            current_k=1_000_000, rollout_p=1.0, sigma=0.0, decode_sigma=0.0, inflate_w=1_000_000
        )

    @classmethod
    def aggressive(cls) -> D2CacheConfig:
        return cls(current_k=1, rollout_p=0.0)

    def calibrate(self, profiling: Any) -> Calibrated:
        """Keep the options, or with a compute target pick the largest ``rollout_p`` (the
        share of rollout importance recomputed) whose calibration runs compute at most that
        fraction."""
        return tune_knob(self, profiling, "rollout_p", lo=1e-3, hi=1.0, rising=True)

    def not_supported_reasons(self, target: Target) -> list[str]:
        if target.adapter.name not in FAMILIES:
            return [
                f"d2cache runs on {' and '.join(FAMILIES)} pipelines, not {target.adapter.name}"
            ]
        return []


class D2Policy(Policy):
    name = "d2cache"
    uses_store = True

    def __init__(self, cfg: D2CacheConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wants_layers = cfg.rollout_p > 0
        self.next: torch.Tensor | None = None  # [B, L] query set of the next step
        self.conf: torch.Tensor | None = None  # [B, L] stage-1 confidence of masked positions
        self.attn: list[tuple[torch.Tensor | None, torch.Tensor]] = []  # per layer: rows, probs
        self.key_mask: torch.Tensor | None = None  # [B, L] False at padding

    def decoding(self, settings: dict[str, Any]) -> dict[str, Any]:
        return {**settings, "prior_sigma": self.cfg.decode_sigma}

    def plan(self, state: DecodeState, targets: torch.Tensor) -> StepPlan:
        self.attn = []
        if self.next is None:
            return StepPlan(rows=None, targets=targets)
        q = self.next
        shift = state.logit_shift
        src = (targets - shift).clamp(min=0)
        keep = q.gather(1, src)  # candidates whose logit row is recomputed
        kept = [t[k] for t, k in zip(targets, keep, strict=True)]
        kept = [k if len(k) else t[:1] for k, t in zip(kept, targets, strict=True)]
        narrowed, _ = pad_rows(kept)
        need = q.clone()
        need.scatter_(1, (narrowed - shift).clamp(min=0), True)
        rows, counts = pad_rows(row_sets(need))
        return StepPlan(rows=rows, targets=narrowed, counts=counts)

    def layer_end(self, layer: int, view: LayerView) -> bool:
        self.attn.append((view.rows, view.probs(view.q).mean(dim=1)))
        self.key_mask = view.key_mask
        return False

    def step_end(self, state: DecodeState, plan: StepPlan, committed: torch.Tensor) -> None:
        b, length = state.ids.shape
        masked = state.masked
        self._update_conf(state, plan)
        q = self._stage1(state, masked)
        q |= committed  # decoded now: recompute once with the real token
        if self.cfg.rollout_p > 0 and self.attn:
            importance = self._rollout(b, length, state.ids.device)
            allowed = ~q if self.key_mask is None else ~q & self.key_mask
            q |= prior.nucleus_select(importance, self.cfg.rollout_p, allowed)
        if self.cfg.inflate_w:
            q = prior.inflate(q, self.cfg.inflate_w)
        self.next = q

    def _update_conf(self, state: DecodeState, plan: StepPlan) -> None:
        conf = state.confidence
        if conf is None:
            return
        if self.conf is None:
            self.conf = torch.zeros(state.ids.shape, dtype=torch.float64, device=state.ids.device)
        elif self.cfg.reference_compat:
            return
        targets = plan.targets[: conf.shape[0]]
        finite = torch.isfinite(conf)
        value = torch.where(finite, conf.double(), self.conf[: conf.shape[0]].gather(1, targets))
        self.conf[: conf.shape[0]].scatter_(1, targets, value)
        if self.conf.shape[0] > conf.shape[0]:  # CFG rows share the real rows' confidence
            self.conf[conf.shape[0] :] = self.conf[: conf.shape[0]]

    def _stage1(self, state: DecodeState, masked: torch.Tensor) -> torch.Tensor:
        """Masked positions chosen by confidence × certainty density (research §2.4.3)."""
        p, (start, end) = state.prompt_len, state.block
        gen_masked = masked[:, p:]
        density = prior.certainty_density(~gen_masked, self.cfg.sigma) if self.cfg.sigma else 1.0
        conf = (
            self.conf[:, p:]
            if self.conf is not None
            else torch.ones_like(gen_masked, dtype=torch.float64)
        )
        scores = conf * density
        block = end - start
        col = torch.arange(gen_masked.shape[1], device=masked.device)
        in_block = (col >= start - p) & (col < end - p)
        scores = scores + in_block * scores.max(dim=1, keepdim=True).values
        k = self.cfg.current_k
        reached = gen_masked.long().cumsum(1) >= k
        first = torch.where(reached.any(1), reached.long().argmax(1), gen_masked.shape[1] - 1)
        search_end = ((first - (start - p)) // block + 1) * block + (start - p)
        allowed = gen_masked & (col[None] >= start - p) & (col[None] < search_end[:, None])
        scores = scores.masked_fill(~allowed, float("-inf"))
        top = scores.topk(min(k, scores.shape[1]), dim=1)
        chosen = torch.zeros_like(gen_masked)
        chosen.scatter_(1, top.indices, torch.isfinite(top.values))
        out = torch.zeros_like(masked)
        out[:, p:] = chosen
        if state.logit_shift:  # Dream: a mask's logits come from the row before it
            out[:, :-1] |= out[:, 1:].clone()
        return out

    def _rollout(self, b: int, length: int, device: torch.device) -> torch.Tensor:
        """Column sums of the attention rollout, by the reverse recursion over layers."""
        v = torch.ones(b, length, device=device)  # padding neither gives nor gets importance
        if self.key_mask is not None:
            v = v * self.key_mask
        for rows, probs in reversed(self.attn):
            if rows is None:
                rows = torch.arange(length, device=device).expand(b, -1)
            weight = v.gather(1, rows) / 2
            # duplicated padding rows must count once: keep the first occurrence only
            first = torch.full((b, length), rows.shape[1], device=device, dtype=torch.long)
            first.scatter_reduce_(
                1, rows, torch.arange(rows.shape[1], device=device).expand_as(rows), "amin"
            )
            once = first.gather(1, rows) == torch.arange(rows.shape[1], device=device)
            weight = weight * once
            v = v - torch.zeros_like(v).scatter_add(1, rows, weight)
            v = v + (weight[..., None] * probs).sum(1)
        return v


@register_method(D2CacheConfig)
def apply(session: Session, cfg: D2CacheConfig) -> None:
    attach_policy(session, cfg.name, lambda: D2Policy(cfg))
