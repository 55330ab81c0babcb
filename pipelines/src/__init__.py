"""Built-in model families: importing this registers every family's adapter.

Each module holds one family's ``Adapter`` and builders of code-built pipelines with random
weights. diffusers and transformers are imported only inside the builders.
"""

from __future__ import annotations

from diffcache.pipelines import (
    cogvideox,
    dit,
    dream,
    flux,
    hunyuan_video,
    infinity,
    llada,
    qwen_image,
    var,
    wan,
)

__all__ = [
    "cogvideox",
    "dit",
    "dream",
    "flux",
    "hunyuan_video",
    "infinity",
    "llada",
    "qwen_image",
    "var",
    "wan",
]
