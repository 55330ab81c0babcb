"""``dit-digits``: a class-conditional DiT trained here on scikit-learn's digits (model card:
``README.md`` beside this file), run through the stock diffusers ``DiTPipeline``.

``load()`` builds the pipeline offline from the committed files; ``score(class_label, image)``
says whether the digit classifier trained with it reads the asked class in a generated image.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from diffcache.errors import UnsupportedModelError

HERE = Path(__file__).parent
TRAIN = "python -m diffcache.pipelines.digits.train"
#: the default request of the toolkit for this model
DEFAULTS = {"class_label": 3, "steps": 20, "guidance": 3.0}
#: the default evaluation inputs: every class once
PROMPTS = tuple(str(i) for i in range(10))
#: the pipeline weights and the file, in the pipeline folder, that records their sha256
WEIGHTS = (
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
)
CHECKSUMS = "sha256.json"


def _refuse(path: Path, problem: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"dit-digits: {path} {problem}; re-create the weights with `{TRAIN}`."
    )


def checksums(model: Path) -> dict[str, str]:
    """The sha256 of each weights file of a saved pipeline folder, by relative path."""
    return {name: hashlib.sha256((model / name).read_bytes()).hexdigest() for name in WEIGHTS}


def _check(model: Path) -> None:
    """Refuse a missing weights file, or one whose sha256 is not the recorded one (a file damaged
    without changing its size still parses)."""
    for name in WEIGHTS:
        if not (model / name).is_file():
            raise _refuse(model / name, "is missing")
    record = model / CHECKSUMS
    try:
        recorded = json.loads(record.read_text())
    except (OSError, ValueError) as e:
        raise _refuse(record, f"cannot be read ({type(e).__name__})") from e
    for name, digest in checksums(model).items():
        if not isinstance(recorded, dict) or recorded.get(name) != digest:
            raise _refuse(model / name, f"does not match the sha256 recorded in {record.name}")


def load(folder: Path | None = None) -> Any:
    """The ``DiTPipeline`` (fp32) from ``folder`` (default: the committed files), after checking
    its weights against their recorded sha256."""
    import torch
    from diffusers import DiTPipeline

    folder = Path(folder or HERE) / "model"
    _check(folder)
    try:
        pipe = DiTPipeline.from_pretrained(
            str(folder),
            local_files_only=True,
            dtype=torch.float32,
            id2label={i: str(i) for i in range(10)},  # not part of the saved folder
        )
    except Exception as e:  # a truncated or corrupt file fails in safetensors or config parsing
        raise _refuse(folder, f"cannot be loaded ({type(e).__name__}: {e})") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.cache
def _classifier(folder: Path = HERE) -> Any:
    from safetensors.torch import load_file

    from diffcache.pipelines.digits.train import classifier_net

    path = folder / "classifier.safetensors"
    if not path.is_file():
        raise _refuse(path, "is missing")
    try:
        state = load_file(str(path))
    except Exception as e:
        raise _refuse(path, f"cannot be loaded ({e})") from e
    net = classifier_net()
    net.load_state_dict({k: v.float() for k, v in state.items()})
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
