"""Infinity transformer configurations (research/var.md §1.2.1), as data."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class InfinityConfig:
    """One Infinity transformer's shape.

    Args:
        depth: transformer blocks.
        embed_dim: width ``C`` (also the conditioning width ``D``).
        num_heads: self- and cross-attention heads.
        block_chunks: how the blocks are grouped in the state dict
            (``block_chunks.{c}.module.{j}``); must divide ``depth``.
        d_vae: bits per transformer token (32 for the 2B VAE; 56 = 14 x 4 for the patchified 8B).
        text_channels: the T5 encoder's width ``Ct5``.
        text_maxlen: rows of the learned unconditional text ``cfg_uncond`` (T5 tokens kept).
        mlp_ratio: FFN hidden width over ``C`` (rounded to a multiple of 256 as upstream).
        norm_eps: epsilon of every layer norm and of ``text_norm``.
        levels: rows of ``lvl_embed`` (the scale embedding).
    """

    depth: int
    embed_dim: int
    num_heads: int
    block_chunks: int
    d_vae: int = 32
    text_channels: int = 2048
    text_maxlen: int = 512
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    levels: int = 15

    def __post_init__(self) -> None:
        if self.block_chunks < 2 or self.depth % self.block_chunks:
            raise ValueError(
                f"block_chunks {self.block_chunks} must be > 1 and divide depth {self.depth}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def per_chunk(self) -> int:
        """Blocks in one chunk: block ``j`` of chunk ``c`` is layer ``c * per_chunk + j``."""
        return self.depth // self.block_chunks

    @property
    def ffn_dim(self) -> int:
        return round(self.embed_dim * self.mlp_ratio / 256) * 256

    @property
    def vocab(self) -> int:
        """Logits per token: one binary classifier per bit."""
        return 2 * self.d_vae

    @property
    def pool_heads(self) -> int:
        """Heads of the text attentive pool (``text_proj_for_sos``): head width 64 above a width
        of 4096, else 128, over the T5 width."""
        return max(1, self.text_channels // (64 if self.embed_dim > 4096 else 128))


def _layers(depth: int, embed: int, heads: int) -> InfinityConfig:
    return InfinityConfig(depth=depth, embed_dim=embed, num_heads=heads, block_chunks=4)


#: ``model_type`` -> configuration (``tools/run_infinity.py::load_transformer``); the 8B model's
#: VAE is patchified (``d_vae = 14 * 4``).
CONFIGS: dict[str, InfinityConfig] = {
    "infinity_2b": InfinityConfig(depth=32, embed_dim=2048, num_heads=16, block_chunks=8),
    "infinity_8b": InfinityConfig(depth=40, embed_dim=3584, num_heads=28, block_chunks=8, d_vae=56),
    "infinity_layer12": _layers(12, 768, 8),
    "infinity_layer16": _layers(16, 1152, 12),
    "infinity_layer24": _layers(24, 1536, 16),
    "infinity_layer32": _layers(32, 2080, 20),
    "infinity_layer40": _layers(40, 2688, 24),
    "infinity_layer48": _layers(48, 3360, 28),
    # research/var.md §3.1: the CPU test model
    "infinity_tiny": InfinityConfig(
        depth=4,
        embed_dim=64,
        num_heads=2,
        block_chunks=2,
        d_vae=4,
        text_channels=128,
        text_maxlen=64,
    ),
}
