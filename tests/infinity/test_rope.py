"""2-D RoPE, STAR normalisation (rope2d_normalized_by_hw=2), offset by the scale index."""

from __future__ import annotations

import math

import pytest
import torch

from diffcache.kv.history import Schedule
from diffcache.pipelines.infinity.schedule import (
    SQUARE_1M,
    TEMPLATES_1M,
    apply_rope,
    image_sizes,
    rope_table,
    template_schedule,
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
    small = rope_table(64, template_schedule(512, 512)[0], (64, 64))
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
    assert template_schedule(1024, 1024) == (Schedule.square(SQUARE_1M), (64, 64))
    assert template_schedule(256, 256)[0].total == 521  # '0.06M'
    with pytest.raises(ValueError, match="images of 224x336, 416x624, 672x1008, 832x1248 pix"):
        template_schedule(512, 768)  # h/w 0.667's sizes


def test_every_aspect_ratio_template_is_upstreams_shape():
    """Upstream's own check of its table (dynamic_resolution.py): each template's 7th, 10th,
    12th and 13th maps have its h/w within 0.01; maps grow on both sides; a transposed ratio's
    schedule is the transposed maps."""
    assert len(TEMPLATES_1M) == 15
    for ratio, maps in TEMPLATES_1M.items():
        assert len(maps) == 13 and maps[:2] == ((1, 1), (2, 2))
        assert all(a <= c and b <= d for (a, b), (c, d) in zip(maps[:-1], maps[1:], strict=True))
        for n in (7, 10, 12, 13):
            h, w = maps[n - 1]
            assert abs(h / w - ratio) < 0.01, (ratio, n)
        sizes = image_sizes(maps)
        assert sizes == [(maps[n - 1][0] * 16, maps[n - 1][1] * 16) for n in (7, 10, 12, 13)]
        for n, (height, width) in zip((7, 10, 12, 13), sizes, strict=True):
            schedule, final = template_schedule(height, width)
            assert schedule == Schedule(maps[:n]) and final == maps[-1]
            wide, _ = template_schedule(width, height)
            assert wide.sizes == tuple((b, a) for a, b in maps[:n])
