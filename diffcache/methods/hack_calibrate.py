"""HACK's offline side: the head classes of a model, from the plain run's attention maps.

The recorder (:class:`~diffcache.kv.recorder.HistoryRecorder` on the history seam) takes each
layer's queries and keys at the last scale of every calibration generation and sums HACK's
column variance per (layer, head) over them (:func:`~diffcache.kv.head_stats.column_variance`,
over every attention row: CFG's unconditional twins included); the ``ALPHA`` fraction of heads
with the lowest variance over all layers become contextual, the rest structural
(:func:`~diffcache.kv.head_stats.classify_heads`). The budget is the config's (``budget`` or
``compression``; ``diffcache profile --target-kv`` sets it), split into ``B_C``/``B_S`` at run
time from the classes.
"""

from __future__ import annotations

from typing import Any

import torch

from diffcache.calibration import register_calibrator
from diffcache.errors import DiffCacheError, PlanError
from diffcache.kv.hack import CONTEXTUAL, STRUCTURAL
from diffcache.kv.head_stats import classify_heads, column_variance
from diffcache.kv.history import ScaleCall
from diffcache.kv.history_method import target_shape
from diffcache.kv.recorder import HistoryRecorder
from diffcache.methods.base import Calibrated
from diffcache.methods.hack import HACKCalibration, HACKConfig

#: the contextual fraction of heads (research/var.md §2.2.5: HACK's value is not published;
#: its worked example uses 0.5)
ALPHA = 0.5


def last_scale_variance(call: ScaleCall, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """HACK's column variance ``[H]`` of one layer at the last scale, summed over the attention
    rows; None at the other scales."""
    if call.si != len(call.schedule) - 1:
        return None
    return column_variance(q, k, call.scale).sum(0)


def observer(cfg: HACKConfig, target: Any) -> HistoryRecorder:
    """The recorder of the plain profiling run, once the budget is known to fit the model."""
    _check_budget(cfg, target)
    return HistoryRecorder(cfg.name, last_scale_variance)


@register_calibrator(HACKConfig, observer=observer)
def calibrate(cfg: HACKConfig, profiling: Any) -> Calibrated:
    """Classify the heads by the variance table the plain run recorded, and measure the plan
    (compute and history KV fractions) on the same requests."""
    variance = profiling.trace.observed.get("sums")
    if variance is None:
        raise DiffCacheError(
            "hack: no last-scale attention was recorded; is it a next-scale model?"
        )
    classes = classify_heads(variance, ALPHA)
    calibration = HACKCalibration(tuple(tuple(int(c) for c in row) for row in classes.tolist()))
    layers, heads = classes.shape
    measured = {
        **profiling.measure(cfg, calibration),
        "alpha": ALPHA,
        "heads": [layers, heads],
        "contextual_heads": int((classes == CONTEXTUAL).sum()),
        "calibration_generations": len(profiling.requests),
    }
    return Calibrated(cfg, calibration, measured=measured)


def _check_budget(cfg: HACKConfig, target: Any) -> None:
    """Refuse, before the recording, a budget the structural heads cannot keep on the model's
    schedule: the split depends on how many heads are contextual (``round(ALPHA·L·H)``), not
    on which, so any classes of that count decide it."""
    schedule, layers, heads = target_shape(target)
    contextual = round(ALPHA * layers * heads)
    flat = [CONTEXTUAL if i < contextual else STRUCTURAL for i in range(layers * heads)]
    classes = tuple(tuple(flat[i : i + heads]) for i in range(0, len(flat), heads))
    try:
        selection = cfg.make(HACKCalibration(classes), schedule, layers, heads)
        if selection is not None:
            selection.check(schedule, layers)
    except (PlanError, ValueError) as e:
        raise DiffCacheError(
            f"{e} (lower the compression or set recent_cap / first_scales with --option)"
        ) from None
