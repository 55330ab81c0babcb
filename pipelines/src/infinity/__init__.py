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
from diffcache.registry import register_adapter
from diffcache.request import Field


def _square(values: Mapping[str, Any]) -> str | None:
    """Only the 1:1 template is implemented."""
    h, w = values.get("height"), values.get("width")
    if h is not None and w is not None and h != w:
        return f"--height {h} and --width {w} differ: Infinity makes square images here"
    return None


def _side(name: str) -> Field:
    """Image side: a multiple of 16 up to the model's largest map times 16."""
    f = side(name)
    return Field(
        f.name, f.type, f.help, f.call_arg, min=f.min, multiple_of=16, limit=lambda p: p.size
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
        kv=KVSeam(store="history", policy="history_store"),
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
        rules=(_square,),
    )
)
