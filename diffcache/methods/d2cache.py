"""d²Cache (Jiang et al., "d²Cache: Accelerating Diffusion-Based LLMs via Dual Adaptive
Caching", arXiv 2509.23094, ICLR 2026; Kamichanw/d2Cache @72feb60): per-token adaptive K/V
refresh.

Rules (research/dlm.md §2.4): step 0 is a full forward, with logits at every generated position
(their confidences seed stage 1, also beyond the current block). Every later step recomputes
only its query set, chosen at the end of the previous step as the union of
1. *certainty prior*: the ``current_k`` masked positions with the highest confidence × certainty
   density (a Gaussian-weighted share of decoded neighbours, σ = ``sigma``), searched from the
   block start up to the block boundary that holds ``current_k`` masks, current block preferred.
   The confidence is the sampler's, before the decoding prior. For Dream, whose logits of a
   position come from the row before it, the rows are the chosen masks' predecessors (the last
   prompt row when the first generated position is chosen), not the masks;
2. the tokens decoded at that step (they turn from mask to real tokens);
3. *attention rollout*: the smallest set of the remaining positions holding ``rollout_p`` of the
   rollout importance (column sums of the product over layers of (A + I)/2 restricted to the
   recomputed rows, heads averaged);
4. with ``inflate_w`` > 0, every gap of at most that length between two selected positions.
There is no periodic refresh. Only recomputed masked positions get logits, and decoding scores
them by confidence × certainty density of width ``decode_sigma`` (the reference's separate
``generation.sigma``, which its ``gen_args.py`` sets to 10 with this cache; 0 decodes by
confidence alone, as its docs advise with parallel decoding). With tracing, each step records
stage 1's masks and their scores (``stage1``), the rollout's positions and their importance
(``rollout``) and the inflated gaps (``inflate``): the rows of the next step.

Cost: stage 1 alone recomputes up to ``current_k`` masks a step, so while the generation holds
at most ``current_k`` masks (32 by default: every request of 32 tokens or fewer) it recomputes
every remaining mask each step, on average half the generation, plus the decoded tokens and the
rollout's rows. Measured with the bundled options (one block, one token a step, fp32 CPU), the
share of token-layers computed is 0.45 / 0.48 / 0.40 / 0.32 on ``llada-arith`` at 16 / 32 / 64
/ 96 tokens and 0.42 / 0.46 / 0.40 / 0.28 / 0.20 on ``llada-tiny`` at 16 / 32 / 64 / 128 /
256: it pays from about 2 × ``current_k`` tokens on. On these CPU toys the per-step overhead
(rollout, selection) outweighs that saving on ``llada-arith`` up to 96 tokens (0.27 s vs 0.16 s
plain at 16); ``llada-tiny``, whose 126k-token LM head d²Cache applies to the recomputed masks
only, runs faster from 64 tokens (5.2 s vs 9.3 s plain; 54 s vs 176 s at 256).

Each difference from the reference code below is ours by default; ``reference_compat: true``
takes the reference's where it is a bug there (so the reference's decisions are reproduced step
by step: ``tests/dlm/test_d2cache_reference.py``):
- stage 1's confidence is frozen at step 0 in the reference (an operator-precedence slip and a
  write into an indexing copy leave its update a no-op); we update it with each recomputed
  mask's latest confidence. ``reference_compat`` freezes it.
- for Dream, the reference *assigns* the last prompt row from "first generated position chosen"
  after the rollout, which also drops that row when the rollout chose it (its comment says the
  row is to be added); we add it. ``reference_compat`` assigns.
- the reference's certainty density divides by the kernel summed over its whole FFT circle,
  a constant, not by the kernel's mass over the canvas (so a fully decoded region scores below
  1, least at its ends; 5% apart at 16 tokens, σ 10); we divide by the mass. ``reference_compat``
  uses the constant, in stage 1 and in the decoding prior.
- the rollout's column sums come from an exact reverse recursion over the recomputed rows,
  O(layers · |Q| · L) instead of dense L×L×L products, from fp32 attention probabilities.
- the reference decodes among every masked position of the block, those it did not recompute
  with all-zero logits (confidence 1/V, token 0: its restriction to recomputed rows is an
  in-place op on an indexing copy); we decode the recomputed ones only, in both modes.
- batch rows have ragged query sets and their own block bias (the reference tops rows up with
  extra tokens and takes the bias from the whole batch, which makes a row depend on its
  batch-mates).
Taken from the reference as they are: stage 1 scores the raw confidence (ours scored it after
the decoding prior, applying the density twice), Dream's rows are the masks' predecessors only,
and step 0 scores the whole generation (ours scored the first block only, leaving later masks
tied at 0 when the search reaches past the block). One consequence: at step 0 the sampler sees
every generated position as a candidate (only the block's are committed), so with one shared
generator and sampling (temperature > 0) the random stream differs from the plain pipeline's;
per-row generators draw for the block's candidates only, as plain.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from diffcache.kv import union_rows
from diffcache.kv.method import attach_policy
from diffcache.kv.policy import (
    Candidates,
    DecodeState,
    LayerView,
    Policy,
    StepPlan,
    pad_rows,
    row_sets,
)
from diffcache.methods import d2cache_prior as prior
from diffcache.methods.base import Calibrated, PositionKVConfig, option, tune_knob
from diffcache.registry import register_method
from diffcache.session import Session


@dataclasses.dataclass(frozen=True)
class D2CacheConfig(PositionKVConfig):
    """Options of d²Cache (defaults: the reference's configs/cache/d2cache.yaml)."""

    name: ClassVar[str] = "d2cache"

    current_k: int = option(
        32,
        "masked positions chosen by the certainty prior per step (at or above the number of "
        "masks, every mask is recomputed each step: d2cache pays from about twice this length)",
        min=1,
    )
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
        False,
        "the reference code's decisions: stage-1 confidence frozen at step 0, its density "
        "denominator, and (Dream) the last prompt row assigned",
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

    def commit(self, state: DecodeState, candidates: Candidates) -> torch.Tensor:
        """The request's rule on the confidences times the certainty density of width
        ``decode_sigma`` (the decoding prior; 0: plain confidences), with the reference's
        density denominator under ``reference_compat``."""
        if self.cfg.decode_sigma:
            c, p = candidates, state.prompt_len
            generated = state.ids[: c.targets.shape[0], p:] != state.mask_id
            density = prior.certainty_density(
                generated, self.cfg.decode_sigma, reference_compat=self.cfg.reference_compat
            )
            # an idle row's padding target may lie in the prompt: clamped, not valid
            scaled = c.confidence * density.gather(1, (c.targets - p).clamp(min=0))
            confidence = scaled.masked_fill(~c.valid, float("-inf"))
            candidates = dataclasses.replace(c, confidence=confidence)
        return super().commit(state, candidates)

    def plan(self, state: DecodeState, targets: torch.Tensor) -> StepPlan:
        self.attn = []
        if self.next is None:  # step 0: full; every generated position scored for stage 1
            every = torch.arange(state.prompt_len, state.length, device=targets.device)
            return StepPlan(rows=None, targets=every.expand(targets.shape[0], -1))
        q = self.next
        shift = state.logit_shift
        src = (targets - shift).clamp(min=0)
        keep = q.gather(1, src)  # candidates whose logit row is recomputed
        kept = [t[k] for t, k in zip(targets, keep, strict=True)]
        kept = [k if len(k) else t[:1] for k, t in zip(kept, targets, strict=True)]
        narrowed, _ = pad_rows(kept)
        rows, counts = union_rows(q, narrowed, shift)
        return StepPlan(rows=rows, targets=narrowed, counts=counts)

    def layer_end(self, layer: int, view: LayerView) -> bool:
        self.attn.append((view.rows, view.probs(view.q).mean(dim=1)))
        self.key_mask = view.key_mask
        return False

    def step_end(self, state: DecodeState, plan: StepPlan, committed: torch.Tensor) -> None:
        b, length = state.ids.shape
        p = state.prompt_len
        self._update_conf(state, plan)
        cfg = self.cfg
        chosen, scores = prior.stage1(
            state.masked, self.conf, p, state.block, cfg.current_k, cfg.sigma, cfg.reference_compat
        )
        q = chosen.clone()
        if state.logit_shift:  # Dream: a mask's logits come from the row before it
            q.zero_()
            q[:, p:-1] = chosen[:, p + 1 :]
        q |= committed  # decoded now: recompute once with the real token
        rolled, importance = None, None
        if cfg.rollout_p > 0 and self.attn:
            importance = self._rollout(b, length, state.ids.device)
            allowed = ~q if self.key_mask is None else ~q & self.key_mask
            rolled = prior.nucleus_select(importance, cfg.rollout_p, allowed)
            q |= rolled
        if state.logit_shift:  # the first generated position's logits come from the prompt
            first = chosen[:, p]
            q[:, p - 1] = first if cfg.reference_compat else q[:, p - 1] | first
        picked = q
        if cfg.inflate_w:
            q = prior.inflate(q, cfg.inflate_w)
        self.next = q
        if self.tracing:
            self._trace(chosen, scores, rolled, importance, q & ~picked)

    def _trace(
        self,
        chosen: torch.Tensor,
        scores: torch.Tensor,
        rolled: torch.Tensor | None,
        importance: torch.Tensor | None,
        gaps: torch.Tensor,
    ) -> None:
        """The step's choices of the next step's rows, per batch row: stage 1's masks and
        their scores, the rollout's positions and their importance, the inflated gaps."""
        where = row_sets(chosen)
        self.trace(
            "stage1",
            "partial",
            positions=where,
            scores=[s[w] for s, w in zip(scores, where, strict=True)],
        )
        if rolled is not None and importance is not None:
            where = row_sets(rolled)
            self.trace(
                "rollout",
                "partial",
                positions=where,
                importance=[v[w] for v, w in zip(importance, where, strict=True)],
            )
        if self.cfg.inflate_w:
            self.trace("inflate", "partial", positions=row_sets(gaps))

    def _update_conf(self, state: DecodeState, plan: StepPlan) -> None:
        conf = state.confidence
        if conf is None:
            return
        if self.conf is None:
            self.conf = torch.zeros(state.ids.shape, dtype=torch.float64, device=state.ids.device)
        elif self.cfg.reference_compat:
            return
        real = conf.shape[0]
        row, col = torch.isfinite(conf).nonzero(as_tuple=True)  # padding copies are -inf
        self.conf[row, plan.targets[row, col]] = conf[row, col].double()
        if self.conf.shape[0] > real:  # CFG rows share the real rows' confidence
            self.conf[real:] = self.conf[:real]

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
