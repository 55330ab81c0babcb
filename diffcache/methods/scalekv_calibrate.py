"""ScaleKV's offline side: drafter and refiner layers per scale from the plain run's attention,
and their budgets (research/var.md §2.1.1; the released code has no profiler).

The recorder (:class:`~diffcache.kv.recorder.HistoryRecorder` on the history seam) takes the
Attention Selectivity Index of every (layer, scale) of each calibration generation
(:func:`~diffcache.kv.head_stats.selectivity`, history top-``TOP_K`` mass, averaged over heads
and attention rows) and averages it over the generations. The budget that the history before
scale ``k`` holds is set by the compression after scale ``k − 1``, so that compression takes the
roles of scale ``k``: the ASI of scales ``1 .. K−1`` (scale 0 has no history) is Z-scored per
scale (:func:`~diffcache.kv.head_stats.zscore`), the ``DRAFTERS`` fraction of lowest pairs are
drafters (:func:`~diffcache.kv.head_stats.drafters`) and Eq. 4 gives the budgets
(:func:`~diffcache.kv.head_stats.scalekv_budgets`, ``balance="scale"``): refiners start at
``REFINER_START`` of the average and decay linearly to ``REFINER_END`` of it at the last
compression, each refiner budget rounded down to the nearest whole number of rows at which the
drafters' share is whole too (Eq. 4 exactly, as the plan format requires). None of these
hyper-parameters is published (§2.1.6): they are this reconstruction's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from diffcache.calibration import register_calibrator
from diffcache.errors import DiffCacheError, PlanError
from diffcache.kv.head_stats import drafters, scalekv_budgets, selectivity, zscore
from diffcache.kv.history import ScaleCall
from diffcache.kv.history_method import target_shape, token_budget
from diffcache.kv.recorder import HistoryRecorder
from diffcache.methods.base import Calibrated
from diffcache.methods.scalekv import ScaleKVConfig, ScaleKVScale

#: the history top-K′ of the ASI (clipped to the history), the fraction of (layer, scale) pairs
#: that are drafters, and the refiner budget at the first and last compression (of the average)
TOP_K, DRAFTERS, REFINER_START, REFINER_END = 16, 0.25, 0.9, 0.5


def scale_selectivity(call: ScaleCall, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The ASI of one layer at scale ``call.si``, as a ``[K]`` vector zero elsewhere."""
    out = torch.zeros(len(call.schedule), dtype=torch.float64)
    history = call.schedule.start(call.si)
    out[call.si] = selectivity(q, k, history, TOP_K, call.scale).mean()
    return out


def roles_and_budgets(asi: torch.Tensor, average: int) -> tuple[ScaleKVScale, ...]:
    """The compressions after scales ``0 .. K−2`` from the ASI table ``[L, K]``."""
    layers, scales = asi.shape
    z = zscore(asi[:, 1:])
    roles = drafters(z, max(1, round(DRAFTERS * z.numel())))
    steps = scales - 1
    start = math.floor(REFINER_START * average)
    delta = (start - math.floor(REFINER_END * average)) // max(steps - 1, 1)
    out = []
    for k in range(steps):
        column = roles[:, k : k + 1]
        n_d = int(column.sum())
        refiner = start - delta * k
        if n_d:  # Eq. 4 in whole rows: B_r ≡ average (mod n_d / gcd(L − n_d, n_d))
            step = n_d // math.gcd(layers - n_d, n_d)
            refiner -= (refiner - average) % step
        try:
            drafter, kept = scalekv_budgets(column, average, refiner, 0)
        except ValueError as e:
            raise DiffCacheError(
                f"scalekv: no drafter layer at scale {k + 1} ({e}); give a larger budget"
            ) from None
        if kept[0] < 1:
            raise DiffCacheError(f"scalekv: an average of {average} rows leaves refiners none")
        letters = "".join("D" if d else "R" for d in column[:, 0].tolist())
        out.append(ScaleKVScale(k, letters, max(drafter[0], 1), kept[0]))
    return tuple(out)


def _average(cfg: ScaleKVConfig, schedule: Any) -> int:
    average = token_budget(cfg.average, cfg.ratio, schedule)
    if average is None:
        raise DiffCacheError(
            "scalekv: profiling sets drafter and refiner budgets around an average; give "
            "--target-kv R or --option average=N"
        )
    return average


def observer(cfg: ScaleKVConfig, target: Any) -> HistoryRecorder:
    """The recorder of the plain profiling run, once the budget is known to fit the model."""
    schedule, layers, heads = target_shape(target)
    _average(cfg, schedule)
    _fits(cfg, schedule, layers, heads)
    return HistoryRecorder(cfg.name, scale_selectivity)


@register_calibrator(ScaleKVConfig, observer=observer)
def calibrate(cfg: ScaleKVConfig, profiling: Any) -> Calibrated:
    """Pick the roles and budgets per scale from the ASI table the plain run recorded, and
    measure the plan on the same requests."""
    schedule, layers, heads = target_shape(profiling.target)
    average = _average(cfg, schedule)
    sums = profiling.trace.observed.get("sums")
    if sums is None:
        raise DiffCacheError("scalekv: no attention was recorded; is it a next-scale model?")
    asi = sums / len(profiling.requests)
    config = dataclasses.replace(cfg, scales=roles_and_budgets(asi, average))
    _fits(config, schedule, layers, heads)
    measured = {
        **profiling.measure(config),
        "average": average,
        "drafters": sum(s.roles.count("D") for s in config.scales),
        "top_k": TOP_K,
        "calibration_generations": len(profiling.requests),
    }
    return Calibrated(config, measured=measured)


def _fits(cfg: ScaleKVConfig, schedule: Any, layers: int, heads: int) -> None:
    """Refuse budgets the selection cannot keep on the model's schedule (one line)."""
    try:
        selection = cfg.make(None, schedule, layers, heads)
        check = getattr(selection, "check", None)
        if check is not None:
            check(schedule, layers)
    except (PlanError, ValueError) as e:
        raise DiffCacheError(f"scalekv: {e} (set window or the budget with --option)") from None
