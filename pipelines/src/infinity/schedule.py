"""Infinity's scale schedules and its 2-D RoPE (research/var.md §1.2.2, §1.2.3 item 3).

A template is the 13 maps ``(h, w)`` of one aspect ratio's '1M' schedule; '0.60M', '0.25M' and
'0.06M' images use its first 12, 10 and 7 maps. The maps of every aspect ratio are upstream's
(``infinity/utils/dynamic_resolution.py``: ratios h/w 1, 1.25, 1.333, 1.5, 1.75, 2, 2.5, 3 and
their transposes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from diffcache.kv.history import Schedule

#: the 1:1 template's map sides, coarse to fine
SQUARE_1M = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)
#: pixels per token of the f16 VAE (2B); the patchified f8 VAE of the 8B also gives 16
VAE_STRIDE = 16
#: named resolutions -> number of maps of the template
PIXELS = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}

Maps = tuple[tuple[int, int], ...]
#: images taller than wide: h/w -> the '1M' maps (h, w) (upstream's ratio2hws)
_TALL: dict[float, Maps] = {
    1.25: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24),
           (35, 28), (45, 36), (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21),
            (36, 27), (48, 36), (60, 45), (72, 54)),
    1.5: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22),
          (39, 26), (48, 32), (63, 42), (78, 52)),
    1.75: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20),
           (42, 24), (56, 32), (70, 40), (84, 48)),
    2.0: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19),
          (46, 23), (60, 30), (74, 37), (90, 45)),
    2.5: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16),
          (50, 20), (65, 26), (80, 32), (100, 40)),
    3.0: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15),
          (54, 18), (72, 24), (90, 30), (111, 37)),
}  # fmt: skip


def square_templates(sides: Sequence[int]) -> dict[float, Maps]:
    """One 1:1 template of square maps of ``sides`` (a small model's own)."""
    return {1.0: tuple((s, s) for s in sides)}


#: every aspect ratio of the released models: h/w -> its '1M' maps
TEMPLATES_1M: dict[float, Maps] = {
    **square_templates(SQUARE_1M),
    **_TALL,
    **{round(w / h, 3): tuple((b, a) for a, b in maps) for (h, w), maps in
       ((maps[-1], maps) for maps in _TALL.values())},
}  # fmt: skip


def image_sizes(maps: Maps) -> list[tuple[int, int]]:
    """The ``(height, width)`` in pixels a template makes: its first 7, 10, 12, 13 maps (those
    it has), and all of a shorter one."""
    counts = sorted({n for n in PIXELS.values() if n <= len(maps)} | {len(maps)})
    return [(maps[n - 1][0] * VAE_STRIDE, maps[n - 1][1] * VAE_STRIDE) for n in counts]


def template_schedule(
    height: int, width: int, templates: Mapping[float, Maps] = TEMPLATES_1M
) -> tuple[Schedule, tuple[int, int]]:
    """The schedule of a ``height`` x ``width`` image and its template's last map (what RoPE
    is normalised to). Raises ValueError naming the sizes of the nearest aspect ratio."""
    for maps in templates.values():
        if (height, width) in image_sizes(maps):
            last = maps.index((height // VAE_STRIDE, width // VAE_STRIDE))
            return Schedule(maps[: last + 1]), maps[-1]
    nearest = min(templates, key=lambda r: abs(r - height / width))
    shown = ", ".join(f"{h}x{w}" for h, w in image_sizes(templates[nearest]))
    raise ValueError(
        f"height {height} x width {width}: this model makes images of {shown} pixels "
        f"(height x width) at the nearest aspect ratio"
    )


def rope_table(
    head_dim: int, schedule: Schedule, final: tuple[int, int], base: float = 10000.0
) -> torch.Tensor:
    """cos and sin of every position of ``schedule`` ``[2, total, head_dim // 2]`` (float32).

    "STAR" normalisation (``rope2d_normalized_by_hw=2``): token ``(i, j)`` of an ``h x w`` map
    takes the angles of grid row ``round(i * H / h)`` and column ``round(j * W / w)``, where
    ``(H, W) = final`` is the last map of the template's full ('1M') schedule. Half of the
    rotated pairs turn with the row, the other half with the column. Maps are concatenated in
    order, so map ``si`` starts at ``schedule.start(si)``.
    """
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))
    parts = []
    for h, w in schedule.sizes:
        rows = (torch.arange(h) * (final[0] / h)).round()
        cols = (torch.arange(w) * (final[1] / w)).round()
        angles = torch.cat(
            (
                torch.outer(rows, inv_freq)[:, None, :].expand(h, w, -1),
                torch.outer(cols, inv_freq)[None, :, :].expand(h, w, -1),
            ),
            dim=-1,
        ).reshape(h * w, half)
        parts.append(torch.stack((angles.cos(), angles.sin())))
    return torch.cat(parts, dim=1)


def apply_rope(x: torch.Tensor, table: torch.Tensor, schedule: Schedule, si: int) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, n, head_dim]`` (map ``si``'s tokens) by its rows of ``table``: the
    rows from ``schedule.start(si)``, the tokens of the earlier maps (the scale index matters)."""
    n = x.shape[-2]
    start = schedule.start(si)
    cos, sin = table[:, start : start + n].to(x.dtype)
    pairs = x.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack((cos * even - sin * odd, sin * even + cos * odd), dim=-1).flatten(-2)
