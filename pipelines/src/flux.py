"""FLUX.1 text-to-image: adapter and a code-built tiny pipeline with random weights."""

from __future__ import annotations

from typing import Any

from diffcache.adapter import Adapter
from diffcache.pipelines._fields import IMAGE, STEPS, guidance, prompt
from diffcache.pipelines._stacks import DUAL_STREAM, LATENT_DIT, dual_stream_gates
from diffcache.pipelines._tiny import seeded, tiny_clip, tiny_t5
from diffcache.registry import register_adapter
from diffcache.sites import ModuleSite, Stack

# FLUX.1-dev is guidance-distilled: ``guidance_scale`` goes into the transformer's guidance
# embedding and the pipeline makes one transformer call per step. FluxPipeline can also run true
# CFG: with ``true_cfg_scale > 1`` *and* a negative prompt it makes a second, separate call per
# step (cond first, then uncond). That mode is not exposed here, so no ``negative_prompt`` field.
ADAPTER = register_adapter(
    Adapter(
        name="flux",
        pipelines=("FluxPipeline",),
        denoisers=("FluxTransformer2DModel",),
        channel_dim=-1,  # packed tokens (B, N, 4 * latent_channels)
        cfg="none",
        stacks=(
            Stack(
                "transformer_blocks",
                stream="dual",
                returns=("encoder", "hidden"),
                modules=DUAL_STREAM,
                # FluxTransformerBlock clips the text stream to the float16 range in float16
                gated=dual_stream_gates("FluxTransformerBlock", clip_fp16=("encoder",)),
            ),
            Stack(
                "single_transformer_blocks",
                returns=("encoder", "hidden"),
                modules=(ModuleSite("attn", "self_attn"), ModuleSite("proj_mlp", "ff")),
            ),
        ),
        media="image",
        provides=LATENT_DIT,
        output="images",
        seed_arg="generator",
        call_args={"output_type": "np"},
        fields=(prompt(), *IMAGE, STEPS, guidance()),
    )
)


def build_tiny(seed: int = 0) -> Any:
    """FluxPipeline: 1 double + 2 single blocks (dim 32), tiny CLIP and T5, tiny 8x VAE."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )

    with seeded(seed):
        clip_tokenizer, clip = tiny_clip()
        t5_tokenizer, t5 = tiny_t5(model_max_length=512)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ).eval()
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=16,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            norm_num_groups=4,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
