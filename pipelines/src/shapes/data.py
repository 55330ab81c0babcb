"""Procedural clips for ``wan-shapes``: one coloured shape moving in a described direction.

Every clip is drawn in code from a seed (pure torch, no files): a plain dark background and one
anti-aliased square, circle or triangle of one of four colours that moves left, right, up or
down at a constant speed, with a random size, speed and start position that keep the whole path
inside the frame. ``clips(n, seed)`` gives (N, 3, F, H, W) videos in [-1, 1] (the autoencoder's
range) and their labels; ``prompt(...)`` writes the caption of a label triple.
"""

from __future__ import annotations

import dataclasses

import torch

SIZE = 32
FRAMES = 9  # Wan's VAE needs 4k + 1 frames
COLOURS = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.12, 0.80, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
}
SHAPES = ("square", "circle", "triangle")
#: unit motion per direction in image coordinates (x to the right, y downwards)
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
#: the checker's extra motion class: a shape that does not move
STILL = len(DIRECTIONS)
BACKGROUND = (0.10, 0.10, 0.10)
RADIUS = (3.5, 6.0)  # half the shape's extent, pixels
SPEED = (1.25, 2.5)  # pixels per frame


def prompt(colour: int | str, shape: int | str, direction: int | str) -> str:
    """The caption of a clip, e.g. ``"a red square moving left"`` (names or indices)."""
    c = colour if isinstance(colour, str) else list(COLOURS)[colour]
    s = shape if isinstance(shape, str) else SHAPES[shape]
    if direction == STILL:  # the checker's still clips (never a diffusion prompt)
        return f"a {c} {s}"
    d = direction if isinstance(direction, str) else list(DIRECTIONS)[direction]
    return f"a {c} {s} moving {d}"


def parse(text: str) -> tuple[int, int, int]:
    """(colour, shape, direction) indices of a caption written by :func:`prompt`."""
    words = text.lower().split()
    found = []
    for names in (list(COLOURS), list(SHAPES), list(DIRECTIONS)):
        hits = [i for i, name in enumerate(names) if name in words]
        if len(hits) != 1:
            raise ValueError(f"{text!r}: expected one of {names}")
        found.append(hits[0])
    return found[0], found[1], found[2]


@dataclasses.dataclass(frozen=True)
class Clips:
    """A batch of clips: ``video`` (N, 3, F, H, W) in [-1, 1] and per-clip label indices
    (``direction`` is :data:`STILL` for a shape that does not move)."""

    video: torch.Tensor
    colour: torch.Tensor
    shape: torch.Tensor
    direction: torch.Tensor

    def prompts(self) -> list[str]:
        return [
            prompt(int(c), int(s), int(d))
            for c, s, d in zip(self.colour, self.shape, self.direction, strict=True)
        ]


def _coverage(
    kind: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor
) -> torch.Tensor:
    """Coverage in [0, 1] of (N, F) shapes on the SIZE x SIZE pixel grid: (N, F, SIZE, SIZE).

    Each shape is a signed distance (pixels, negative inside) and a pixel is covered by
    ``clamp(0.5 - distance)``: anti-aliased edges that move smoothly with sub-pixel positions.
    """
    axis = torch.arange(SIZE, dtype=torch.float32) + 0.5
    dx = axis.view(1, 1, 1, -1) - cx[..., None, None]
    dy = axis.view(1, 1, -1, 1) - cy[..., None, None]
    rr = r[..., None, None]
    square = torch.maximum(dx.abs(), dy.abs()) - 0.9 * rr
    circle = torch.sqrt(dx**2 + dy**2) - rr
    # upright isosceles triangle: apex (0, -r), base y = r of half-width 1.1 r
    side = (2.0 * dx.abs() - 1.1 * (dy + rr)) / 5.21**0.5
    triangle = torch.maximum(dy - rr, side)
    kind = kind.view(-1, 1, 1, 1)
    distance = torch.where(kind == 0, square, torch.where(kind == 1, circle, triangle))
    return (0.5 - distance).clamp(0.0, 1.0)


def render(
    colour: torch.Tensor,
    shape: torch.Tensor,
    direction: torch.Tensor,
    start: torch.Tensor,
    radius: torch.Tensor,
    speed: torch.Tensor,
) -> torch.Tensor:
    """Videos (N, 3, F, H, W) in [-1, 1] of shapes starting at ``start`` (N, 2) = (x, y)."""
    motion = torch.tensor([*DIRECTIONS.values(), (0.0, 0.0)])[direction]  # (N, 2)
    t = torch.arange(FRAMES, dtype=torch.float32)
    centre = start[:, None, :] + (speed[:, None, None] * t[None, :, None]) * motion[:, None, :]
    cover = _coverage(shape, centre[..., 0], centre[..., 1], radius[:, None])  # (N, F, H, W)
    rgb = torch.tensor(list(COLOURS.values()))[colour]  # (N, 3)
    bg = torch.tensor(BACKGROUND).view(1, 3, 1, 1, 1)
    video = bg + cover[:, None] * (rgb.view(-1, 3, 1, 1, 1) - bg)
    return video * 2 - 1


def clips(n: int, seed: int, still: float = 0.0) -> Clips:
    """``n`` random clips, a pure function of ``seed``; a fraction ``still`` does not move."""
    g = torch.Generator().manual_seed(seed)

    def uniform(lo: float, hi: float | torch.Tensor) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g)

    colour = torch.randint(0, len(COLOURS), (n,), generator=g)
    shape = torch.randint(0, len(SHAPES), (n,), generator=g)
    direction = torch.randint(0, len(DIRECTIONS), (n,), generator=g)
    radius = uniform(*RADIUS)
    speed = uniform(*SPEED)
    still_mask = torch.rand(n, generator=g) < still
    direction = torch.where(still_mask, torch.full_like(direction, STILL), direction)
    speed = torch.where(still_mask, torch.zeros_like(speed), speed)
    travel = speed * (FRAMES - 1)
    # along the motion: the path [p, p + travel] stays inside [r, SIZE - r]; across it: anywhere
    along = uniform(0.0, 1.0) * (SIZE - 2 * radius - travel).clamp(min=0) + radius
    across = uniform(0.0, 1.0) * (SIZE - 2 * radius) + radius
    sign = torch.tensor([-1.0, 1.0, -1.0, 1.0, 1.0])[direction]
    # moving towards -x / -y starts at the far end
    along = torch.where(sign < 0, SIZE - along, along)
    horizontal = (direction <= 1) | (direction == STILL)
    x = torch.where(horizontal, along, across)
    y = torch.where(horizontal, across, along)
    video = render(colour, shape, direction, torch.stack([x, y], 1), radius, speed)
    return Clips(video, colour, shape, direction)
