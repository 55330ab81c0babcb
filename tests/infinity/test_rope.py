"""2-D RoPE, STAR normalisation (rope2d_normalized_by_hw=2), offset by the scale index."""

from __future__ import annotations

import math

import pytest
import torch

from diffcache.kv.history import Schedule
from diffcache.pipelines.infinity.schedule import (
    SQUARE_1M,
    apply_rope,
    rope_table,
    square_schedule,
)


def angle(i: int, j: int, hw: tuple[int, int], final: tuple[int, int], m: int, half: int) -> float:
    """Pair ``m``'s angle at token (i, j) of an h x w map, from research/var.md §1.2.3: grid
    row round(i H / h) for the first half of the pairs, column round(j W / w) for the rest,
    frequency 10000^(-2k / half)."""
    quarter = half // 2
    pos = round(i * final[0] / hw[0]) if m < quarter else round(j * final[1] / hw[1])
    return pos * 10000.0 ** (-2 * (m % quarter) / half)


@pytest.mark.parametrize(
    "sides, final, head_dim",
    [((1, 2, 4, 6, 8), (8, 8), 32), (SQUARE_1M[:7], (64, 64), 128)],
)
def test_table_matches_the_formula_at_each_scales_offset(sides, final, head_dim):
    sched = Schedule.square(sides)
    table = rope_table(head_dim, sched, final).double()
    half = head_dim // 2
    offset = 0
    for h, w in sched.sizes:
        for i in range(h):
            for j in range(w):
                row = table[:, offset + i * w + j]
                expect = torch.tensor(
                    [angle(i, j, (h, w), final, m, half) for m in range(half)], dtype=torch.float64
                )
                torch.testing.assert_close(row[0], expect.cos(), atol=2e-5, rtol=0)
                torch.testing.assert_close(row[1], expect.sin(), atol=2e-5, rtol=0)
        offset += h * w


def test_smaller_images_use_the_full_templates_grid():
    full = rope_table(64, Schedule.square(SQUARE_1M), (64, 64))
    small = rope_table(64, square_schedule(512, 512), (64, 64))
    assert small.shape[1] == 2521
    assert torch.equal(small, full[:, :2521])


def test_rotation_uses_the_scale_index():
    sched = Schedule.square((1, 2, 4))
    table = rope_table(8, sched, (4, 4))
    x = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    out = apply_rope(x, table, sched, 1)
    expect = x.clone()
    for t in range(4):  # token t = (i, j) of the 2x2 map, rows 1..4 of the table
        i, j = divmod(t, 2)
        for m in range(4):
            a = angle(i, j, (2, 2), (4, 4), m, 4)
            x0, x1 = x[0, 0, t, 2 * m].item(), x[0, 0, t, 2 * m + 1].item()
            expect[0, 0, t, 2 * m] = x0 * math.cos(a) - x1 * math.sin(a)
            expect[0, 0, t, 2 * m + 1] = x0 * math.sin(a) + x1 * math.cos(a)
    torch.testing.assert_close(out, expect, atol=1e-6, rtol=0)
    # upstream's non-fused branch passes no scale index: offset 0, other angles
    assert not torch.allclose(apply_rope(x, table, sched, 0), expect, atol=1e-3)


def test_schedule_of_image_sizes():
    assert square_schedule(1024, 1024) == Schedule.square(SQUARE_1M)
    assert square_schedule(256, 256).total == 521  # '0.06M'
    with pytest.raises(ValueError, match="square images of 256, 512, 768, 1024 pixels"):
        square_schedule(512, 768)
