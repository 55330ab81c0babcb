"""Code-built Infinity pipelines with random weights (nothing is downloaded).

``infinity-tiny`` (research/var.md §3.1): depth 4 in 2 chunks, width 64, 2 heads, 4 bits per
token, maps 1, 2, 4, 6, 8 (121 tokens, 128 px); a 2-layer T5 encoder of width 128 built from a
config with the word-level tokenizer of ``diffcache.pipelines._tiny`` standing in for
Flan-T5's (real folders use ``AutoTokenizer``), and the stand-in decoder of
:mod:`diffcache.pipelines.infinity.vae`. ``infinity-2b-random``: the real 2B transformer shape
with random weights and the same tiny text encoder and decoder, for memory and speed only.
"""

from __future__ import annotations

from diffcache.pipelines._tiny import seeded, tiny_t5
from diffcache.pipelines.infinity.config import CONFIGS, InfinityConfig
from diffcache.pipelines.infinity.model import Infinity, init_random
from diffcache.pipelines.infinity.pipeline import InfinityPipeline
from diffcache.pipelines.infinity.schedule import SQUARE_1M
from diffcache.pipelines.infinity.vae import TinyDecoder

#: the tiny model's 1:1 template
TINY_SIDES = (1, 2, 4, 6, 8)


def build(config: InfinityConfig, sides: tuple[int, ...], seed: int = 0) -> InfinityPipeline:
    """A pipeline of ``config`` with random weights, the tiny text encoder and decoder (the
    caller's global RNG is left as it was)."""
    with seeded(seed):
        tokenizer, encoder = tiny_t5(config.text_maxlen, width=config.text_channels)
        transformer = init_random(Infinity(config), seed).eval()
        vae = TinyDecoder(config.d_vae).eval()
    return InfinityPipeline(transformer, vae, encoder, tokenizer, template=sides)


def build_tiny(seed: int = 0) -> InfinityPipeline:
    """``infinity-tiny``."""
    return build(CONFIGS["infinity_tiny"], TINY_SIDES, seed)


def build_2b_random(seed: int = 0) -> InfinityPipeline:
    """``infinity-2b-random``: the 2B transformer at its real shape (random weights) with a
    2-layer T5 of Flan-T5-XL's width and the full 1M template."""
    return build(CONFIGS["infinity_2b"], SQUARE_1M, seed)
