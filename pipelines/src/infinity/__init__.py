"""Infinity (FoundationVision/Infinity): our own next-scale text-to-image model code.

The transformer keeps upstream's state-dict names (:mod:`.model`), its self-attention calls the
generation's history store (:mod:`diffcache.kv.history`), and :class:`.pipeline.InfinityPipeline`
runs upstream's sampling loop (research/var.md §1.2). This module is the family's adapter, data
only; ``infinity-tiny`` and ``infinity-2b-random`` are built in :mod:`.tiny`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffcache.adapter import Adapter, Capabilities, KVSeam
from diffcache.pipelines._fields import NEGATIVE_PROMPT, TOP_K, TOP_P, guidance, prompt, side
from diffcache.pipelines.infinity.schedule import TEMPLATES_1M
from diffcache.registry import register_adapter
from diffcache.request import Field


def _aspect(values: Mapping[str, Any]) -> str | None:
    """An image whose h/w is none of the released templates' aspect ratios (which sizes a model
    makes at a ratio, its pipeline says once loaded)."""
    h, w = values.get("height"), values.get("width")
    if h is None or w is None or not h or not w:
        return None
    if any(abs(h / w - r) < 0.01 for r in TEMPLATES_1M):
        return None
    ratios = ", ".join(f"{r:g}" for r in sorted(TEMPLATES_1M))
    return f"--height {h} --width {w}: Infinity's aspect ratios (h/w) are {ratios}"


def _side(name: str) -> Field:
    """Image side: a multiple of 16 up to the model's longest map side times 16 (which sizes
    it makes, the pipeline's aspect-ratio templates say)."""
    f = side(name)
    return Field(
        f.name, f.type, f.help, f.call_arg, min=f.min, multiple_of=16, limit=lambda p: p.max_side
    )


ADAPTER = register_adapter(
    Adapter(
        name="infinity",
        pipelines=("InfinityPipeline",),
        denoisers=(),
        driver="pipeline",
        cfg="batched",
        media="image",
        provides=Capabilities(sites=("step",), kv_store="history", denoiser="next-scale"),
        kv=KVSeam(policy="history_store"),
        output="images",
        seed_arg="generator",
        fields=(
            prompt(),
            NEGATIVE_PROMPT,
            _side("height"),
            _side("width"),
            guidance("cfg"),
            Field("temperature", float, "sampling temperature (0: greedy)", "tau", min=0.0),
            TOP_K,
            TOP_P,
        ),
        rules=(_aspect,),
    )
)
