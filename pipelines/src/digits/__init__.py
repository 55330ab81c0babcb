"""``dit-digits``: a class-conditional DiT trained here on scikit-learn's digits (model card:
``README.md`` beside this file), run through the stock diffusers ``DiTPipeline``.

``load()`` builds the pipeline offline from the committed files; ``score(class_label, image)``
says whether the digit classifier trained with it reads the asked class in a generated image.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from diffcache.pipelines._weights import Weights

HERE = Path(__file__).parent
TRAIN = "python -m diffcache.pipelines.digits.train"
#: the default evaluation inputs: every class once
PROMPTS = tuple(str(i) for i in range(10))
#: the pipeline weights (relative to ``model/``), checked against ``model/sha256.json``
WEIGHTS = Weights(
    "dit-digits",
    TRAIN,
    ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"),
)


def load(folder: Path | None = None) -> Any:
    """The ``DiTPipeline`` (fp32) from ``folder`` (default: the committed files), after checking
    its weights against their recorded sha256."""
    from diffusers import DiTPipeline

    labels = {i: str(i) for i in range(10)}  # not part of the saved folder
    return WEIGHTS.load(DiTPipeline, Path(folder or HERE) / "model", id2label=labels)


@functools.cache
def _classifier(folder: Path = HERE) -> Any:
    from diffcache.pipelines.digits.classifier import classifier_net

    net = classifier_net()
    net.load_state_dict(WEIGHTS.state(folder / "classifier.safetensors"))
    return net.eval()


def classify(images: np.ndarray) -> np.ndarray:
    """Predicted digits of (N, H, W, C) images in [0, 1] (as DiTPipeline returns them)."""
    import torch

    x = torch.as_tensor(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    with torch.no_grad():
        return _classifier()(x).argmax(1).numpy()


def score(class_label: int, image: np.ndarray) -> bool:
    """Whether the classifier reads ``class_label`` in one generated (H, W, C) image."""
    return int(classify(np.asarray(image)[None])[0]) == int(class_label)
