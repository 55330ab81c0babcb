"""``wan-shapes``: a small text-to-video Wan model trained here on procedural clips of one
coloured shape moving left, right, up or down (model card: ``README.md`` beside this file), run
through the stock diffusers ``WanPipeline``.

``load()`` builds the pipeline offline from the committed files; ``score(prompt, video)`` says
whether the checker trained with it reads the prompt's colour and direction in a generated video.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from diffcache.pipelines._weights import Weights
from diffcache.pipelines.shapes import data

HERE = Path(__file__).parent
TRAIN = "python -m diffcache.pipelines.shapes.train"
#: the default evaluation prompts: every colour x direction once, the shapes taken in turn
PROMPTS = tuple(
    data.prompt(c, (c + d) % len(data.SHAPES), d)
    for c in range(len(data.COLOURS))
    for d in range(len(data.DIRECTIONS))
)
#: the calibration prompts (``calibration-prompts.txt``): 16 captions of the training
#: distribution that are not evaluation prompts (other shapes for each colour and direction)
CALIBRATION = tuple(
    line.strip()
    for line in (HERE / "calibration-prompts.txt").read_text().splitlines()
    if line.strip()
)
#: the pipeline weights (relative to ``model/``), checked against ``model/sha256.json``
WEIGHTS = Weights(
    "wan-shapes",
    TRAIN,
    (
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ),
)


def load(folder: Path | None = None) -> Any:
    """The ``WanPipeline`` (fp32, progress bar off) from ``folder`` (default: the committed
    files), built offline."""
    from diffusers import WanPipeline

    return WEIGHTS.load(WanPipeline, Path(folder or HERE) / "model")


@functools.cache
def _checker(folder: Path = HERE) -> Any:
    from diffcache.pipelines.shapes.checker import checker_net

    net = checker_net()
    net.load_state_dict(WEIGHTS.state(folder / "checker.safetensors"))
    return net.eval()


def read(videos: np.ndarray) -> np.ndarray:
    """(N, 2) checker readings (colour index, motion index: ``data.DIRECTIONS`` order, then
    ``data.STILL``) of (N, F, H, W, C) videos in [0, 1] (as ``WanPipeline`` returns them with
    ``output_type="np"``); other sizes are resampled to the training clips' size."""
    import torch
    import torch.nn.functional as F

    from diffcache.pipelines.shapes.checker import checker_predict

    x = torch.as_tensor(np.asarray(videos, dtype=np.float32)).permute(0, 4, 1, 2, 3)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1, 1)
    size = (data.FRAMES, data.SIZE, data.SIZE)
    if tuple(x.shape[2:]) != size:
        x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    return checker_predict(_checker(), x.clamp(0, 1)).numpy()


def score(prompt: str, video: np.ndarray) -> bool:
    """Whether the checker reads the prompt's colour AND direction in one generated
    (F, H, W, C) video in [0, 1]."""
    colour, _, direction = data.parse(prompt)
    got = read(np.asarray(video)[None])[0]
    return bool(got[0] == colour and got[1] == direction)
