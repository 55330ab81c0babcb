"""The parts of diffcache.kv.select on their own, against plain loops and hand-computed values:
the centroid grid, the scorers' dtype and window rules, the trigger's boundary, the short-cache
helpers and the refusals (the selections' own tests reach these only through the selections)."""

from __future__ import annotations

import math

import pytest
import torch

from diffcache.errors import PlanError
from diffcache.kv import ScaleCall, Schedule
from diffcache.kv.select import (
    accumulated_attention,
    after_length_exceeds,
    centroid_window,
    grid_centroids,
    last_rows,
    pool1d,
    sinks,
    topk_with_mandatory,
    window_logits,
    window_softmax,
)

INFINITY_1M = Schedule.square((1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64))


@pytest.mark.parametrize(
    ("h", "w", "rows", "cols"),
    [
        (20, 20, (2, 7, 12, 17), (2, 7, 12, 17)),  # research/var.md §2.1.3
        (10, 13, (0, 2, 4, 6), (1, 4, 7, 10)),  # patches of 2×3, sides not multiples of 4
        (4, 4, (0, 1, 2, 3), (0, 1, 2, 3)),  # exactly the grid: every token
    ],
)
def test_grid_centroids_are_integer_raster_indices_of_each_patch_centre(h, w, rows, cols):
    """Called directly: ``centroid_window`` caches the grid per map size, so a test through it
    runs this function once per process."""
    got = grid_centroids(h, w, 4)
    assert got == [r * w + c for r in rows for c in cols]
    assert all(type(i) is int for i in got)


@pytest.mark.parametrize("hw", [(3, 16), (16, 3), (3, 3)])
def test_grid_centroids_of_a_map_narrower_than_the_grid_on_either_side_is_none(hw):
    assert grid_centroids(*hw, 4) is None


def test_last_rows_and_sinks_of_a_cache_shorter_than_asked_are_all_its_rows():
    assert last_rows(5, 16).tolist() == [0, 1, 2, 3, 4]
    assert last_rows(20, 16).tolist() == list(range(4, 20))
    assert sinks(3, 5).tolist() == [0, 1, 2]


def test_the_trigger_needs_the_cache_to_exceed_the_base_not_reach_it():
    """The cache after scale 6 of the 1M schedule holds 1+4+16+36+64+144+256 = 521 rows."""
    call = ScaleCall(layer=0, si=6, schedule=INFINITY_1M, cond_rows=1)
    assert [after_length_exceeds(call, base) for base in (520, 521, 522)] == [True, False, False]


# ---- the scorers against plain loops over (row, head, query, cache row) in Python floats ----


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b, strict=True))


def _softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    e = [math.exp(x - top) for x in xs]
    return [x / sum(e) for x in e]


def ref_scores(kind: str, q, k, window: list[int], scale: float) -> torch.Tensor:
    """``kind`` "logits" / "softmax": the votes of the window rows that belong to the current
    map (``q`` holds its rows, the cache's last ones), the window's own rows −inf / 0;
    "accumulated": every query's softmax attention, summed."""
    batch, heads, n, _ = q.shape
    length = k.shape[2]
    out = torch.zeros(batch, heads, length, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            if kind == "accumulated":
                voters = range(n)
            else:
                voters = [i - (length - n) for i in window if i >= length - n]
            for i in voters:
                logits = [_dot(q[b, h, i], k[b, h, j]) * scale for j in range(length)]
                votes = logits if kind == "logits" else _softmax(logits)
                for j in range(length):
                    out[b, h, j] += votes[j]
            for j in window if kind != "accumulated" else ():
                out[b, h, j] = float("-inf") if kind == "logits" else 0.0
    return out


SCORERS = {
    "logits": lambda q, k, w, s: window_logits(q, k, w, s),
    "softmax": lambda q, k, w, s: window_softmax(q, k, w, s),
    "accumulated": lambda q, k, w, s: accumulated_attention(q, k, s),
}


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float64), (torch.float64, torch.float32)])
@pytest.mark.parametrize("kind", list(SCORERS))
def test_scores_are_fp64_when_either_input_is_fp64(kind, dtypes):
    """fp32 values widen to fp64 exactly, so the fp64 loop over the same values is the answer."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 2, 6, 4, generator=g).to(dtypes[0])
    k = torch.randn(2, 2, 15, 4, generator=g).to(dtypes[1])
    window = [9, 11, 14]
    got = SCORERS[kind](q, k, torch.tensor(window), 0.7)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref_scores(kind, q, k, window, 0.7), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["logits", "softmax"])
def test_a_window_longer_than_the_map_votes_with_every_query_of_the_map(kind):
    """SnapKV's last 16 rows over a 3×3 map: the map's 9 queries vote (its first included);
    the 7 earlier rows of the window have no query at this scale."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 2, 9, 4, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 30, 4, generator=g, dtype=torch.float64)
    window = list(range(14, 30))
    got = SCORERS[kind](q, k, torch.tensor(window), 0.5)
    torch.testing.assert_close(got, ref_scores(kind, q, k, window, 0.5), rtol=0, atol=1e-12)


# ---- the refusals a plan's options can reach, each naming the value given ----


def test_refusals_name_the_value_given():
    call = ScaleCall(layer=0, si=7, schedule=INFINITY_1M, cond_rows=1)
    scores = torch.zeros(1, 1, 10)
    with pytest.raises(PlanError, match="observation window size 15 is not a perfect square"):
        centroid_window(call, 921, 15)
    with pytest.raises(PlanError, match="pooling kernel 4 must be odd"):
        pool1d(scores, "max", 4)
    with pytest.raises(PlanError, match="pooling 'mean' is not one of 'max', 'avg'"):
        pool1d(scores, "mean", 3)
    with pytest.raises(PlanError, match="budget of 3 rows is below the 5 rows that must be kept"):
        topk_with_mandatory(scores, torch.arange(5), 3)
