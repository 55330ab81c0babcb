"""Elastic-Cache (Nguyen-Tri et al., "Attention Is All You Need for KV Cache in Diffusion LLMs",
arXiv 2510.14973; VILA-Lab/Elastic-Cache): attention-aware, depth-aware K/V refresh.

Rules (research/dlm.md §2.3): step 0 is a full forward. Every later step recomputes only the
*tracked* tokens (per layer, the non-mask key that this step's window queries attend to most,
``track_num`` of them), the tokens decoded at the previous step, and the *sliding window* — the
first ``window`` still-masked positions of the answer (Dream: the rows before them, as its logits
are shifted); masks outside the window are neither queried nor refreshed. At each layer the
tracked tokens' attention rows under the previous (q, K) and the current ones are compared; when
their similarity falls below ``gamma`` every position is recomputed from the next layer on, from
the stored layer inputs (depth-aware refresh). Decoding commits every window mask whose
confidence is at least min(``threshold``, the best), and a row stops at its first decoded EOS
(later masks stay masks and are dropped from the text). ``refresh_every`` adds periodic full
forwards (not in the paper; 1 makes every step a full forward, the identity).

Differences from the reference code: the drift similarity is the cosine between attention
*distributions over keys* per head, averaged (the paper's rule); the reference takes the cosine
across the head axis (``dim=1``), kept with ``reference_compat: true``. The previous attention
takes the current keys' scores and recomputes only the recomputed rows' from their old keys,
instead of cloning the whole K cache per layer; batch rows are independent (the reference runs
batch 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from diffcache.adapter import Target
from diffcache.kv.method import attach_policy
from diffcache.kv.policy import DecodeState, LayerView, Policy, StepPlan, union_rows
from diffcache.methods.base import Calibrated, MethodConfig, option, tune_knob
from diffcache.registry import register_method
from diffcache.session import Session

FAMILIES = ("llada", "dream")


@dataclasses.dataclass(frozen=True)
class ElasticCacheConfig(MethodConfig):
    """Options of Elastic-Cache (defaults: the reference's ``generate_with_elastic_cache``)."""

    name: ClassVar[str] = "elastic_cache"
    granularity: ClassVar[str] = "kv"
    kind: ClassVar[str] = "token_layer"
    kernels: ClassVar[tuple[str, ...]] = ("kv_scatter", "token_confidence")

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
    eos_truncate: bool = option(True, "stop a row at its first decoded EOS")
    decode: bool = option(
        True, "decode as Elastic-Cache (window, threshold, EOS stop); false: the pipeline's sampler"
    )
    refresh_every: int | None = option(
        None, "also a full forward every N steps (null: step 0 only, as the paper)", min=1
    )
    reference_compat: bool = option(
        False, "cosine across heads, as the reference code (see docstring)"
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

    def not_supported_reasons(self, target: Target) -> list[str]:
        if target.adapter.name not in FAMILIES:
            return [f"elastic_cache runs on llada and dream pipelines, not {target.adapter.name}"]
        return []


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
        self.window_src: torch.Tensor | None = None  # [B, W] rows whose attention picks tracks
        self.masked: torch.Tensor | None = None

    def decoding(self, settings: dict[str, Any]) -> dict[str, Any]:
        if not self.cfg.decode:
            return settings
        out = {**settings, "window": self.cfg.window, "threshold": self.cfg.threshold}
        out["eos_truncate"] = self.cfg.eos_truncate
        if out.get("alg") == "origin":  # Dream: Elastic-Cache decodes by confidence
            out["alg"] = "maskgit_plus"
        return out

    def start(self, state: DecodeState, store: Any) -> None:
        super().start(state, store)
        self._shape = tuple(state.ids.shape)

    def plan(self, state: DecodeState, targets: torch.Tensor) -> StepPlan:
        self.masked = state.masked
        self.window_src = (targets - state.logit_shift).clamp(min=0)
        every = self.cfg.refresh_every
        if state.step == 0 or (every is not None and state.step % every == 0):
            return StepPlan(rows=None, targets=targets)
        need = state.decoded_at == state.step - 1  # decoded at the last step
        for track in self.track:
            need.scatter_(1, track, True)
        rows, counts = union_rows(need, targets, state.logit_shift)
        return StepPlan(rows=rows, targets=targets, counts=counts)

    def layer_end(self, layer: int, view: LayerView) -> torch.Tensor | bool:
        if len(self.q) <= layer:  # step 0: every row computed
            self.q.append(view.q.clone())
            self.track.append(self._pick(layer, view, view.q, None))
            return False
        if view.rows is None:  # a refreshed layer: replace its queries
            self.q[layer] = view.q.clone()
            self.track[layer] = self._pick(layer, view, view.q, None)
            return False
        rows = view.rows
        b, heads, _, hd = view.q.shape
        tracked = self.track[layer][:, None, :, None].expand(b, heads, -1, hd)
        old_q = self.q[layer].gather(2, tracked)
        self.q[layer].scatter_(2, rows[:, None, :, None].expand(b, heads, -1, hd), view.q)
        new_q = self.q[layer].gather(2, tracked)
        drift = self._similarity(view, old_q, new_q) < self.cfg.gamma
        self.track[layer] = self._pick(layer, view, view.q, rows)
        return drift

    def _similarity(
        self, view: LayerView, old_q: torch.Tensor, new_q: torch.Tensor
    ) -> torch.Tensor:
        """Per batch row, the mean similarity of the tracked tokens' attention (queries
        ``old_q`` / ``new_q``) before and after this step ``[B]``."""
        before = view.probs(old_q, previous=True)
        after = view.probs(new_q)
        axis = 1 if self.cfg.reference_compat else -1
        return F.cosine_similarity(before, after, dim=axis).flatten(1).mean(1)

    def _pick(
        self, layer: int, view: LayerView, q: torch.Tensor, rows: torch.Tensor | None
    ) -> torch.Tensor:
        """The non-mask keys most attended by the window's queries: [B, track_num]."""
        src = self.window_src
        if rows is not None:  # index of each window source row inside this step's rows
            where = torch.full(self._shape, -1, dtype=torch.long, device=rows.device)
            where.scatter_(1, rows, torch.arange(rows.shape[1], device=rows.device).expand_as(rows))
            src = where.gather(1, src)
        b, heads, _, hd = q.shape
        qw = q.gather(2, src[:, None, :, None].expand(b, heads, -1, hd))
        mass = view.probs(qw).sum(dim=(1, 2)).masked_fill(self.masked, 0.0)
        if view.key_mask is not None:
            mass = mass.masked_fill(~view.key_mask, 0.0)
        return mass.topk(self.cfg.track_num, dim=-1).indices


@register_method(ElasticCacheConfig)
def apply(session: Session, cfg: ElasticCacheConfig) -> None:
    attach_policy(session, cfg.name, lambda: ElasticPolicy(cfg))
