"""The classifier of dit-digits: a small CNN that reads the digit in a generated image.

Its weights are trained by ``train.py`` (``classifier.safetensors``); the package's ``classify``
scores generated images with it.
"""

from __future__ import annotations

from torch import nn


def classifier_net() -> nn.Module:
    """A small CNN on (N, 3, 32, 32) images in [0, 1]."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip
