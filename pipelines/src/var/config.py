"""VAR's sizes: the transformer's (:class:`VARConfig`) and the multi-scale VQ-VAE's
(:class:`VQVAEConfig`), as the released checkpoints were built (research/var.md §1.1.1)."""

from __future__ import annotations

import dataclasses

#: token-map sides of the 256 px and 512 px checkpoints
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


@dataclasses.dataclass(frozen=True)
class VARConfig:
    """The transformer of ``var_d{depth}.pth``.

    Args:
        depth: blocks.
        embed_dim: width C (also the condition width D).
        num_heads: attention heads (head_dim = embed_dim / num_heads).
        num_classes: class labels; id ``num_classes`` is the null class of CFG.
        patch_nums: the side of each scale's square token map, coarse to fine.
        vocab_size: VQ-VAE codebook size V (the head's outputs).
        z_channels: VQ-VAE code width Cvae (the word embedding's input).
        mlp_ratio: FFN hidden width / C.
        attn_l2_norm: cosine attention with a learned per-head temperature.
        shared_aln: one AdaLN linear shared by all blocks plus a per-block offset (d36).
        norm_eps: LayerNorm epsilon.
    """

    depth: int
    embed_dim: int
    num_heads: int
    num_classes: int = 1000
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    vocab_size: int = 4096
    z_channels: int = 32
    mlp_ratio: float = 4.0
    attn_l2_norm: bool = True
    shared_aln: bool = False
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        assert self.embed_dim % self.num_heads == 0, (self.embed_dim, self.num_heads)
        assert len(self.patch_nums) >= 2, self.patch_nums

    @classmethod
    def from_depth(cls, depth: int, **overrides: object) -> VARConfig:
        """The released models' rule: heads = depth, width = 64 * depth (head_dim 64)."""
        return cls(depth=depth, embed_dim=64 * depth, num_heads=depth, **overrides)  # type: ignore[arg-type]

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        return round(self.embed_dim * self.mlp_ratio)

    @property
    def num_tokens(self) -> int:
        """L: tokens over all scales."""
        return sum(p * p for p in self.patch_nums)


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
    """The multi-scale VQ-VAE (``vae_ch160v4096z32.pth``: the defaults).

    Args:
        vocab_size: codebook entries.
        z_channels: code width Cvae.
        ch: base channels of encoder and decoder (a multiple of 32: GroupNorm(32)).
        share_quant_resi: Phi convs shared over the scales (4: partially shared; 1: one; 0:
            one per scale).
        patch_nums: the scales (their count sizes the codebook-usage buffer).
        ch_mult: channel multipliers per resolution (5 levels: 16x downsampling).
        quant_resi: Phi's mix, ``(1 - r) h + r conv(h)``.
        num_res_blocks: ResNet blocks per encoder level (decoder: one more).
    """

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    share_quant_resi: int = 4
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    quant_resi: float = 0.5
    num_res_blocks: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        assert self.ch % 32 == 0, f"ch {self.ch} must be a multiple of 32 (GroupNorm)"

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)
