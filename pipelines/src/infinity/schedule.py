"""Infinity's scale schedules and its 2-D RoPE (research/var.md §1.2.2, §1.2.3 item 3).

Only the 1:1 template is known to these notes: 13 square maps ('1M', 1024 px with the f16 VAE);
'0.60M', '0.25M' and '0.06M' are its first 12, 10 and 7 maps.
"""

from __future__ import annotations

import torch

from diffcache.kv.history import Schedule

#: the 1:1 template's map sides, coarse to fine
SQUARE_1M = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)
#: pixels per token of the f16 VAE (2B); the patchified f8 VAE of the 8B also gives 16
VAE_STRIDE = 16
#: named resolutions -> number of maps of the template
PIXELS = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}


def square_schedule(height: int, width: int, sides: tuple[int, ...] = SQUARE_1M) -> Schedule:
    """The schedule of a ``height`` x ``width`` image: the template's maps up to the one whose
    side times :data:`VAE_STRIDE` is the image side. Raises ValueError for other sizes."""
    sizes = [s * VAE_STRIDE for s in sides]
    counts = [n for n in PIXELS.values() if n <= len(sides)] + [len(sides)]
    allowed = sorted({sizes[n - 1] for n in counts})
    if height != width or height not in allowed:
        raise ValueError(
            f"height {height} x width {width}: this model makes square images of "
            f"{', '.join(map(str, allowed))} pixels"
        )
    return Schedule.square(sides[: sizes.index(height) + 1])


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
