"""ScaleKV (Li, Chen, Yang, Hwang, "Memory-Efficient Visual Autoregressive Modeling with
Scale-Aware KV Cache Compression", arXiv 2505.19602; code StargazerX0/ScaleKV) on next-scale
models (VAR, Infinity).

Rules (:mod:`diffcache.kv.scalekv`, research/var.md §2.1): after each scale's attention, once
the cache has exceeded ``base_capacity`` rows, every layer keeps its budget for the next scale:
the ``window`` centroid tokens of the current map plus the best-scored other rows. Drafter
layers keep ``drafter`` rows, refiners ``refiner``, per compressed scale (``scales``: the
released budget files, imported by ``diffcache plans import scalekv``); without ``scales``
every layer keeps ``average`` (or ``ratio`` of the history before the last scale) at every
compression. Neither ``average`` nor ``ratio``: unlimited (the plain model).

``variant="released"`` scores as the released code (raw window logits of the re-projected query,
max pooling); ``"paper"`` as Eq. 5 (softmax of the model's query, average pooling); ``pooling``
overrides the variant's. Deliberate differences from the released code are listed in
:mod:`diffcache.kv.scalekv` (the extra compression after the last scale only with
``reference_compat``). ``compute_fraction`` is the attention work kept (kind ``attn_pair``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from diffcache.errors import PlanError
from diffcache.kv.history import Schedule
from diffcache.kv.history_method import attach_selection, token_budget
from diffcache.kv.scalekv import ScaleKVSelection
from diffcache.kv.scalekv_budgets import (
    RELEASED_AVERAGE,
    ScaleBudget,
    ScaleKVBudgets,
    read_scalekv_json,
)
from diffcache.methods.base import HistoryKVConfig, option
from diffcache.plan import Plan
from diffcache.registry import register_method


@dataclasses.dataclass(frozen=True)
class ScaleKVScale:
    """The budgets of the compression after 0-based scale ``after_scale``: one role letter per
    layer, ``D`` (drafter) or ``R`` (refiner)."""

    after_scale: int = option(doc="0-based scale after which this compression runs", min=0)
    roles: str = option(doc="one letter per layer: D drafter, R refiner")
    drafter: int = option(doc="rows a drafter layer keeps (the released files' Max)", min=1)
    refiner: int = option(doc="rows a refiner layer keeps (the released files' Min)", min=1)


@dataclasses.dataclass(frozen=True)
class ScaleKVConfig(HistoryKVConfig):
    """Options of ScaleKV (defaults: the released code's selection, unlimited budget)."""

    name: ClassVar[str] = "scalekv"
    kernels: ClassVar[tuple[str, ...]] = ("kv_compact", "window_scores")

    variant: Literal["released", "paper"] = option("released", "scoring rule (see docstring)")
    average: int | None = option(None, "rows per head and layer on average (None: all)", min=1)
    ratio: float | None = option(
        None, "or the average as this fraction of the history before the last scale", min=0.0
    )
    scales: tuple[ScaleKVScale, ...] = option(
        (), "per-compression drafter / refiner budgets (empty: every layer keeps the average)"
    )
    base_capacity: int | None = option(
        None, "compress once the cache has exceeded this many rows (None: the average)", min=0
    )
    window: int = option(16, "observation window: centroids of a sqrt x sqrt grid", min=1)
    kernel: int = option(5, "pooling kernel (odd)", min=1)
    pooling: Literal["max", "avg"] | None = option(None, "pooling (None: the variant's)")
    reference_compat: bool = option(False, "also compress after the last scale, as released")

    @classmethod
    def identity(cls) -> ScaleKVConfig:
        return cls()

    @classmethod
    def aggressive(cls) -> ScaleKVConfig:
        return cls(average=4, window=4)

    def kv_target(self, fraction: float) -> ScaleKVConfig:
        """``ratio=fraction`` on average over the layers, without per-scale tables (the
        calibrator makes them): the budgets before the last scale average ``floor(fraction·T)``
        rows per head and layer (a layer holds fewer when it had fewer to keep)."""
        return dataclasses.replace(self, average=None, ratio=fraction, scales=())

    @classmethod
    def from_budgets(cls, budgets: ScaleKVBudgets) -> ScaleKVConfig:
        """The released rule with these per-scale drafter / refiner budgets."""
        scales = tuple(
            ScaleKVScale(s.applies_after_si, s.roles, s.drafter, s.refiner) for s in budgets.scales
        )
        return cls(average=budgets.average, scales=scales)

    def budgets(self, schedule: Schedule, layers: int) -> ScaleKVBudgets | None:
        """The per-(scale, layer) budgets on this model; None: unlimited."""
        average = token_budget(self.average, self.ratio, schedule)
        if average is None:
            return None
        if average >= schedule.total:
            raise PlanError(
                f"scalekv average budget of {average} rows is not below the whole cache of "
                f"{schedule.total} rows: it would keep everything"
            )
        last = len(schedule) - 1
        late = [s.after_scale for s in self.scales if s.after_scale >= last]
        if late:
            raise PlanError(
                f"scalekv budgets after scale {late[0]}, but the model's schedule has "
                f"{len(schedule)} scales (compressions after scales 0..{last - 1})"
            )
        if not self.scales:
            uniform = tuple(ScaleBudget(si, "R" * layers, average, average) for si in range(last))
            return ScaleKVBudgets(average, uniform)
        roles = [s for s in self.scales if len(s.roles) != layers]
        if roles:
            raise PlanError(
                f"scalekv budgets after scale {roles[0].after_scale} have roles for "
                f"{len(roles[0].roles)} layers, the model has {layers}"
            )
        scales = tuple(
            ScaleBudget(s.after_scale, s.roles, s.drafter, s.refiner) for s in self.scales
        )
        return ScaleKVBudgets(average, scales)

    def make(
        self, calibration: None, schedule: Schedule, layers: int, heads: int
    ) -> ScaleKVSelection | None:
        budgets = self.budgets(schedule, layers)
        if budgets is None:
            return None
        return ScaleKVSelection(
            budgets,
            self.variant,
            base_capacity=self.base_capacity,
            window=self.window,
            kernel=self.kernel,
            reference_compat=self.reference_compat,
            pooling=self.pooling,
        )


def import_budgets(path: str, depth: int, family: str, average: int = RELEASED_AVERAGE) -> Plan:
    """A plan of family ``family`` from a budget file of the released format
    (``budgets/{2b,8b}_10%_budget.json`` of StargazerX0/ScaleKV) for a ``depth``-layer model."""
    config = ScaleKVConfig.from_budgets(read_scalekv_json(path, depth, average))
    source = f"ScaleKV budget file {path} (released format: StargazerX0/ScaleKV budgets/)"
    return Plan(family, config.name, config.to_options(), provenance={"source": source})


register_method(ScaleKVConfig)(attach_selection)  # the selection is the whole method
