"""Code-built Infinity pipelines with random weights (nothing is downloaded).

``infinity-tiny`` (research/var.md §3.1): depth 4 in 2 chunks, width 64, 2 heads, 4 bits per
token, maps 1, 2, 4, 6, 8 (121 tokens, 128 px; 1:2 and 2:1 templates of 5 maps too); a
2-layer T5 encoder of width 128 built from a config with the word-level tokenizer of
``diffcache.pipelines._tiny`` standing in for Flan-T5's (real folders use ``AutoTokenizer``),
and the stand-in decoder of :mod:`diffcache.pipelines.infinity.vae`. ``infinity-2b-random``:
the real 2B transformer shape with random weights and the same tiny text encoder and decoder,
for memory and speed only.
"""

from __future__ import annotations

from collections.abc import Mapping

from diffcache.pipelines._tiny import seeded, tiny_t5
from diffcache.pipelines.infinity.config import CONFIGS, InfinityConfig
from diffcache.pipelines.infinity.model import Infinity, init_random
from diffcache.pipelines.infinity.pipeline import InfinityPipeline
from diffcache.pipelines.infinity.schedule import TEMPLATES_1M, Maps, square_templates
from diffcache.pipelines.infinity.vae import TinyDecoder

#: the tiny model's 1:1 template
TINY_SIDES = (1, 2, 4, 6, 8)
#: and its 1:2 and 2:1 ones (64 x 128 and 128 x 64 px), so that other aspect ratios run here
_WIDE = ((1, 1), (1, 2), (2, 4), (3, 6), (4, 8))
TINY_TEMPLATES = {
    **square_templates(TINY_SIDES),
    0.5: _WIDE,
    2.0: tuple((w, h) for h, w in _WIDE),
}


def build(
    config: InfinityConfig, templates: Mapping[float, Maps], seed: int = 0
) -> InfinityPipeline:
    """A pipeline of ``config`` with random weights, the tiny text encoder and decoder (the
    caller's global RNG is left as it was)."""
    with seeded(seed):
        tokenizer, encoder = tiny_t5(config.text_maxlen, width=config.text_channels)
        transformer = init_random(Infinity(config), seed).eval()
        vae = TinyDecoder(config.d_vae).eval()
    return InfinityPipeline(transformer, vae, encoder, tokenizer, templates)


def build_tiny(seed: int = 0) -> InfinityPipeline:
    """``infinity-tiny``."""
    return build(CONFIGS["infinity_tiny"], TINY_TEMPLATES, seed)


def build_2b_random(seed: int = 0) -> InfinityPipeline:
    """``infinity-2b-random``: the 2B transformer at its real shape (random weights) with a
    2-layer T5 of Flan-T5-XL's width and the full 1M template."""
    return build(CONFIGS["infinity_2b"], TEMPLATES_1M, seed)
