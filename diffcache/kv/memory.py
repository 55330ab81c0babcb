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
from typing import TYPE_CHECKING

from diffcache.errors import PlanError
from diffcache.kv.history import ScaleCall, Schedule
from diffcache.kv.history_method import fitted_selection

if TYPE_CHECKING:
    from diffcache.plan import Plan

#: rows kept by ``layer`` after scale ``si`` (tokens per head), None = keep all; or one such
#: count per head group of the layer (in the order of ``groups[layer]``).
Budget = Callable[[int, int], "int | None | Sequence[int | None]"]
#: ``groups[layer]``: the sizes of the head groups a store runs one after the other
Groups = Sequence[Sequence[int]]

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

    @property
    def head_row_bytes(self) -> int:
        """Bytes of one cached position of one head in one layer (all rows, K and V)."""
        return kv_bytes(1, self.head_dim, 1, self.rows, self.k_bytes, self.v_bytes)

    def group_sizes(self, groups: Groups | None = None) -> list[list[int]]:
        """``groups`` checked against the model (each layer's sizes add up to its heads); None:
        one group of all heads per layer."""
        if groups is None:
            return [[self.heads]] * self.layers
        sizes = [list(g) for g in groups]
        if len(sizes) != self.layers or any(sum(g) != self.heads for g in sizes):
            raise ValueError(f"head groups {sizes} do not split {self.layers} x {self.heads} heads")
        return sizes

    def group_lengths(
        self, budget: Budget | None = None, groups: Groups | None = None
    ) -> list[list[list[int]]]:
        """``out[si][l][g]``: rows head group ``g`` of layer ``l`` holds before scale ``si``;
        one more entry, after the last scale."""
        sizes = self.group_sizes(groups)
        held = [[[0] * len(g) for g in sizes]]
        for si in range(len(self.schedule)):
            n = self.schedule.tokens(si)
            kept = []
            for layer, group in enumerate(sizes):
                b = budget(si, layer) if budget is not None else None
                caps = list(b) if isinstance(b, Sequence) else [b] * len(group)
                if len(caps) != len(group):
                    raise ValueError(f"layer {layer}: {len(caps)} budgets for {len(group)} groups")
                old = held[-1][layer]
                kept.append(
                    [h + n if c is None else min(c, h + n) for h, c in zip(old, caps, strict=True)]
                )
            held.append(kept)
        return held

    def history_lengths(self, budget: Budget | None = None) -> list[list[int]]:
        """``out[si][l]``: rows layer ``l`` holds before scale ``si`` (one group per layer); one
        more entry, after the last scale."""
        return [[g[0] for g in row] for row in self.group_lengths(budget)]

    def history_before(
        self, budget: Budget | None = None, groups: Groups | None = None
    ) -> list[int]:
        """Bytes of the history held before each scale (the last: the papers' "KV cache")."""
        lengths = self.group_lengths(budget, groups)[: len(self.schedule)]
        sizes = self.group_sizes(groups)
        return [sum(_head_rows(sizes, row)) * self.head_row_bytes for row in lengths]

    def sweep_peaks(self, budget: Budget | None = None, groups: Groups | None = None) -> list[int]:
        """The most bytes held at once during each scale, counting the layer being processed
        at its transient history + new rows. ``groups[layer]``: the sizes of the head groups a
        store runs one after the other (None: one group of all heads); while one group holds its
        history + new rows, the layer's earlier groups hold what they kept and its later ones
        their old history. A budget may keep a different count per group."""
        sizes = self.group_sizes(groups)
        lengths = self.group_lengths(budget, groups)
        flat_sizes = [s for group in sizes for s in group]
        peaks = []
        for si in range(len(self.schedule)):
            before, after = _head_rows(sizes, lengths[si]), _head_rows(sizes, lengths[si + 1])
            n = self.schedule.tokens(si)
            peak = max(
                sum(after[:i]) + sum(before[i + 1 :]) + before[i] + size * n
                for i, size in enumerate(flat_sizes)
            )
            peaks.append(peak * self.head_row_bytes)
        return peaks

    def attention_macs(self) -> list[int]:
        """Multiply-accumulates of the plain cache's attention at each scale: every query of the
        new map reads every key of the history and the map, ``head_dim`` MACs for its score
        (QK^T) and ``head_dim`` for its share of the output (AV), in every layer, head and row."""
        per_pair = 2 * self.head_dim * self.heads * self.rows * self.layers
        return [
            per_pair * self.schedule.tokens(si) * self.schedule.start(si + 1)
            for si in range(len(self.schedule))
        ]

    def sweep_peak(self, budget: Budget | None = None, groups: Groups | None = None) -> int:
        """The most bytes held at once over the generation (the largest of :meth:`sweep_peaks`)."""
        return max(self.sweep_peaks(budget, groups))


def _head_rows(sizes: list[list[int]], lengths: list[list[int]]) -> list[int]:
    """Head-rows held by each (layer, group) in sweep order: its size times its rows."""
    return [
        size * held
        for group, layer in zip(sizes, lengths, strict=True)
        for size, held in zip(group, layer, strict=True)
    ]


def selection_budget(
    selection: object, schedule: Schedule, layers: int, heads: int
) -> tuple[Budget, list[list[int]]]:
    """The :data:`Budget` of a selection that declares its rows per head group as ``budget(call,
    group, length)`` (ScaleKV, HACK, the uniform baselines; None = keep all) on ``schedule``,
    and the sizes of its head groups per layer (:data:`Groups`). Raises ValueError for a
    selection that declares no budget."""
    rows = getattr(selection, "budget", None)
    if not callable(rows):
        raise ValueError(f"{type(selection).__name__} declares no budget per head group")
    groups = [selection.groups(layer, heads) for layer in range(layers)]  # type: ignore[attr-defined]

    @functools.cache
    def kept(si: int, layer: int, group: int) -> int:
        """Rows ``group`` of ``layer`` keeps after scale ``si``: its history plus the new map,
        capped."""
        length = (kept(si - 1, layer, group) if si else 0) + schedule.tokens(si)
        call = ScaleCall(layer=layer, si=si, schedule=schedule, cond_rows=0)
        b = rows(call, group, length)
        return length if b is None else min(b, length)

    def budget(si: int, layer: int) -> list[int]:
        return [kept(si, layer, g) for g in range(len(groups[layer]))]

    return budget, [[len(g) for g in layer_groups] for layer_groups in groups]


@dataclasses.dataclass(frozen=True)
class PlanMemory:
    """Bytes of the full cache and of a plan's history at each scale of one geometry: the
    history held before the scale and the layer-sweep peak during it."""

    full: list[int]
    kept: list[int]
    full_peaks: list[int]
    kept_peaks: list[int]


def plan_memory(plan: Plan, geo: Geometry) -> PlanMemory:
    """What ``plan`` keeps on ``geo`` beside the full cache (``diffcache kv``): its method's
    selection for that model (the method's ``make``, checked as at ``accelerate``) and the rows
    it keeps per head group. A plan whose method keeps no budgeted history, or whose budget does
    not fit the model, is one PlanError line naming the plan."""
    if plan.config.needs.kv_store != "history":
        raise PlanError(
            f"{plan.source}: method {plan.method} keeps no budgeted KV history (diffcache kv "
            "covers scalekv, hack, h2o, snapkv, streaming, pyramidkv)"
        )
    make = functools.partial(plan.config.make, plan.calibration_data)
    selection = fitted_selection(plan.source, make, geo.schedule, geo.layers, geo.heads)
    budget: Budget | None = None
    groups: Groups | None = None
    if selection is not None:
        try:
            budget, groups = selection_budget(selection, geo.schedule, geo.layers, geo.heads)
        except ValueError as e:
            raise PlanError(f"{plan.source}: method {plan.method}: {e}") from None
    return PlanMemory(
        geo.history_before(),
        geo.history_before(budget, groups),
        geo.sweep_peaks(),
        geo.sweep_peaks(budget, groups),
    )
