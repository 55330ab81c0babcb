"""The baselines' rules that the reference test (test_selection_reference.py) does not reach:
PyramidKV's caps where they are clipped to the cache and at their boundaries, PyramidKV's own
kernel, H2O's explicit recent window, budgets equal to what is always kept, and a budget equal
to the whole cache. Expectations are hand-computed or plain loops."""

from __future__ import annotations

import math

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

INFINITY_1M = Schedule.square((1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64))


def _call(layer: int = 0) -> ScaleCall:
    return ScaleCall(layer=layer, si=7, schedule=INFINITY_1M, cond_rows=1, scale=0.4)


@pytest.mark.parametrize(
    ("length", "caps"),
    [
        (87, [60, 60, 60, 60]),  # under 2n = 88 rows: SnapKV's uniform budget
        (88, [88, 70, 52, 34]),  # 2n: max clipped to 88-16 = 72, min 16, steps 18
        (100, [100, 74, 48, 22]),  # max 84, min 4, steps 26
        (121, [102, 74, 46, 18]),  # no clip: max 86, min 2, steps 28
    ],
)
def test_pyramidkv_caps_per_layer_with_and_without_the_clip(length, caps):
    """Budget 60, window 16 (n = 44), β 20: min = 2, max = 86 unless 86 ≥ length − 16."""
    sel = PyramidKVSelection(60, layers=4)
    assert [sel.budget(_call(layer), 0, length) for layer in range(4)] == caps


def test_pyramidkv_needs_two_layers_and_accepts_two():
    with pytest.raises(PlanError, match="pyramidkv needs at least 2 layers, got 1"):
        PyramidKVSelection(60, layers=1)
    sel = PyramidKVSelection(60, layers=2)  # 121 rows: max 86, min 2, one step of 84
    assert [sel.budget(_call(layer), 0, 121) for layer in range(2)] == [102, 18]


def _snap_reference(q, k, window: int, kernel: int, budget: int) -> list[list[list[int]]]:
    """SnapKV by hand: the last ``window`` rows' softmax votes summed, the window's own votes 0,
    average pooling (zero padding), the best ``budget − window`` others plus the window."""
    batch, heads, n, _ = q.shape
    length = k.shape[2]
    wins = list(range(length - window, length))
    out = []
    for b in range(batch):
        per_head = []
        for h in range(heads):
            votes = [0.0] * length
            for i in wins:
                logits = [
                    float(q[b, h, i - (length - n)] @ k[b, h, j]) * 0.4 for j in range(length)
                ]
                top = max(logits)
                z = sum(math.exp(x - top) for x in logits)
                for j in range(length):
                    votes[j] += 0.0 if j in wins else math.exp(logits[j] - top) / z
            half = kernel // 2
            pooled = [
                sum(votes[i] for i in range(j - half, j + half + 1) if 0 <= i < length) / kernel
                for j in range(length)
            ]
            others = sorted((j for j in range(length) if j not in wins), key=lambda j: -pooled[j])
            per_head.append(sorted(others[: budget - window] + wins))
        out.append(per_head)
    return out


def test_pyramidkv_pools_with_its_own_kernel():
    """Kernel 3 (not the default 5); 45 rows, under 2n = 48: the uniform budget of 30."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 2, 20, 4, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 45, 4, generator=g, dtype=torch.float64)
    kept = PyramidKVSelection(30, layers=4, window=6, kernel=3).keep(_call(), 0, q, k, k)
    assert kept.tolist() == _snap_reference(q, k, window=6, kernel=3, budget=30)


def test_h2o_keeps_the_recent_window_it_is_given():
    """``recent=3`` of a budget of 10: the last 3 rows and the 7 others with the most attention
    from every current query (summed softmax rows, by hand)."""
    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 2, 6, 4, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 25, 4, generator=g, dtype=torch.float64)
    kept = H2OSelection(10, recent=3).keep(_call(), 0, q, k, k)
    for h in range(2):
        mass = [0.0] * 25
        for i in range(6):
            logits = [float(q[0, h, i] @ k[0, h, j]) * 0.4 for j in range(25)]
            z = sum(math.exp(x) for x in logits)
            for j in range(25):
                mass[j] += math.exp(logits[j]) / z
        others = sorted(range(22), key=lambda j: -mass[j])[:7]
        assert kept[0, h].tolist() == sorted(others + [22, 23, 24])


def test_budgets_equal_to_what_is_always_kept_are_allowed():
    """A budget may equal the mandatory rows (sinks, the window) and be one row."""
    k = torch.randn(1, 1, 40, 4, dtype=torch.float64)
    q = k[:, :, -16:]
    assert StreamingSelection(5).keep(_call(), 0, q, k, k).tolist() == [[[0, 1, 2, 3, 4]]]
    assert SnapKVSelection(16).keep(_call(), 0, q, k, k).tolist() == [[list(range(24, 40))]]
    assert SlidingWindowSelection(1).keep(_call(), 0, q, k, k).tolist() == [[[39]]]


def test_a_budget_of_the_whole_cache_is_refused_and_one_row_less_is_not():
    total = INFINITY_1M.total  # 10521
    with pytest.raises(PlanError, match=r"budget of 10521 tokens .* \(10521 tokens\)"):
        SnapKVSelection(total).check(INFINITY_1M, layers=2)
    SnapKVSelection(total - 1).check(INFINITY_1M, layers=2)
