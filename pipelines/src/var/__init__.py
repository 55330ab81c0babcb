"""VAR (FoundationVision/VAR): class-conditional next-scale image generation, our own model
code and pipeline (research/var.md §1.1).

``VARPipeline.from_pretrained(folder, depth=16)`` reads the released ``var_d{depth}.pth`` and
``vae_ch160v4096z32.pth`` unchanged. Each scale is a step; every block's self-attention meets
the generation's K/V history store (``diffcache.kv.history``) through :class:`KVSeam`
``history_store``, which a KV-compression method wraps.
"""

from __future__ import annotations

from diffcache.adapter import Adapter, Capabilities, KVSeam
from diffcache.pipelines._fields import TOP_K, TOP_P, class_label, guidance
from diffcache.pipelines._tiny import seeded
from diffcache.pipelines.var.config import PATCH_NUMS_256, VARConfig, VQVAEConfig
from diffcache.pipelines.var.pipeline import VARPipeline
from diffcache.pipelines.var.transformer import VARTransformer
from diffcache.pipelines.var.vqvae import VQVAE
from diffcache.registry import register_adapter

__all__ = ["ADAPTER", "VARPipeline", "build", "build_tiny", "build_d16_random", "build_d30_random"]

FIELDS = (
    class_label(lambda pipe: pipe.num_classes - 1),
    guidance("cfg"),
    TOP_K,
    TOP_P,
)

ADAPTER = register_adapter(
    Adapter(
        name="var",
        pipelines=("VARPipeline",),
        denoisers=(),
        driver="pipeline",
        cfg="batched",
        media="image",
        provides=Capabilities(sites=("step",), kv_store="history", denoiser="next-scale"),
        output="images",
        seed_arg="generator",
        kv=KVSeam(policy="history_store"),
        fields=FIELDS,
    )
)


def build(config: VARConfig, vae_config: VQVAEConfig, seed: int = 0) -> VARPipeline:
    """A pipeline with deterministic random weights (our init; PyTorch's default for the VAE)."""
    with seeded(seed):
        transformer = VARTransformer(config)
        transformer.init_weights()
        vae = VQVAE(config=vae_config)
    return VARPipeline(transformer.eval(), vae)


#: ``var-tiny``'s transformer and VQ-VAE: 2 blocks of width 64 with 2 heads, 10 classes, scales
#: (1, 2, 3, 4), 32 codes of width 8 and ``ch`` 32 (64 px images)
TINY = (
    VARConfig(
        depth=2,
        embed_dim=64,
        num_heads=2,
        num_classes=10,
        patch_nums=(1, 2, 3, 4),
        vocab_size=32,
        z_channels=8,
    ),
    VQVAEConfig(vocab_size=32, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4)),
)


def build_tiny(seed: int = 0) -> VARPipeline:
    """``var-tiny`` (:data:`TINY`), random weights."""
    return build(*TINY, seed=seed)


def _real_size(depth: int) -> VARPipeline:
    """VAR-d{depth}'s transformer (256 px scales) and the released tokenizer's sizes."""
    return build(VARConfig.from_depth(depth), VQVAEConfig(patch_nums=PATCH_NUMS_256))


def build_d16_random() -> VARPipeline:
    """Real-size VAR-d16 with random weights (memory and speed only)."""
    return _real_size(16)


def build_d30_random() -> VARPipeline:
    """Real-size VAR-d30 with random weights (memory and speed only)."""
    return _real_size(30)
