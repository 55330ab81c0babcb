"""HACK (Qin et al., "Head-Aware KV Cache Compression for Efficient Visual Autoregressive
Modeling", arXiv 2504.09261, AAAI 2026) on next-scale models (VAR, Infinity), variant
``reconstructed``.

Rules (:mod:`diffcache.kv.hack`, research/var.md §2.2.3): every layer's heads are split, by an
offline profile (the plan's calibration ``classes``, layers x heads, 0 contextual / 1
structural, made with :func:`diffcache.kv.head_stats.classify_heads`), into contextual heads
that keep the top ``B_C`` rows by subset attention and structural heads that always keep the
first scales and the most recent one and fill ``B_S`` rows by subset attention; at the last
scale the contextual heads' evicted rows are merged into the kept ones (LOOK-M pivot).

HACK's code is not public: every open question of research/var.md §2.2.5 is an option here
(:class:`~diffcache.kv.hack.HACKOptions` says what each means and why its default). The average
budget ``B`` is ``budget`` rows, or the compression ratio ``compression`` mapped by
:func:`~diffcache.kv.head_stats.hack_budget` against ``reference`` (the final total length or
the history the last scale sees); ``B_C / B_S = contextual_ratio`` with
``alpha·B_C + (1 − alpha)·B_S = B`` (``alpha`` the contextual fraction of the classes). Neither
``budget`` nor ``compression``: unlimited (the plain model). ``compute_fraction`` is the
attention work kept (kind ``attn_pair``): with ``when="pre"`` the queries attend only to the
kept rows.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from diffcache.errors import PlanError
from diffcache.kv.hack import STRUCTURAL, HACKOptions, HACKSelection
from diffcache.kv.head_stats import hack_budget, split_budget
from diffcache.kv.history import Schedule
from diffcache.kv.history_method import attach_selection
from diffcache.methods.base import HistoryKVConfig, option
from diffcache.registry import register_method


@dataclasses.dataclass(frozen=True)
class HACKCalibration:
    """The offline head profile: ``classes[layer][head]`` 0 (contextual) or 1 (structural)."""

    classes: tuple[tuple[int, ...], ...] = option(doc="layers x heads, 0 contextual, 1 structural")


@dataclasses.dataclass(frozen=True)
class HACKConfig(HistoryKVConfig):
    """Options of HACK, reconstructed (defaults: research/var.md §2.2.3's reading)."""

    name: ClassVar[str] = "hack"
    calibration: ClassVar[type] = HACKCalibration

    variant: Literal["reconstructed"] = option("reconstructed", "only the reconstruction exists")
    budget: int | None = option(None, "average rows per head B (None: see compression)", min=1)
    compression: float | None = option(
        None, "or the fraction of the cache dropped (HACK's 50%: 0.5)", min=0.0, max=0.999
    )
    reference: Literal["final", "history"] = option(
        "final", "what compression is a fraction of: the final total or the last history"
    )
    contextual_ratio: float = option(1.0, "B_C / B_S (open question: not published)", min=0.01)
    when: Literal["pre", "post"] = option("pre", "select before or after the scale's attention")
    first_scales: int = option(2, "structural heads always keep the first scales", min=0)
    recent: Literal["current", "previous"] = option("current", "the most recent scale kept")
    recent_cap: int | None = option(None, "keep only the recent scale's last N tokens", min=1)
    n_obs: int = option(32, "queries of the subset attention", min=1)
    sampling: Literal["stride", "random"] = option("stride", "how the subset queries are drawn")
    seed: int = option(0, "seed of random sampling", min=0)
    softmax_over: Literal["all", "candidates"] = option("all", "the subset softmax's rows")
    merge: Literal["none", "pivot"] = option("pivot", "merge evicted rows into kept ones")
    merge_heads: Literal["contextual", "structural", "all"] = option(
        "contextual", "the heads whose evicted rows are merged"
    )
    merge_at: Literal["last", "every"] = option("last", "merge at the last selection or every")
    scope: Literal["pair", "row"] = option("pair", "CFG rows of an image keep the same rows")
    start_scale: int = option(0, "no compression before this scale", min=0)

    @classmethod
    def identity(cls) -> HACKConfig:
        return cls()

    @classmethod
    def aggressive(cls) -> HACKConfig:
        return cls(compression=0.9, first_scales=1, recent_cap=1)

    def kv_target(self, fraction: float) -> HACKConfig:
        """``compression = 1 − fraction`` of the history the last scale sees: the average
        budget ``B = round(fraction·T)`` rows per head, split into ``B_C``/``B_S`` rounding
        down."""
        return dataclasses.replace(
            self, budget=None, compression=round(1 - fraction, 6), reference="history"
        )

    def options(self) -> HACKOptions:
        """The selection's answers to the open questions, as this config sets them."""
        return HACKOptions(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(HACKOptions)}
        )

    def average(self, schedule: Schedule) -> int | None:
        """The average budget B on this schedule; None: unlimited."""
        if self.budget is not None and self.compression is not None:
            raise PlanError(
                f"hack: give budget ({self.budget}) or compression ({self.compression}), not both"
            )
        if self.compression is not None:
            return hack_budget(self.compression, schedule, reference=self.reference)
        return self.budget

    def make(
        self, calibration: HACKCalibration, schedule: Schedule, layers: int, heads: int
    ) -> HACKSelection | None:
        """The selection for this model (its ``check`` runs at accelerate and for each
        generation's schedule), or None for the unlimited budget."""
        average = self.average(schedule)
        if average is None:
            return None
        if average >= schedule.total:
            raise PlanError(
                f"hack: budget of {average} rows per head is not below the whole cache of "
                f"{schedule.total} rows: it would keep everything"
            )
        rows = [len(r) for r in calibration.classes]
        if len(rows) != layers or set(rows) != {heads}:
            raise PlanError(
                f"hack: the calibration's head classes are for {len(rows)} layers x "
                f"{max(rows, default=0)} heads, the model has {layers} layers x {heads} heads"
            )
        flat = [c for r in calibration.classes for c in r]
        alpha = 1.0 - sum(c == STRUCTURAL for c in flat) / len(flat)
        contextual, structural = split_budget(average, alpha, self.contextual_ratio)
        return HACKSelection(
            calibration.classes, max(contextual, 1), max(structural, 1), self.options()
        )


register_method(HACKConfig)(attach_selection)  # the selection is the whole method
