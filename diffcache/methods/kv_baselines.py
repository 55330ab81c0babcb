"""The LLM KV-compression baselines of the VAR papers, on next-scale models (VAR, Infinity):
``h2o``, ``snapkv``, ``streaming`` and ``pyramidkv``.

Each keeps, after every scale's attention, at most a budget of history rows per head of each
layer (:mod:`diffcache.kv.baselines`, research/var.md §2.3, whose docstrings say how each LLM
rule maps onto token maps):

- ``h2o`` (Zhang et al., "H2O: Heavy-Hitter Oracle", NeurIPS 2023): the attention every current
  query gives each row, summed, plus ``recent`` rows (default: half the budget);
- ``snapkv`` (Li et al., "SnapKV", 2024): the last ``window`` rows vote with their softmax
  attention, average pooling (``kernel``), top-k plus the window;
- ``streaming`` (Xiao et al., "StreamingLLM", ICLR 2024): the first ``sinks`` positions plus the
  most recent;
- ``pyramidkv`` (Cai et al., "PyramidKV", 2024): SnapKV's scores, per-layer caps decreasing with
  depth (``beta``).

The budget is ``budget`` tokens per head, or ``ratio`` of the history before the last scale
(the papers' "KV cache"); neither: unlimited (the plain model). Deliberate differences: no causal
mask inside the window (VAR's rows have none), scores per (batch row, head) so CFG's two rows
choose on their own. ``compute_fraction`` is the attention work kept (kind ``attn_pair``,
:mod:`diffcache.kv.history_method`).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

from diffcache.kv.baselines import (
    H2OSelection,
    PyramidKVSelection,
    SnapKVSelection,
    StreamingSelection,
)
from diffcache.kv.history import Schedule, Selection
from diffcache.kv.history_method import attach_selection, token_budget
from diffcache.methods.base import HistoryKVConfig, option
from diffcache.registry import register_method


@dataclasses.dataclass(frozen=True)
class HistoryBudgetConfig(HistoryKVConfig, abc.ABC):
    """What every next-scale KV baseline shares: its budget."""

    budget: int | None = option(None, "history rows kept per head and layer (None: all)", min=1)
    ratio: float | None = option(
        None, "or the budget as this fraction of the history before the last scale", min=0.0
    )

    def kv_target(self, fraction: float) -> HistoryBudgetConfig:
        """``ratio=fraction``: every layer keeps ``floor(fraction·T)`` rows per head, ``T`` the
        history before the last scale (``diffcache.kv.memory``: exactly that history)."""
        return dataclasses.replace(self, budget=None, ratio=fraction)

    @abc.abstractmethod
    def selection(self, tokens: int, layers: int) -> Selection:
        """The selection that keeps ``tokens`` rows per head on a model of ``layers`` layers."""

    def make(
        self, calibration: None, schedule: Schedule, layers: int, heads: int
    ) -> Selection | None:
        tokens = token_budget(self.budget, self.ratio, schedule)
        return None if tokens is None else self.selection(tokens, layers)


@dataclasses.dataclass(frozen=True)
class H2OConfig(HistoryBudgetConfig):
    """Options of H2O on next-scale models."""

    name: ClassVar[str] = "h2o"
    recent: int | None = option(None, "recent rows always kept (None: half the budget)", min=0)

    @classmethod
    def identity(cls) -> H2OConfig:
        return cls()

    @classmethod
    def aggressive(cls) -> H2OConfig:
        return cls(budget=2)

    def selection(self, tokens: int, layers: int) -> Selection:
        return H2OSelection(tokens, self.recent)


@dataclasses.dataclass(frozen=True)
class SnapKVConfig(HistoryBudgetConfig):
    """Options of SnapKV on next-scale models."""

    name: ClassVar[str] = "snapkv"
    kernels: ClassVar[tuple[str, ...]] = ("kv_compact", "window_scores")
    window: int = option(16, "observation window: the cache's last rows (always kept)", min=1)
    kernel: int = option(5, "average-pooling kernel (odd)", min=1)

    @classmethod
    def identity(cls) -> SnapKVConfig:
        return cls()

    @classmethod
    def aggressive(cls) -> SnapKVConfig:
        return cls(budget=2, window=1)

    def selection(self, tokens: int, layers: int) -> Selection:
        return SnapKVSelection(tokens, self.window, self.kernel)


@dataclasses.dataclass(frozen=True)
class StreamingConfig(HistoryBudgetConfig):
    """Options of StreamingLLM on next-scale models."""

    name: ClassVar[str] = "streaming"
    sinks: int = option(5, "first positions always kept (5: VAR's 1x1 and 2x2 maps)", min=0)

    @classmethod
    def identity(cls) -> StreamingConfig:
        return cls()

    @classmethod
    def aggressive(cls) -> StreamingConfig:
        return cls(budget=6)

    def selection(self, tokens: int, layers: int) -> Selection:
        return StreamingSelection(tokens, self.sinks)


@dataclasses.dataclass(frozen=True)
class PyramidKVConfig(SnapKVConfig):
    """Options of PyramidKV on next-scale models."""

    name: ClassVar[str] = "pyramidkv"
    beta: int = option(20, "the pyramid's steepness (min cap = (budget - window) // beta)", min=1)

    @classmethod
    def identity(cls) -> PyramidKVConfig:
        return cls()

    @classmethod
    def aggressive(cls) -> PyramidKVConfig:
        return cls(budget=3, window=1)

    def selection(self, tokens: int, layers: int) -> Selection:
        return PyramidKVSelection(tokens, layers, self.window, self.kernel, self.beta)


# The selection is the whole method: each baseline's apply is attach_selection itself.
for _config in (H2OConfig, SnapKVConfig, StreamingConfig, PyramidKVConfig):
    register_method(_config)(attach_selection)
