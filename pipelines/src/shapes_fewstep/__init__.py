"""``wan-shapes-8step``: a few-step student of ``wan-shapes`` distilled here (model card:
``README.md`` beside this file), run through the stock diffusers ``WanPipeline`` at 8 flow-matching
Euler steps without classifier-free guidance.

``load()`` builds the pipeline offline from the committed student transformer and scheduler and
the teacher's committed autoencoder, text encoder and tokenizer (each checked against its sha256);
the task scorer, the evaluation prompts and the calibration prompts are wan-shapes'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffcache.pipelines import shapes
from diffcache.pipelines._weights import Weights
from diffcache.pipelines.shapes import CALIBRATION, PROMPTS, score

__all__ = ["CALIBRATION", "PROMPTS", "STEPS", "WEIGHTS", "load", "score"]

HERE = Path(__file__).parent
TRAIN = "python -m diffcache.pipelines.shapes_fewstep.train"
#: the Euler step count the student was distilled for (its default)
STEPS = 8
#: the student's weights (relative to ``model/``), checked against ``model/sha256.json``
WEIGHTS = Weights("wan-shapes-8step", TRAIN, ("transformer/diffusion_pytorch_model.safetensors",))
#: the pipeline parts taken from the teacher's folder (not saved again with the student)
SHARED = ("tokenizer", "text_encoder", "vae")


def load(folder: Path | None = None) -> Any:
    """The student ``WanPipeline`` (fp32, progress bar off) from ``folder`` (default: the
    committed files) with the teacher's autoencoder, text encoder and tokenizer."""
    from diffusers import WanPipeline

    teacher = shapes.load()
    parts = {name: getattr(teacher, name) for name in SHARED}
    return WEIGHTS.load(WanPipeline, Path(folder or HERE) / "model", **parts)
