"""Elastic-Cache (Nguyen-Tri et al., "Attention Is All You Need for KV Cache in Diffusion LLMs",
arXiv 2510.14973; VILA-Lab/Elastic-Cache): attention-aware, depth-aware K/V refresh.

Rules (research/dlm.md §2.3; checked step by step against a plain rewrite of the reference loop
in tests/dlm/test_elastic_reference.py):

- Step 0 is a full forward. The *sliding window* is the first ``window`` still-masked positions
  of the answer (Dream: the rows before them, as its logits are shifted); masks outside it are
  neither queried nor refreshed.
- Every later step recomputes the tracked tokens (the union over all layers of each layer's
  ``track_num`` tracked tokens, deduplicated), the tokens decoded at the previous step and the
  window.
- Drift test, at each layer: the attention of that same union of tracked tokens under the
  previous (q, K) and under the current ones (fresh q, K with this step's rows written); when
  their mean similarity falls below ``gamma``, every position is recomputed from the next layer
  on, from the stored layer inputs with this step's rows written in (depth-aware refresh).
- A layer's tracked tokens, picked after its attention for the next step: the keys on which
  the window's queries put the most attention mass (summed over heads and queries), masks
  excluded.
- Decoding commits every window mask whose confidence is at least min(``threshold``, the best);
  ``eos_truncate`` drops the masks after a row's first decoded EOS (they stay masks and leave
  the text). ``refresh_every`` adds periodic full forwards (not in the paper; 1 makes every step
  a full forward, the identity).

Where the reference code (yxu-dev/Elastic-Cache @46c0bc3) does otherwise, and why:

- Drift cosine axis. Ours: per head and tracked token, the cosine between the attention
  distributions over keys, averaged (the paper's rule: the tracked token's attention changed).
  The reference takes the cosine across the head axis (``dim=1``) per token and key, which
  compares head vectors, not distributions; ``reference_compat: true`` does that.
- EOS truncation point (a reference bug). The reference cuts once, at the leftmost EOS of the
  first step that commits one; an EOS decoded later further left does not cut again, so it goes
  on decoding the masks between the two, which lie after the answer's end and are dropped from
  the output: steps spent on discarded text, against its own rule of stopping at the first EOS.
  Ours follows the first EOS wherever it is; ``reference_compat: true`` cuts once.
- Tracking cut-off masks (a reference bug). The reference zeroes the attention mass of the masks
  still to decode, a list the truncation shortens, so a mask cut off after the EOS can become a
  tracked token (recomputed every step, and its never-refined attention drives the drift test).
  Ours never tracks a mask; ``reference_compat: true`` lets cut-off masks be tracked.

Same decisions, different arithmetic: the previous attention takes the current keys' scores and
recomputes only the recomputed rows' from their old keys instead of cloning the whole K cache per
layer; the layer outputs use SDPA (the reference an explicit softmax); batch rows are
independent (the reference runs batch 1; the tracked union is per row).

Trace (``accelerate(..., trace=True)``): per step and layer a ``layer`` event, ``computed`` (every
position recomputed: step 0, a periodic or depth refresh; no drift test) or ``partial`` (with the
``similarity`` per batch row, ``gamma``, the ``tracked`` positions compared and ``refresh_from``,
the layer a refresh starts from when this layer drifted); both carry ``picked``, the layer's
tracked tokens for the next step. The rows recomputed (``model``) and the tokens committed
(``decode``) are the DLM core's events.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from diffcache.kv.method import attach_policy
from diffcache.kv.policy import (
    Candidates,
    DecodeState,
    LayerView,
    Policy,
    StepPlan,
    pad_rows,
    row_sets,
    union_rows,
)
from diffcache.methods.base import Calibrated, PositionKVConfig, option, tune_knob
from diffcache.pipelines.sampling import rules
from diffcache.registry import register_method
from diffcache.session import Session


@dataclasses.dataclass(frozen=True)
class ElasticCacheConfig(PositionKVConfig):
    """Options of Elastic-Cache (defaults: the reference's ``generate_with_elastic_cache``)."""

    name: ClassVar[str] = "elastic_cache"

    window: int = option(
        16, "sliding window: the first N masked positions are decoded and queried", min=1
    )
    gamma: float = option(
        0.9,
        "refresh deeper layers when the attention similarity drops below this (> 1: always)",
        min=-1.0,
        max=2.0,
    )
    track_num: int = option(1, "most-attended tokens tracked per layer", min=1)
    threshold: float = option(
        0.9, "commit window masks at least this confident (at least the best one)", min=0.0, max=1.0
    )
    eos_truncate: bool = option(True, "drop the masks after a row's first decoded EOS")
    decode: bool = option(
        True, "decode as Elastic-Cache (window, threshold, EOS stop); false: the pipeline's sampler"
    )
    refresh_every: int | None = option(
        None, "also a full forward every N steps (null: step 0 only, as the paper)", min=1
    )
    reference_compat: bool = option(
        False,
        "the reference code's rules: cosine across heads, EOS cut once, cut-off masks "
        "trackable (see docstring)",
    )

    @classmethod
    def identity(cls) -> ElasticCacheConfig:
        return cls(refresh_every=1, decode=False)

    @classmethod
    def aggressive(cls) -> ElasticCacheConfig:
        return cls(gamma=-1.0, threshold=0.5)

    def calibrate(self, profiling: Any) -> Calibrated:
        """Keep the options, or with a compute target pick the largest ``gamma`` (the
        attention-similarity bar below which deeper layers refresh) whose calibration runs
        compute at most that fraction."""
        return tune_knob(self, profiling, "gamma", 0.01, 1.0, rising=True, near_one=True)


class ElasticPolicy(Policy):
    name = "elastic_cache"
    uses_store = True
    wants_layers = True
    keeps_inputs = True

    def __init__(self, cfg: ElasticCacheConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.q: list[torch.Tensor] = []  # per layer: post-RoPE queries of every position
        self.track: list[torch.Tensor] = []  # per layer: [B, track_num] tracked positions
        self.tracked: torch.Tensor | None = None  # [B, n] union of the layers' tracks (padded)
        self.real: torch.Tensor | None = None  # [B, n] False at the padding of ``tracked``
        self.window_src: torch.Tensor | None = None  # [B, W] rows whose attention picks tracks
        self.untrackable: torch.Tensor | None = None  # [B, L] keys never tracked (masks)

    def decoding(self, settings: dict[str, Any]) -> dict[str, Any]:
        if self.cfg.decode and settings.get("alg") == "origin":  # Dream: decode by confidence
            return {**settings, "alg": "maskgit_plus"}
        return settings

    # -- the decoding rule (``decode``; else the request's) ----------------------------------
    def block_length(self, gen_length: int, block_length: int) -> int:
        """One block, the whole answer: the window slides over it."""
        return gen_length if self.cfg.decode else block_length

    def block_done(self, state: DecodeState) -> bool:
        """The window decodes until no mask is left."""
        return False if self.cfg.decode else super().block_done(state)

    def candidates(self, state: DecodeState, masked: torch.Tensor) -> torch.Tensor:
        """The window: the first ``window`` masks."""
        if not self.cfg.decode:
            return masked
        return masked & (masked.cumsum(1) <= self.cfg.window)

    def commit(self, state: DecodeState, candidates: Candidates) -> torch.Tensor:
        """Every candidate at least min(``threshold``, the row's best) confident."""
        if not self.cfg.decode:
            return super().commit(state, candidates)
        c = candidates
        return rules.commit_confident(c.confidence, c.valid, self.cfg.threshold)

    def step_end(self, state: DecodeState, plan: StepPlan, committed: torch.Tensor) -> None:
        """``eos_truncate``: the masks from each row's first decoded EOS on leave decoding."""
        if self.cfg.decode and self.cfg.eos_truncate:
            real = state.dropped.shape[0]  # CFG rows follow the real ones
            state.dropped |= rules.after_first_eos(
                state.ids[:real],
                state.eos_id,
                state.prompt_len,
                committed[:real],
                state.dropped,
                once=self.cfg.reference_compat,
            )

    def start(self, state: DecodeState, store: Any) -> None:
        super().start(state, store)
        self._shape = tuple(state.ids.shape)
        self._layers = state.num_layers

    def plan(self, state: DecodeState, targets: torch.Tensor) -> StepPlan:
        self.untrackable = state.masked
        if self.cfg.reference_compat and state.dropped is not None:  # masks cut off by an EOS
            cut = state.dropped.repeat(self._shape[0] // state.dropped.shape[0], 1)
            self.untrackable = self.untrackable & ~cut
        self.window_src = (targets - state.logit_shift).clamp(min=0)
        every = self.cfg.refresh_every
        if state.step == 0 or (every is not None and state.step % every == 0):
            return StepPlan(rows=None, targets=targets)
        tracked = torch.zeros_like(state.masked)
        for track in self.track:
            tracked.scatter_(1, track, True)
        self.tracked, counts = pad_rows(row_sets(tracked))
        self.real = torch.arange(self.tracked.shape[1]) < counts[:, None]
        self.real = self.real.to(tracked.device)
        need = tracked | (state.decoded_at == state.step - 1)  # decoded at the last step
        rows, counts = union_rows(need, targets, state.logit_shift)
        return StepPlan(rows=rows, targets=targets, counts=counts)

    def layer_end(self, layer: int, view: LayerView) -> torch.Tensor | bool:
        if len(self.q) <= layer:  # step 0: every row computed
            self.q.append(view.q.clone())
            self.track.append(self._pick(view, view.q, None))
            self._trace(layer, view, None, None)
            return False
        if view.rows is None:  # a refreshed layer: replace its queries
            self.q[layer] = view.q.clone()
            self.track[layer] = self._pick(view, view.q, None)
            self._trace(layer, view, None, None)
            return False
        rows = view.rows
        b, heads, _, hd = view.q.shape
        tracked = self.tracked[:, None, :, None].expand(b, heads, -1, hd)
        old_q = self.q[layer].gather(2, tracked)
        self.q[layer].scatter_(2, rows[:, None, :, None].expand(b, heads, -1, hd), view.q)
        new_q = self.q[layer].gather(2, tracked)
        similarity = self._similarity(view, old_q, new_q)
        drift = similarity < self.cfg.gamma
        self.track[layer] = self._pick(view, view.q, rows)
        self._trace(layer, view, similarity, drift)
        return drift

    def _similarity(
        self, view: LayerView, old_q: torch.Tensor, new_q: torch.Tensor
    ) -> torch.Tensor:
        """Per batch row, the mean similarity of the tracked tokens' attention (queries
        ``old_q`` / ``new_q``) before and after this step ``[B]``: the cosine over keys per
        head and token (``reference_compat``: across heads per token and key), averaged."""
        before = view.probs(old_q, previous=True)
        after = view.probs(new_q)
        if self.cfg.reference_compat:  # [B, n, L]
            cosine = F.cosine_similarity(before, after, dim=1)
            weight = self.real[:, :, None].expand_as(cosine)
        else:  # [B, H, n]
            cosine = F.cosine_similarity(before, after, dim=-1)
            weight = self.real[:, None, :].expand_as(cosine)
        weight = weight.to(cosine.dtype).flatten(1)
        return (cosine.flatten(1) * weight).sum(1) / weight.sum(1)

    def _pick(self, view: LayerView, q: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """The trackable keys most attended by the window's queries: [B, track_num]."""
        src = self.window_src
        if rows is not None:  # index of each window source row inside this step's rows
            where = torch.full(self._shape, -1, dtype=torch.long, device=rows.device)
            where.scatter_(1, rows, torch.arange(rows.shape[1], device=rows.device).expand_as(rows))
            src = where.gather(1, src)
        b, heads, _, hd = q.shape
        qw = q.gather(2, src[:, None, :, None].expand(b, heads, -1, hd))
        mass = view.probs(qw).sum(dim=(1, 2)).masked_fill(self.untrackable, 0.0)
        if view.key_mask is not None:
            mass = mass.masked_fill(~view.key_mask, 0.0)
        return mass.topk(self.cfg.track_num, dim=-1).indices

    def _trace(
        self,
        layer: int,
        view: LayerView,
        similarity: torch.Tensor | None,
        drift: torch.Tensor | None,
    ) -> None:
        """One layer's decision: ``computed`` (every position; no drift test) or ``partial``
        (this step's rows; per batch row the ``similarity`` of the ``tracked`` tokens'
        attention, None where the row already recomputes every position, and
        ``refresh_from``: the layer a refresh starts from when this one drifted)."""
        if not self.tracing:
            return
        picked = self.track[layer]
        if similarity is None or bool(view.full.all()):
            self.trace("layer", "computed", layer=layer, gamma=self.cfg.gamma, picked=picked)
            return
        tested = ~view.full
        starts = drift & tested & (layer + 1 < self._layers)
        self.trace(
            "layer",
            "partial",
            layer=layer,
            gamma=self.cfg.gamma,
            similarity=[float(s) if t else None for s, t in zip(similarity, tested, strict=True)],
            tracked=[t[r] for t, r in zip(self.tracked, self.real, strict=True)],
            refresh_from=[layer + 1 if s else None for s in starts.tolist()],
            picked=picked,
        )


@register_method(ElasticCacheConfig)
def apply(session: Session, cfg: ElasticCacheConfig) -> None:
    attach_policy(session, cfg.name, lambda: ElasticPolicy(cfg))
