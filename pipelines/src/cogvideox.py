"""CogVideoX text-, image- and video-to-video: adapters and code-built tiny pipelines with
random weights."""

from __future__ import annotations

from typing import Any

from diffcache import variants
from diffcache.adapter import Adapter
from diffcache.gated import GatedBlock, GatedTerm, Modulation, describe
from diffcache.pipelines._fields import I2V_FIELDS, T2V_FIELDS, V2V_FIELDS
from diffcache.pipelines._stacks import LATENT_DIT
from diffcache.pipelines._tiny import seeded, tiny_t5
from diffcache.registry import register_adapter
from diffcache.sites import ModuleSite, Stack

# CogVideoXPipeline runs CFG batched when guidance_scale > 1: one transformer call per step on
# [uncond, cond] (negative prompt first). The transformer takes (B, F, C, H, W) latents.
# CogVideoXBlock: norm1 / norm2 (CogVideoXLayerNormZero, linear(silu(temb)) in 6 chunks) gate
# attention (chunks 2 / 5 for video / text) and the feed-forward, which runs once on [text,
# video] tokens: the text stream takes its first rows, the video stream the rest.
GATED = GatedBlock(
    blocks=("CogVideoXBlock",),
    modulations=(Modulation("n1", "norm1"), Modulation("n2", "norm2")),
    streams=(
        ("hidden", (GatedTerm("attn1", 0, ("n1", 2)), GatedTerm("ff", 0, ("n2", 2), "rest"))),
        ("encoder", (GatedTerm("attn1", 1, ("n1", 5)), GatedTerm("ff", 0, ("n2", 5), "encoder"))),
    ),
)
describe(GATED)

ADAPTER = register_adapter(
    Adapter(
        name="cogvideox",
        pipelines=("CogVideoXPipeline",),
        denoisers=("CogVideoXTransformer3DModel",),
        channel_dim=2,  # (B, F, C, H, W)
        cfg="batched",
        stacks=(
            Stack(
                "transformer_blocks",
                stream="dual",
                returns=("hidden", "encoder"),
                modules=(
                    ModuleSite("attn1", "self_attn", returns=("hidden", "encoder")),
                    ModuleSite("ff", "ff"),
                ),
            ),
        ),
        media="video",
        provides=LATENT_DIT,
        output="frames",
        seed_arg="generator",
        call_args={"output_type": "np"},
        fields=T2V_FIELDS,
    )
)

# CogVideoXImageToVideoPipeline concatenates the image latents (16 channels) after the 16 latent
# channels along dim 2; the output has the 16 latent channels. CogVideoXVideoToVideoPipeline
# runs the last ``strength`` part of the schedule (it slices the timesteps: the driver counts
# the steps that run).
I2V = register_adapter(
    variants.variant(
        ADAPTER,
        "cogvideox-i2v",
        ("CogVideoXImageToVideoPipeline",),
        I2V_FIELDS,
    )
)
V2V = register_adapter(
    variants.variant(
        ADAPTER,
        "cogvideox-v2v",
        ("CogVideoXVideoToVideoPipeline",),
        V2V_FIELDS,
        steps_run=variants.video_to_video_steps,
    )
)

# The pipeline pads prompts to 226 T5 tokens by default and the transformer's positional
# table is laid out for exactly that many text tokens.
_TEXT_LEN = 226


def build_tiny(seed: int = 0, cls: str = "CogVideoXPipeline", in_channels: int = 16) -> Any:
    """CogVideoXPipeline (2B layout): 2 blocks (dim 32), tiny T5, tiny 8x/4x VAE.

    The sin-cos positional table is sized for 64x64 pixels and 9 frames; other sizes are
    recomputed on the fly by the transformer. ``cls``: another pipeline class of the family
    with the same parts (``in_channels``: 32 where the image latents are concatenated).
    """
    import diffusers
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXTransformer3DModel,
    )

    with seeded(seed):
        tokenizer, text_encoder = tiny_t5(model_max_length=_TEXT_LEN)
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=in_channels,
            out_channels=16,
            time_embed_dim=32,
            text_embed_dim=32,
            num_layers=2,
            sample_width=8,
            sample_height=8,
            sample_frames=9,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=_TEXT_LEN,
        ).eval()
        vae = AutoencoderKLCogVideoX(
            in_channels=3,
            out_channels=3,
            latent_channels=16,
            down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            norm_num_groups=4,
            temporal_compression_ratio=4,
            sample_height=64,
            sample_width=64,
        ).eval()
    scheduler = CogVideoXDDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        snr_shift_scale=3.0,
        timestep_spacing="trailing",
    )
    return getattr(diffusers, cls)(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )


def build_tiny_i2v(seed: int = 0) -> Any:
    """CogVideoXImageToVideoPipeline: the tiny parts, the transformer taking 32 channels."""
    return build_tiny(seed, "CogVideoXImageToVideoPipeline", in_channels=32)


def build_tiny_v2v(seed: int = 0) -> Any:
    """CogVideoXVideoToVideoPipeline with the tiny text-to-video parts."""
    return build_tiny(seed, "CogVideoXVideoToVideoPipeline")
