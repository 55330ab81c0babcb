"""Wan2.1 / Wan2.2 text-, image- and video-to-video: adapters and code-built pipelines with
random weights."""

from __future__ import annotations

from typing import Any

from diffcache import variants
from diffcache.adapter import Adapter
from diffcache.gated import GatedBlock, GatedTerm, Modulation, describe
from diffcache.pipelines._fields import I2V_FIELDS, T2V_FIELDS, V2V_FIELDS
from diffcache.pipelines._stacks import LATENT_DIT
from diffcache.pipelines._tiny import on_components, seeded, t5_encoder, word_tokenizer
from diffcache.registry import register_adapter
from diffcache.sites import ModuleSite, Stack

# WanPipeline runs CFG as two transformer calls per step (cond, then uncond) when
# guidance_scale > 1; each call returns a tuple (return_dict=False). With ``transformer_2`` and
# ``boundary_ratio`` (Wan2.2) the high-noise steps run ``transformer`` and the rest
# ``transformer_2``. A block returns the hidden states; attn1 / attn2 / ffn return tensors
# before the block's AdaLN gates.
# WanTransformerBlock: h += attn1 * gate_msa (chunk 2 of scale_shift_table + temb, in float32);
# h += attn2 (ungated); h += ffn * c_gate_msa (chunk 5). temb is (B, 6, D), or (B, N, 6, D) with
# per-token modulation (Wan2.2 TI2V), so the chunks are taken along dim -2.
GATED = GatedBlock(
    blocks=("WanTransformerBlock",),
    modulations=(Modulation("mod", "scale_shift_table", "table", dim=-2),),
    streams=(
        (
            "hidden",
            (
                GatedTerm("attn1", gate=("mod", 2)),
                GatedTerm("attn2"),
                GatedTerm("ffn", gate=("mod", 5)),
            ),
        ),
    ),
)
describe(GATED)

ADAPTER = register_adapter(
    Adapter(
        name="wan2.1",
        pipelines=("WanPipeline",),
        denoisers=("WanTransformer3DModel",),
        experts=("transformer", "transformer_2"),
        channel_dim=1,  # (B, C, F, H, W)
        cfg="separate",
        stacks=(
            Stack(
                "blocks",
                modules=(
                    ModuleSite("attn1", "self_attn"),
                    ModuleSite("attn2", "cross_attn"),
                    ModuleSite("ffn", "ff"),
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

# WanImageToVideoPipeline (Wan2.1 I2V with a CLIP image encoder; Wan2.2 I2V with two experts and
# ``boundary_ratio``, no image encoder) concatenates 20 image-condition channels after the 16
# latent channels of the transformer input; the output has the 16 latent channels.
# WanVideoToVideoPipeline runs the last ``strength`` part of the schedule (it slices the
# timesteps: the driver counts the steps that run).
I2V = register_adapter(
    variants.variant(
        ADAPTER,
        "wan2.1-i2v",
        ("WanImageToVideoPipeline",),
        I2V_FIELDS,
    )
)
V2V = register_adapter(
    variants.variant(
        ADAPTER,
        "wan2.1-v2v",
        ("WanVideoToVideoPipeline",),
        V2V_FIELDS,
        steps_run=variants.video_to_video_steps,
    )
)

# Wan2.1-T2V-1.3B transformer config.
WAN_1_3B_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
}


def _text_stack(d_model: int) -> tuple[Any, Any]:
    """Word-level tokenizer plus a tiny UMT5 encoder whose output width is ``d_model``."""
    tokenizer = word_tokenizer(model_max_length=512)
    encoder = t5_encoder(tokenizer, d_model, d_kv=8, d_ff=32, layers=1, heads=2, umt5=True)
    return tokenizer, encoder.eval()


def _tiny_vae() -> Any:
    """Wan VAE layout (8x spatial, 4x temporal, 16 latent channels) at a tiny width."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ).eval()


def _pipeline(transformer: Any, text_dim: int, cls: str = "WanPipeline", **parts: Any) -> Any:
    """A Wan pipeline of class ``cls`` (``diffusers``) with a tiny UMT5 and VAE, UniPC."""
    import diffusers
    from diffusers import UniPCMultistepScheduler

    tokenizer, text_encoder = _text_stack(text_dim)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
    )
    return getattr(diffusers, cls)(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_tiny_vae(),
        scheduler=scheduler,
        transformer=transformer.eval(),
        **parts,
    )


def _tiny_transformer(in_channels: int = 16, image_dim: int | None = None) -> Any:
    """A 2-layer Wan transformer (dim 64); ``image_dim``: the width of the CLIP image
    embeddings its cross-attention also attends to (Wan2.1 I2V)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=32,
        in_channels=in_channels,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=128,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=image_dim,
        added_kv_proj_dim=64 if image_dim else None,
    )


def build_tiny(seed: int = 0) -> Any:
    """WanPipeline with a 2-layer Wan transformer (dim 64), tiny UMT5 and tiny VAE."""
    with seeded(seed):
        return _pipeline(_tiny_transformer(), text_dim=32)


#: latent channels plus the image condition (4 mask channels and 16 latent channels)
_I2V_CHANNELS = 36


def build_tiny_i2v(seed: int = 0) -> Any:
    """Wan2.1-style WanImageToVideoPipeline: the tiny transformer with image cross-attention
    and a 2-layer CLIP vision encoder (32 px) with its image processor, built from config."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    with seeded(seed):
        encoder = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            )
        ).eval()
        processor = CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        )
        transformer = _tiny_transformer(_I2V_CHANNELS, image_dim=32)
        return _pipeline(
            transformer,
            text_dim=32,
            cls="WanImageToVideoPipeline",
            image_encoder=encoder,
            image_processor=processor,
        )


#: Wan2.2 I2V switches from ``transformer`` to ``transformer_2`` below this fraction of the
#: training timesteps (the A14B checkpoint's value)
WAN22_BOUNDARY = 0.9


def build_tiny_wan22_i2v(seed: int = 0) -> Any:
    """Wan2.2-style two-expert WanImageToVideoPipeline: a high-noise ``transformer`` and a
    low-noise ``transformer_2`` (each the tiny transformer), ``boundary_ratio``, no image
    encoder."""
    with seeded(seed):
        high = _tiny_transformer(_I2V_CHANNELS)
        low = _tiny_transformer(_I2V_CHANNELS).eval()
        return _pipeline(
            high,
            text_dim=32,
            cls="WanImageToVideoPipeline",
            transformer_2=low,
            boundary_ratio=WAN22_BOUNDARY,
        )


def build_tiny_v2v(seed: int = 0) -> Any:
    """WanVideoToVideoPipeline with the tiny text-to-video parts."""
    with seeded(seed):
        return _pipeline(_tiny_transformer(), text_dim=32, cls="WanVideoToVideoPipeline")


def build_1_3b_random(seed: int = 0) -> Any:
    """WanPipeline with the real Wan2.1-T2V-1.3B transformer shape and random weights.

    The text encoder and VAE are tiny (UMT5 of width 4096 so its output fits ``text_dim``).
    Building takes about 25 s and 6 GB of memory in fp32.
    """
    from diffusers import WanTransformer3DModel

    with seeded(seed):
        transformer = WanTransformer3DModel(**WAN_1_3B_CONFIG)
        return _pipeline(transformer, text_dim=WAN_1_3B_CONFIG["text_dim"])


def video_to_video(pipe: Any) -> Any:
    """A WanVideoToVideoPipeline over a text-to-video Wan pipeline's parts (shared, not
    copied): e.g. ``video_to_video(load_model("wan-shapes"))`` repaints clips with the trained
    weights (``video=`` frames, ``strength``)."""
    from diffusers import WanVideoToVideoPipeline

    return on_components(WanVideoToVideoPipeline, pipe)
