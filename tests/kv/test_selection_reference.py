"""ScaleKV (released and paper) and the baselines against slow per-(row, head) loops written
from research/var.md §2.1.3 and §2.3 on random inputs (§3.2 items 5, 7, 8, 11)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from diffcache.errors import PlanError
from diffcache.kv import ScaleCall, Schedule
from diffcache.kv.baselines import (
    H2OSelection,
    PyramidKVSelection,
    SlidingWindowSelection,
    SnapKVSelection,
    StreamingSelection,
)
from diffcache.kv.scalekv import ScaleKVSelection
from diffcache.kv.scalekv_budgets import ScaleBudget, ScaleKVBudgets
from diffcache.kv.select import (
    after_length_exceeds,
    centroid_window,
    every_scale_from,
    recent_scale,
    sink_scales,
)

INFINITY_1M = Schedule.square((1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64))
CASES = {121: (4, 60), 921: (7, 300)}  # cache length: (scale si whose map ends it, budget)
B, H, D = 4, 4, 8


# ---- the slow reference: one (row, head) at a time, plain Python over numpy rows ----


def ref_window(side: int, length: int, size: int = 16) -> list[int]:
    """Centroids of a 4×4 patch grid of the last side×side rows; last 16 rows if side < 4."""
    grid = int(math.sqrt(size))
    if side < grid:
        return list(range(length - size, length))
    patch = side // grid
    start = length - side * side
    out = []
    for i in range(grid):
        for j in range(grid):
            out.append(start + (i * patch + (patch - 1) // 2) * side + j * patch + (patch - 1) // 2)
    return out


def ref_pool(x: list[float], kind: str, kernel: int = 5) -> list[float]:
    out = []
    for j in range(len(x)):
        span = [
            x[i] if 0 <= i < len(x) else None for i in range(j - kernel // 2, j + kernel // 2 + 1)
        ]
        if kind == "max":
            out.append(max(s for s in span if s is not None))
        else:
            out.append(sum(s for s in span if s is not None) / kernel)
    return out


def softmax_rows(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def ref_scores(method: str, q, k, raw, window, b: int, h: int, scale: float) -> list[float]:
    """The pooled score of every cache row for (row ``b``, head ``h``) by the rule of ``method``
    (the window's rows get none)."""
    length, n = k.shape[2], q.shape[2]
    kk = k[b, h].numpy()
    if method == "h2o":  # every current query's softmax attention, summed; no pooling
        probs = softmax_rows(q[b, h].numpy() @ kk.T * scale)
        return [float(probs[:, j].sum()) for j in range(length)]
    queries = [i - (length - n) for i in window]
    if method == "released":  # raw logits of the re-projected query, −inf window, max pool
        logits = raw[b, h].numpy()[queries] @ kk.T / math.sqrt(kk.shape[1])
        votes = [float("-inf") if j in window else float(logits[:, j].sum()) for j in range(length)]
        return ref_pool(votes, "max")
    # paper, snapkv, pyramidkv: softmax votes of the model's query, the window gets 0, avg pool
    probs = softmax_rows(q[b, h].numpy()[queries] @ kk.T * scale)
    votes = [0.0 if j in window else float(probs[:, j].sum()) for j in range(length)]
    return ref_pool(votes, "avg")


def assert_top_budget(kept: list[int], scores: list[float], fixed: list[int], budget: int) -> None:
    """``kept`` is ``fixed`` plus ``budget − |fixed|`` rows no other row outscores, ascending.
    (Max pooling makes plateaus of equal scores; any of a tied group at the boundary may win.)"""
    assert kept == sorted(set(kept)) and len(kept) == budget and set(fixed) <= set(kept)
    chosen = [scores[j] for j in kept if j not in fixed]
    dropped = [scores[j] for j in range(len(scores)) if j not in set(kept)]
    assert not dropped or min(chosen) >= max(dropped) - 1e-12


def check_against_reference(method, kept, q, k, raw, window, budget, scale) -> None:
    length = k.shape[2]
    for b in range(k.shape[0]):
        for h in range(k.shape[1]):
            got = kept[b, h].tolist()
            if method == "streaming":
                assert got == sorted(set(range(5)) | set(range(length - (budget - 5), length)))
            elif method == "sliding":
                assert got == list(range(length - budget, length))
            else:
                fixed = list(range(length - budget // 2, length)) if method == "h2o" else window
                scores = ref_scores(method, q, k, raw, window, b, h, scale)
                assert_top_budget(got, scores, fixed, budget)


def ref_pyramid_budget(budget: int, window: int, layer: int, layers: int, length: int) -> int:
    n = budget - window
    if length < 2 * n:
        return budget
    lo, hi = n // 20, 2 * n - n // 20
    if hi >= length - window:
        hi, lo = length - window, 2 * n - (length - window)
    return hi - layer * ((hi - lo) // (layers - 1)) + window


# ---- the vectorised selections ----


def inputs(length: int, seed: int):
    si = CASES[length][0]
    n = INFINITY_1M.tokens(si)
    g = torch.Generator().manual_seed(seed)
    q, raw = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for _ in "qr")
    k = torch.randn(B, H, length, D, generator=g, dtype=torch.float64)
    call = ScaleCall(
        layer=1, si=si, schedule=INFINITY_1M, cond_rows=B // 2, scale=0.3, raw_query=lambda: raw
    )
    return call, q, k, raw


def scalekv(variant: str, budget: int, si: int, **kw) -> ScaleKVSelection:
    plan = ScaleKVBudgets(budget, (ScaleBudget(si, "DD", budget, budget),))
    return ScaleKVSelection(plan, variant, base_capacity=100, **kw)


def selection(method: str, length: int):
    si, budget = CASES[length]
    return {
        "released": lambda: scalekv("released", budget, si),
        "paper": lambda: scalekv("paper", budget, si),
        "snapkv": lambda: SnapKVSelection(budget),
        "pyramidkv": lambda: PyramidKVSelection(budget, layers=4),
        "streaming": lambda: StreamingSelection(budget),
        "sliding": lambda: SlidingWindowSelection(budget),
        "h2o": lambda: H2OSelection(budget),
    }[method]()


METHODS = ["released", "paper", "snapkv", "pyramidkv", "streaming", "sliding", "h2o"]


@pytest.mark.parametrize("length", [121, 921])
@pytest.mark.parametrize("method", METHODS)
def test_kept_indices_match_the_slow_reference(method, length):
    call, q, k, raw = inputs(length, seed=len(method))
    sel = selection(method, length)
    kept = sel.keep(call, 0, q, k, k)
    side = INFINITY_1M.sizes[call.si][0]
    budget = CASES[length][1]
    if method in ("released", "paper"):
        window = ref_window(side, length)
    else:
        window = list(range(length - 16, length))
    if method == "pyramidkv":
        budget = ref_pyramid_budget(budget, 16, call.layer, 4, length)
        assert budget != CASES[length][1]  # the per-layer cap, not the uniform budget
    check_against_reference(method, kept, q, k, raw, window, budget, call.scale)


@pytest.mark.parametrize(
    ("side", "rows"),
    [(20, [2, 7, 12, 17]), (24, [2, 8, 14, 20]), (32, [3, 11, 19, 27]), (64, [7, 23, 39, 55])],
)
def test_centroid_window_geometry(side, rows):
    """research/var.md §2.1.3 / §3.2 item 8: the released centroids of square maps."""
    sched = Schedule.square((1, side))
    call = ScaleCall(layer=0, si=1, schedule=sched, cond_rows=1)
    got = centroid_window(call, 1 + side * side).tolist()
    assert got == [1 + r * side + c for r in rows for c in rows]


@pytest.mark.parametrize("hw", [(2, 2), (3, 3), (2, 16), (16, 3)])
def test_small_or_thin_maps_fall_back_to_the_last_16_rows(hw):
    sched = Schedule(((1, 1), (4, 4), hw))
    length = sched.total
    call = ScaleCall(layer=0, si=2, schedule=sched, cond_rows=1)
    assert centroid_window(call, length).tolist() == list(range(length - 16, length))


def test_non_square_maps_are_gridded_over_their_own_sides():
    """8×12: patches of 2×3, centroids rows {0, 2, 4, 6}, columns {1, 4, 7, 10}."""
    call = ScaleCall(layer=0, si=0, schedule=Schedule(((8, 12),)), cond_rows=1)
    assert centroid_window(call, 96).tolist() == [
        r * 12 + c for r in (0, 2, 4, 6) for c in (1, 4, 7, 10)
    ]


@pytest.mark.parametrize("method", ["released", "paper", "snapkv", "h2o"])
def test_cfg_rows_choose_independently(method):
    """§3.2 item 11: swapping the conditional and unconditional rows swaps the kept sets."""
    call, q, k, raw = inputs(121, seed=11)
    swap = torch.tensor([2, 3, 0, 1])
    kept = selection(method, 121).keep(call, 0, q, k, k)
    call_s = dataclasses.replace(call, raw_query=lambda: raw[swap])
    kept_s = selection(method, 121).keep(call_s, 0, q[swap], k[swap], k[swap])
    assert torch.equal(kept_s, kept[swap])
    assert not torch.equal(kept[0], kept[2])  # the rows did choose differently


def test_window_is_always_kept_and_budget_is_exact():
    """§3.2 items 4, 5: exactly the budget, the 16 centroids among the kept rows."""
    call, q, k, raw = inputs(921, seed=2)
    kept = selection("released", 921).keep(call, 0, q, k, k)
    assert kept.shape == (B, H, 300)
    window = set(ref_window(20, 921))
    assert all(window <= set(row) for row in kept.flatten(0, 1).tolist())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SnapKVSelection(10), "below the 16 tokens"),
        (lambda: StreamingSelection(4), "below the 5 tokens"),
        (lambda: scalekv("paper", 8, 4), "below the 16-token observation window"),
    ],
)
def test_budget_below_the_mandatory_set_is_one_error(make, message):
    with pytest.raises(PlanError, match=message):
        make()


def test_budget_above_the_whole_cache_is_one_error():
    with pytest.raises(PlanError, match=r"not below the whole cache .*\(10521 tokens\)"):
        SnapKVSelection(20000).check(INFINITY_1M, layers=32)


def test_released_variant_needs_the_reprojected_query():
    call, q, k, _ = inputs(121, seed=1)
    call = dataclasses.replace(call, raw_query=None)
    with pytest.raises(PlanError, match="re-projected query"):
        selection("released", 121).keep(call, 0, q, k, k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_selections_run_on_the_device_tensors_live_on(method):
    """Index tensors built on the CPU (windows, sinks, recent) follow k to the GPU."""
    call, q, k, raw = inputs(921, seed=3)
    q, k, raw = q.cuda(), k.cuda(), raw.cuda()
    call = dataclasses.replace(call, raw_query=lambda: raw)
    kept = selection(method, 921).keep(call, 0, q, k, k)
    assert kept.device == k.device
    budget = CASES[921][1]
    if method == "pyramidkv":
        budget = ref_pyramid_budget(budget, 16, call.layer, 4, 921)
    window = ref_window(20, 921) if method in ("released", "paper") else list(range(905, 921))
    check_against_reference(method, kept.cpu(), q.cpu(), k.cpu(), raw.cpu(), window, budget, 0.3)


def test_scale_mandatory_sets_and_triggers():
    """HACK's structural parts: the first two maps (1 + 4 tokens) and the current map; the
    ScaleKV trigger is the cumulative length exceeding the base, every_scale_from a plain si."""
    call = ScaleCall(layer=0, si=7, schedule=INFINITY_1M, cond_rows=1)
    assert sink_scales(call, 700, 2).tolist() == [0, 1, 2, 3, 4]
    assert recent_scale(call, 700).tolist() == list(range(300, 700))  # the 20×20 map
    exceeds = [after_length_exceeds(dataclasses.replace(call, si=si), 650) for si in (6, 7)]
    assert exceeds == [False, True]  # cumulative 521, 921
    every = [every_scale_from(dataclasses.replace(call, si=si), 7) for si in (6, 7, 8)]
    assert every == [False, True, True]
