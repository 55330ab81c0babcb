"""A plain dense forward of our LLaDA and Dream models, for the reference loops in tests.

Reference tests (tests/dlm/test_*_reference.py) rewrite a text method's loop from its paper and
reference code; they share this forward so that none of them calls the method's own engine.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from diffcache.models import load_model

cached_model = functools.cache(load_model)
"""``load_model(name)``, built once per process (the reference tests only read the pipelines)."""


def dense_forward(
    model: Any,
    ids: torch.Tensor,
    rows: torch.Tensor,
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]],
    rope: tuple[torch.Tensor, torch.Tensor],
    on_attention: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Logits ``[n, V]`` of ``rows`` of ``ids [1, T]``: their K/V are written into ``cache`` (one
    dense tensor per layer, created by the first forward, which must cover every row) and they
    attend to every position with an explicit softmax. ``on_attention`` sees each layer's
    attention ``[1, heads, n, T]``."""
    cos, sin = rope
    h = model.embed(ids[:, rows])
    for layer, block in enumerate(model.blocks()):
        q, k, v = block.qkv(h, cos[:, rows], sin[:, rows])
        if layer not in cache:
            cache[layer] = (k.clone(), v.clone())
        cache[layer][0][:, :, rows], cache[layer][1][:, :, rows] = k, v
        keys, values = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in cache[layer])
        attn = ((q @ keys.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)
        if on_attention is not None:
            on_attention(attn)
        h = block.finish(h, (attn @ values).transpose(1, 2).flatten(2))
    return model.head(h)[0]
