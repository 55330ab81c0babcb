"""The LLM KV-compression baselines ScaleKV compares with, adapted to next-scale models.

Neither paper released its adaptations; these are the natural ones of research/var.md §2.3. Each
keeps, after every scale's attention (post), at most ``budget`` rows per head of each layer's
cache (history + the current map, in cache order), one head group per layer, scores per (batch
row, head). Nothing is evicted while the cache fits the budget.

- :class:`SlidingWindowSelection`: the last ``budget`` positions (the most recent scales).
- :class:`StreamingSelection` (StreamingLLM, Xiao et al. 2023): the first ``sinks`` positions
  (5 = VAR's and Infinity's 1×1 and 2×2 maps) plus the most recent.
- :class:`SnapKVSelection` (SnapKV, Li et al. 2024): the last ``window`` rows of the current map
  vote with their softmax attention, average pool (kernel 5), top-k, and the window is kept.
  Difference: cache rows have no causal mask in VAR, and a window longer than the current map
  keeps the earlier rows it covers without their votes (they have no query at this scale).
- :class:`PyramidKVSelection` (PyramidKV, Cai et al. 2024): SnapKV's scores with PyramidKV's
  per-layer caps (β = 20), lower layers keeping more.
- :class:`H2OSelection` (H2O, Zhang et al. 2023): the attention every current query gives each row,
  summed (heavy hitters), plus a recent window (default half the budget, H2O's split).
"""

from __future__ import annotations

import abc

import torch

from diffcache.errors import PlanError
from diffcache.kv.history import ScaleCall, Schedule
from diffcache.kv.select import (
    accumulated_attention,
    ends,
    last_rows,
    pooled_window_scores,
    recent,
    topk_with_mandatory,
)


class UniformSelection(abc.ABC):
    """A baseline with one head group per layer and ``budget`` rows per head (``mandatory`` rows
    always among them)."""

    when = "post"
    name = "uniform"

    def __init__(self, budget: int, mandatory: int) -> None:
        if mandatory > budget or budget < 1:
            raise PlanError(
                f"{self.name} budget of {budget} tokens per head is below the {mandatory} "
                "tokens it always keeps"
            )
        self.tokens = budget

    def check(self, schedule: Schedule, layers: int) -> None:
        """Raise PlanError when the budget holds the whole cache (nothing would be evicted)."""
        if self.tokens >= schedule.total:
            raise PlanError(
                f"{self.name} budget of {self.tokens} tokens per head is not below the whole "
                f"cache of this schedule ({schedule.total} tokens): it would keep everything"
            )

    def groups(self, layer: int, heads: int) -> list[list[int]]:
        return [list(range(heads))]

    def budget(self, call: ScaleCall, group: int, length: int) -> int:
        return self.tokens

    def keep(
        self, call: ScaleCall, group: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor | None:
        length = k.shape[2]
        budget = self.budget(call, group, length)
        if length <= budget:
            return None
        return self.select(call, q, k, budget)

    @abc.abstractmethod
    def select(
        self, call: ScaleCall, q: torch.Tensor, k: torch.Tensor, budget: int
    ) -> torch.Tensor:
        """The kept rows ``[B, Hg, budget]`` of a cache longer than the budget."""


class SlidingWindowSelection(UniformSelection):
    """Keep the last ``budget`` positions."""

    name = "sliding window"

    def __init__(self, budget: int) -> None:
        super().__init__(budget, 0)

    def select(
        self, call: ScaleCall, q: torch.Tensor, k: torch.Tensor, budget: int
    ) -> torch.Tensor:
        return ends(k, 0, budget)


class StreamingSelection(UniformSelection):
    """StreamingLLM: ``sinks`` first positions plus the most recent, ``budget`` in all."""

    name = "streaming"

    def __init__(self, budget: int, sinks: int = 5) -> None:
        super().__init__(budget, sinks)
        self.sinks = sinks

    def select(
        self, call: ScaleCall, q: torch.Tensor, k: torch.Tensor, budget: int
    ) -> torch.Tensor:
        return ends(k, self.sinks, budget - self.sinks)


class SnapKVSelection(UniformSelection):
    """SnapKV: the last ``window`` rows vote (softmax), average pool, top-k plus the window."""

    name = "snapkv"

    def __init__(self, budget: int, window: int = 16, kernel: int = 5) -> None:
        super().__init__(budget, window)
        self.window = window
        self.kernel = kernel

    def select(
        self, call: ScaleCall, q: torch.Tensor, k: torch.Tensor, budget: int
    ) -> torch.Tensor:
        window = last_rows(k.shape[2], self.window)
        scores = pooled_window_scores(call, q, k, window, call.scale, True, "avg", self.kernel)
        return topk_with_mandatory(scores, window, budget)


class PyramidKVSelection(SnapKVSelection):
    """PyramidKV: SnapKV with per-layer caps decreasing linearly with depth.

    For a cache of ``L`` rows and ``n = budget − window``: caches under ``2n`` rows keep
    ``budget`` (the reference's SnapKV branch); longer ones keep ``cap_l + window`` with
    ``min = n // β``, ``max = 2n − min`` (if ``max ≥ L − window``: ``max = L − window``,
    ``min = 2n − max``), ``steps = (max − min) // (layers − 1)``, ``cap_l = max − l·steps``."""

    name = "pyramidkv"

    def __init__(
        self, budget: int, layers: int, window: int = 16, kernel: int = 5, beta: int = 20
    ) -> None:
        super().__init__(budget, window, kernel)
        if layers < 2:
            raise PlanError(f"pyramidkv needs at least 2 layers, got {layers}")
        self.layers = layers
        self.beta = beta

    def budget(self, call: ScaleCall, group: int, length: int) -> int:
        n = self.tokens - self.window
        if length < 2 * n:
            return self.tokens
        low = n // self.beta
        high = 2 * n - low
        if high >= length - self.window:
            high = length - self.window
            low = 2 * n - high
        steps = (high - low) // (self.layers - 1)
        return high - call.layer * steps + self.window


class H2OSelection(UniformSelection):
    """H2O: accumulated attention of all current queries (heavy hitters) plus ``recent`` rows."""

    name = "h2o"

    def __init__(self, budget: int, recent: int | None = None) -> None:
        self.recent = budget // 2 if recent is None else recent
        super().__init__(budget, self.recent)

    def select(
        self, call: ScaleCall, q: torch.Tensor, k: torch.Tensor, budget: int
    ) -> torch.Tensor:
        scores = accumulated_attention(q, k, call.scale)
        return topk_with_mandatory(scores, recent(k.shape[2], self.recent), budget)
