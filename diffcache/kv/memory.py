"""KV-cache bytes of a next-scale model from its architecture alone (no weights).

The history a layer holds before scale ``si`` is what it kept after ``si − 1``: with a budget
``b(si, l)`` (rows per head; None = keep all) the layer holds ``h_{si+1} = min(b, h_si + n_si)``
(research/var.md §2.1.8). Two numbers matter (§4.7):

- the history before each scale, whose last entry is the papers' "KV cache memory";
- the layer-sweep peak: at scale ``si`` the layers run in order, so while layer ``l`` holds its
  transient ``h_si + n_si`` rows, the layers before it hold what they kept and those after it
  their old history.

These are the numbers :class:`~diffcache.kv.budget.BudgetedHistory` measures on a model with one
head group per layer.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

from diffcache.kv.history import ScaleCall, Schedule

#: rows kept by ``layer`` after scale ``si`` (tokens per head), None = keep all.
Budget = Callable[[int, int], int | None]

MIB = 2**20


def kv_bytes(layers: int, channels: int, tokens: int, rows: int, k_bytes: int, v_bytes: int) -> int:
    """Bytes of ``tokens`` cached rows in every layer: ``layers·channels·tokens·rows·(k+v)``."""
    return layers * channels * tokens * rows * (k_bytes + v_bytes)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What the KV bytes depend on: ``rows`` is the attention batch (CFG doubles it), K and V
    sizes are per element (cosine attention: K fp32 = 4, V bf16 = 2)."""

    layers: int
    heads: int
    head_dim: int
    schedule: Schedule
    rows: int
    k_bytes: int = 4
    v_bytes: int = 2

    @classmethod
    def of(cls, stats_geometry: dict) -> Geometry:
        """The geometry a run reported (``Stats.kv_geometry``: the schedule as lists)."""
        return cls(**{**stats_geometry, "schedule": Schedule(stats_geometry["schedule"])})

    @property
    def row_bytes(self) -> int:
        """Bytes of one cached position in one layer (all heads and rows, K and V)."""
        return kv_bytes(1, self.heads * self.head_dim, 1, self.rows, self.k_bytes, self.v_bytes)

    def history_lengths(self, budget: Budget | None = None) -> list[list[int]]:
        """``out[si][l]``: rows layer ``l`` holds before scale ``si``; one more entry, after the
        last scale."""
        held = [[0] * self.layers]
        for si in range(len(self.schedule)):
            n = self.schedule.tokens(si)
            kept = []
            for layer in range(self.layers):
                b = budget(si, layer) if budget is not None else None
                total = held[-1][layer] + n
                kept.append(total if b is None else min(b, total))
            held.append(kept)
        return held

    def history_before(self, budget: Budget | None = None) -> list[int]:
        """Bytes of the history held before each scale (the last: the papers' "KV cache")."""
        lengths = self.history_lengths(budget)[: len(self.schedule)]
        return [sum(row) * self.row_bytes for row in lengths]

    def sweep_peaks(
        self, budget: Budget | None = None, groups: Sequence[Sequence[int]] | None = None
    ) -> list[int]:
        """The most bytes held at once during each scale, counting the layer being processed
        at its transient history + new rows. ``groups[layer]``: the sizes of the head groups a
        store runs one after the other (None: one group of all heads); while one group holds its
        history + new rows, the layer's earlier groups hold what they kept and its later ones
        their old history."""
        lengths = self.history_lengths(budget)
        sizes = groups if groups is not None else [[self.heads]] * self.layers
        peaks = []
        for si in range(len(self.schedule)):
            before, after, n = lengths[si], lengths[si + 1], self.schedule.tokens(si)
            peak = 0  # in head-rows
            for layer, group in enumerate(sizes):
                others = (sum(after[:layer]) + sum(before[layer + 1 :])) * self.heads
                for i, size in enumerate(group):
                    here = sum(group[:i]) * after[layer] + sum(group[i + 1 :]) * before[layer]
                    peak = max(peak, others + here + size * (before[layer] + n))
            peaks.append(peak * self.row_bytes // self.heads)
        return peaks

    def sweep_peak(
        self, budget: Budget | None = None, groups: Sequence[Sequence[int]] | None = None
    ) -> int:
        """The most bytes held at once over the generation (the largest of :meth:`sweep_peaks`)."""
        return max(self.sweep_peaks(budget, groups))


def selection_budget(selection: object, schedule: Schedule) -> Budget:
    """The :data:`Budget` of a selection with one head group per layer that declares its rows
    as ``budget(call, group, length)`` (ScaleKV, the uniform baselines; None = keep all), on
    ``schedule``. Raises ValueError for a selection whose rows depend on its head groups."""
    rows = getattr(selection, "budget", None)
    if not callable(rows) or selection.groups(0, 1) != [[0]]:  # type: ignore[attr-defined]
        raise ValueError(f"{type(selection).__name__} does not declare one budget per layer")

    @functools.cache
    def kept(si: int, layer: int) -> int:
        """Rows ``layer`` keeps after scale ``si``: its history plus the new map, capped."""
        length = (kept(si - 1, layer) if si else 0) + schedule.tokens(si)
        b = rows(ScaleCall(layer=layer, si=si, schedule=schedule, cond_rows=0), 0, length)
        return length if b is None else min(b, length)

    return kept
