"""The image decoder of the tiny Infinity: a stand-in, not the BSQ VAE.

``infinity-tiny`` decodes its summed codes ``[B, d, H, W]`` with four nearest-neighbour 2x
upsamplings and 3x3 convolutions (16 pixels per token, as the real f16 VAE), random weights.
Real checkpoints decode with the BSQ VAE's decoder (:mod:`diffcache.pipelines.infinity.bsq`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: pixels per token side
STRIDE = 16


class TinyDecoder(nn.Module):
    """Summed codes ``[B, d, H, W]`` -> an image ``[B, 3, 16H, 16W]`` in [-1, 1]."""

    def __init__(self, d: int, width: int = 16) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(d, width, 3, padding=1)
        self.up = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(4))
        self.conv_out = nn.Conv2d(width, 3, 3, padding=1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for conv in self.up:
            h = F.silu(conv(F.interpolate(h, scale_factor=2, mode="nearest")))
        return torch.tanh(self.conv_out(h))
