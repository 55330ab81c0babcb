"""The checker of wan-shapes: a small 3D CNN that reads a clip's colour and motion.

Its weights are trained by ``train.py`` (``checker.safetensors``); the package's ``read`` scores
generated videos with it.
"""

from __future__ import annotations

import torch
from torch import nn

from diffcache.pipelines.shapes import data


def checker_net() -> nn.Module:
    """A small 3D CNN on (N, 3, F, H, W) clips in [0, 1]: 4 colour logits, then 5 motion logits
    (left, right, up, down, still)."""
    return nn.Sequential(
        nn.Conv3d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool3d((1, 2, 2)),
        nn.Conv3d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool3d((1, 2, 2)),
        nn.Conv3d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d((3, 2, 2)),
        nn.Flatten(), nn.Linear(32 * 12, 64), nn.ReLU(),
        nn.Linear(64, len(data.COLOURS) + len(data.DIRECTIONS) + 1),
    )  # fmt: skip


def checker_predict(net: nn.Module, videos: torch.Tensor) -> torch.Tensor:
    """(N, 2) predicted (colour, motion) of (N, 3, F, H, W) clips in [0, 1]."""
    n = len(data.COLOURS)
    with torch.no_grad():
        logits = net(videos)
    return torch.stack([logits[:, :n].argmax(1), logits[:, n:].argmax(1)], 1)
