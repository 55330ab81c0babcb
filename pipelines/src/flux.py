"""FLUX.1: text-to-image and its img2img / inpaint / Fill / Kontext variants (adapters and
code-built tiny pipelines with random weights)."""

from __future__ import annotations

from typing import Any

from diffcache import variants
from diffcache.adapter import Adapter
from diffcache.gated import describe
from diffcache.pipelines._fields import (
    IMAGE,
    INPUT_IMAGE,
    MASK,
    MAX_AREA,
    NEGATIVE_PROMPT,
    STEPS,
    STRENGTH,
    TRUE_CFG,
    guidance,
    prompt,
    required,
    true_cfg_rule,
)
from diffcache.pipelines._stacks import DUAL_STREAM, LATENT_DIT, dual_stream_gates
from diffcache.pipelines._tiny import on_components, on_tiny, seeded, tiny_clip, tiny_t5
from diffcache.registry import register_adapter
from diffcache.request import Field
from diffcache.sites import ModuleSite, Stack

# the dual-stream blocks, which clip the text stream to the float16 range in float16
describe(dual_stream_gates("FluxTransformerBlock", clip_fp16=("encoder",)))

# FLUX.1-dev is guidance-distilled: ``guidance_scale`` goes into the transformer's guidance
# embedding and the pipeline makes one transformer call per step. With a negative prompt and
# ``true_cfg_scale > 1`` (the ``true_cfg`` field) it also runs true CFG: a second, separate call
# per step, cond first (branch 0), then uncond (the negative prompt: branch 1). cfg stays
# "none": true CFG is opt-in, off by default.
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
        fields=(prompt(), NEGATIVE_PROMPT, TRUE_CFG, *IMAGE, STEPS, guidance()),
        rules=(true_cfg_rule("flux"),),
    )
)


def variant(name: str, pipeline: str, *inputs: Field, true_cfg: bool = True) -> Adapter:
    """A FLUX pipeline variant: the same transformer and stacks, another pipeline class and its
    input fields; FLUX plans serve it, and ``strength`` (when it takes one) shortens its run.
    ``true_cfg``: its pipeline takes ``negative_prompt`` and ``true_cfg_scale``."""
    cfg = (NEGATIVE_PROMPT, TRUE_CFG) if true_cfg else ()
    return register_adapter(
        variants.variant(
            ADAPTER,
            name,
            (pipeline,),
            (prompt(), *cfg, *inputs, *IMAGE, STEPS, guidance()),
            steps_run=variants.img2img_steps if STRENGTH in inputs else None,
            rules=(true_cfg_rule(name),) if true_cfg else (),
        )
    )


IMG2IMG = variant("flux-img2img", "FluxImg2ImgPipeline", required(INPUT_IMAGE), STRENGTH)
INPAINT = variant(
    "flux-inpaint", "FluxInpaintPipeline", required(INPUT_IMAGE), required(MASK), STRENGTH
)
# FLUX.1-Fill: the transformer also reads the masked image's latents and the mask (384 inputs);
# FluxFillPipeline has no negative prompt (no true CFG)
FILL = variant(
    "flux-fill",
    "FluxFillPipeline",
    required(INPUT_IMAGE),
    required(MASK),
    STRENGTH,
    true_cfg=False,
)
# FLUX.1-Kontext: the input image's latents join the sequence as more tokens; the pipeline
# scales its output (and the input image) to about ``max_area`` pixels (default 1024 x 1024)
KONTEXT = variant("flux-kontext", "FluxKontextPipeline", required(INPUT_IMAGE), MAX_AREA)


def _transformer(in_channels: int = 64, out_channels: int | None = None) -> Any:
    """1 double + 2 single blocks of width 32 (``out_channels`` None: as many as in)."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        out_channels=out_channels,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def build_tiny(seed: int = 0) -> Any:
    """FluxPipeline: 1 double + 2 single blocks (dim 32), tiny CLIP and T5, tiny 8x VAE."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    with seeded(seed):
        clip_tokenizer, clip = tiny_clip()
        t5_tokenizer, t5 = tiny_t5(model_max_length=512)
        transformer = _transformer()
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


build_img2img = on_tiny("FluxImg2ImgPipeline", build_tiny)
build_inpaint = on_tiny("FluxInpaintPipeline", build_tiny)
build_kontext = on_tiny("FluxKontextPipeline", build_tiny)


def build_fill(seed: int = 0) -> Any:
    """FluxFillPipeline on flux-tiny's components with a transformer that also takes the masked
    image's 64 packed latent channels and the 8x8 mask's 256 (384 inputs)."""
    from diffusers import FluxFillPipeline

    pipe = build_tiny(seed)
    with seeded(seed + 1):
        transformer = _transformer(in_channels=64 + 64 + 8 * 8 * 4, out_channels=64)
    return on_components(FluxFillPipeline, pipe, transformer=transformer)
