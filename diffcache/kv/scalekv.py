"""ScaleKV as a :class:`~diffcache.kv.history.Selection` for the budgeted history store.

Li, Chen, Yang, Hwang, "Memory-Efficient Visual Autoregressive Modeling with Scale-Aware KV Cache
Compression" (arXiv 2505.19602; code StargazerX0/ScaleKV, MIT). After each scale's attention
(post), once the cache has exceeded ``base_capacity`` rows, each layer keeps its budget for the
next scale (drafter layers ``Max``, refiners ``Min``, :mod:`diffcache.kv.scalekv_budgets`): the
16 centroid tokens of the current map (the observation window, always kept, inside the budget)
plus the best-scored others from every scale, sorted in cache order. Scores are per (batch row,
head): CFG's rows choose on their own (research/var.md §2.1).

``variant="released"`` is the released code's rule: raw window logits (no softmax) with the query
re-projected from the attention input (``ScaleCall.raw_query``) scaled by ``1/√head_dim``, the
window at −inf before and after a 1-D max pool (kernel 5). ``variant="paper"`` is Eq. 5: the
model's query and softmax scale, softmax over the cache, average pooling. ``pooling`` overrides
the variant's pooling.

Deliberate differences from the released code:

- the window grid runs over the schedule's ``(h, w)`` (the code assumes a square map of side
  √tokens; identical on square maps) and token counts come from the schedule, not a hard-coded
  1M list;
- the ``has_reached_base`` flag is derived from the schedule (see
  :func:`~diffcache.kv.select.after_length_exceeds`), so nothing carries over between images;
- the extra compression after the last scale (the code's scale-12 quirk, generalised to the last
  scale, with the previous scale's budgets) runs only with ``reference_compat=True``;
- a budget below the window is an error (the code's window-only branch never fires with the
  released plans).
"""

from __future__ import annotations

import math

import torch

from diffcache.errors import PlanError
from diffcache.kv.history import ScaleCall, Schedule
from diffcache.kv.scalekv_budgets import ScaleKVBudgets
from diffcache.kv.select import (
    after_length_exceeds,
    centroid_window,
    pooled_window_scores,
    topk_with_mandatory,
)


class ScaleKVSelection:
    """ScaleKV's per-layer, per-scale top-k with a centroid observation window."""

    when = "post"

    def __init__(
        self,
        budgets: ScaleKVBudgets,
        variant: str = "released",
        *,
        base_capacity: int | None = None,
        window: int = 16,
        kernel: int = 5,
        reference_compat: bool = False,
        pooling: str | None = None,
    ) -> None:
        if variant not in ("released", "paper"):
            raise PlanError(f"ScaleKV variant {variant!r} is not one of 'released', 'paper'")
        small = [s for s in budgets.scales if min(s.drafter, s.refiner) < window]
        if small:
            raise PlanError(
                f"ScaleKV budget of {min(small[0].drafter, small[0].refiner)} rows after scale "
                f"{small[0].applies_after_si} is below the {window}-token observation window"
            )
        self.budgets = budgets
        self.variant = variant
        self.base_capacity = budgets.average if base_capacity is None else base_capacity
        self.window = window
        self.kernel = kernel
        self.pooling = pooling or ("max" if variant == "released" else "avg")
        self.reference_compat = reference_compat

    def check(self, schedule: Schedule, layers: int) -> None:
        """Raise PlanError unless the plan covers ``layers`` layers and every compression this
        schedule triggers (call before any work)."""
        if self.budgets.layers != layers:
            raise PlanError(
                f"ScaleKV budgets are for {self.budgets.layers} layers, the model has {layers}"
            )
        for si in range(len(schedule)):
            call = ScaleCall(layer=0, si=si, schedule=schedule, cond_rows=0)
            self.budget(call, 0, schedule.start(si + 1))

    def groups(self, layer: int, heads: int) -> list[list[int]]:
        return [list(range(heads))]

    def budget(self, call: ScaleCall, group: int, length: int) -> int | None:
        """Rows the layer keeps after this scale; None when ScaleKV does not compress now."""
        last = call.si == len(call.schedule) - 1
        if (last and not self.reference_compat) or not after_length_exceeds(
            call, self.base_capacity
        ):
            return None
        si = call.si - 1 if last else call.si
        budget = self.budgets.budget(si, call.layer)
        if budget is None:
            where = f" {self.budgets.source}" if self.budgets.source else ""
            raise PlanError(
                f"ScaleKV budgets{where} have no entry for the compression after "
                f"scale {si} (key 'Scale {si + 2}')"
            )
        return budget

    def keep(
        self, call: ScaleCall, group: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor | None:
        length = k.shape[2]
        budget = self.budget(call, group, length)
        if budget is None or length <= budget:
            return None
        window = centroid_window(call, length, self.window)
        if self.variant == "released":
            if call.raw_query is None:
                raise PlanError("ScaleKV variant 'released' needs the model's re-projected query")
            q, scale, softmax = call.raw_query(), 1 / math.sqrt(k.shape[-1]), False
        else:
            scale, softmax = call.scale, True
        scores = pooled_window_scores(call, q, k, window, scale, softmax, self.pooling, self.kernel)
        return topk_with_mandatory(scores, window, budget)
