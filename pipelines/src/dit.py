"""DiT class-conditional image generation: adapter and a code-built tiny pipeline."""

from __future__ import annotations

from typing import Any

from diffcache.adapter import Adapter
from diffcache.gated import GatedBlock, GatedTerm, Modulation, describe
from diffcache.pipelines._fields import STEPS, class_label, guidance
from diffcache.pipelines._stacks import LATENT_DIT
from diffcache.pipelines._tiny import seeded
from diffcache.registry import register_adapter
from diffcache.sites import ModuleSite, Stack


def _num_classes(pipe: Any) -> int:
    """The largest class id: the pipeline's named labels when it has them (``id2label``), else
    the label table, which has one more row (the null class for CFG)."""
    labels = getattr(pipe, "labels", None)
    if labels:
        return max(int(i) for i in labels.values())
    return int(pipe.transformer.config.num_embeds_ada_norm) - 1


# BasicTransformerBlock with ``ada_norm_zero`` (DiT): norm1 (AdaLayerNormZero with its own
# timestep + class embedding) gives 6 chunks; attention is added times chunk 2 and the
# feed-forward times chunk 5 (no cross-attention). GLIGEN inputs change the forward.
GATED = GatedBlock(
    blocks=("BasicTransformerBlock",),
    modulations=(Modulation("mod", "norm1", args=("timestep", "class_labels")),),
    streams=(("hidden", (GatedTerm("attn1", gate=("mod", 2)), GatedTerm("ff", gate=("mod", 5)))),),
    requires=(("norm_type", "ada_norm_zero"), ("attn2", None), ("pos_embed", None)),
    absent=("cross_attention_kwargs",),
)
describe(GATED)

# DiTPipeline runs CFG batched when guidance_scale > 1: one transformer call per step on
# [cond, uncond] (the second half uses the null class 1000). It calls the transformer with the
# latent positionally and reads ``.sample`` from a Transformer2DModelOutput.
ADAPTER = register_adapter(
    Adapter(
        name="dit",
        pipelines=("DiTPipeline",),
        denoisers=("DiTTransformer2DModel",),
        channel_dim=1,  # (B, C, H, W); output has 2*C channels (learned sigma)
        cfg="batched",
        stacks=(
            Stack(
                "transformer_blocks",
                modules=(ModuleSite("attn1", "self_attn"), ModuleSite("ff", "ff")),
            ),
        ),
        media="image",
        provides=LATENT_DIT,
        output="images",
        seed_arg="generator",
        call_args={"output_type": "np"},
        fields=(class_label(_num_classes), STEPS, guidance()),
    )
)


def build_tiny(seed: int = 0) -> Any:
    """DiTPipeline: 2-layer DiT (dim 32) on an 8x8x4 latent, tiny 8x VAE (64x64 images).

    ``num_embeds_ada_norm`` is 1000 because the pipeline hard-codes the null class id 1000.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    with seeded(seed):
        transformer = DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=1000,
        ).eval()
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            norm_num_groups=4,
            scaling_factor=0.18215,
        ).eval()
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=False,
    )
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
