"""``var-digits``: a class-conditional VAR trained here on scikit-learn's digits (model card:
``README.md`` beside this file), run through our ``VARPipeline``.

``load()`` builds the pipeline offline from the committed files; the task scorer is dit-digits'
digit classifier (``score(class_label, image)``), which reads 32x32 images like these.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffcache.pipelines._weights import Weights
from diffcache.pipelines.digits import PROMPTS, classify, score

__all__ = ["PROMPTS", "classify", "configs", "load", "score"]

HERE = Path(__file__).parent
TRAIN = "python -m diffcache.pipelines.var_digits.train"
#: the sizes of both models, written by training
CONFIG = "config.json"
#: the weights and their sizes (relative to ``model/``), checked against ``model/sha256.json``
WEIGHTS = Weights("var-digits", TRAIN, ("transformer.safetensors", "vae.safetensors", CONFIG))


def configs(folder: Path | None = None) -> tuple[Any, Any]:
    """The transformer's and the VQ-VAE's configs (``VARConfig``, ``VQVAEConfig``) of
    ``folder/model`` (default: the committed files), read from its config file alone."""
    from diffcache.pipelines.var.config import VARConfig, VQVAEConfig

    data = json.loads((Path(folder or HERE) / "model" / CONFIG).read_text())
    vae_fields = {**data["vae"], "ch_mult": tuple(data["vae"]["ch_mult"])}
    return VARConfig(**data["transformer"]), VQVAEConfig(**vae_fields)


def load(folder: Path | None = None) -> Any:
    """The ``VARPipeline`` (fp32) from ``folder/model`` (default: the committed files), after
    checking its weights against their recorded sha256."""
    from diffcache.pipelines.var import VARPipeline
    from diffcache.pipelines.var.transformer import VARTransformer
    from diffcache.pipelines.var.vqvae import VQVAE

    root = Path(folder or HERE)
    folder = root / "model"
    WEIGHTS.check(folder)
    try:
        config, vae_config = configs(root)
        transformer = VARTransformer(config)
        vae = VQVAE(config=vae_config)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WEIGHTS.refuse(folder / CONFIG, f"cannot be read ({type(e).__name__}: {e})") from e
    for module, name in ((transformer, WEIGHTS.files[0]), (vae, WEIGHTS.files[1])):
        try:
            module.load_state_dict(WEIGHTS.state(folder / name), strict=True)
        except RuntimeError as e:  # keys or shapes that do not fit the config
            raise WEIGHTS.refuse(folder / name, f"does not fit {CONFIG} ({e})") from e
    return VARPipeline(transformer.eval(), vae.eval())
