"""``dit-digits-8step``: a few-step student of ``dit-digits`` distilled here (model card:
``README.md`` beside this file), run through the stock diffusers ``DiTPipeline`` at 8 (or 4) DDIM
steps without classifier-free guidance.

``load()`` builds the pipeline offline from the committed files; the task scorer and the
evaluation inputs are dit-digits' (the same digit classifier, every class once).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffcache.pipelines._weights import Weights
from diffcache.pipelines.digits import PROMPTS, classify, score

__all__ = ["PROMPTS", "STEPS", "WEIGHTS", "classify", "load", "score"]

HERE = Path(__file__).parent
TRAIN = "python -m diffcache.pipelines.digits_fewstep.train"
#: the DDIM step counts the student was distilled for (the first is its default)
STEPS = (8, 4)
#: the pipeline weights (relative to ``model/``), checked against ``model/sha256.json``
WEIGHTS = Weights(
    "dit-digits-8step",
    TRAIN,
    ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"),
)


def load(folder: Path | None = None) -> Any:
    """The student ``DiTPipeline`` (fp32) from ``folder`` (default: the committed files), after
    checking its weights against their recorded sha256."""
    from diffusers import DiTPipeline

    labels = {i: str(i) for i in range(10)}  # not part of the saved folder
    return WEIGHTS.load(DiTPipeline, Path(folder or HERE) / "model", id2label=labels)
