"""HunyuanVideo text-to-video: adapter and a code-built tiny pipeline with random weights."""

from __future__ import annotations

from typing import Any

from diffcache.adapter import Adapter
from diffcache.pipelines._fields import FRAMES, IMAGE, STEPS, guidance, prompt
from diffcache.pipelines._stacks import DUAL_STREAM, LATENT_DIT, dual_stream_gates
from diffcache.pipelines._tiny import seeded, template_prefix_length, tiny_clip, word_tokenizer
from diffcache.registry import register_adapter
from diffcache.sites import ModuleSite, Stack

# HunyuanVideo is guidance-distilled: ``guidance_scale`` feeds the transformer's guidance
# embedding and each step makes one transformer call. The pipeline can also run true CFG
# (a second, separate call per step) when ``true_cfg_scale > 1`` and a negative prompt is given;
# that mode is not exposed here, so there is no ``negative_prompt`` field.
ADAPTER = register_adapter(
    Adapter(
        name="hunyuanvideo",
        pipelines=("HunyuanVideoPipeline",),
        denoisers=("HunyuanVideoTransformer3DModel",),
        channel_dim=1,  # (B, C, F, H, W)
        cfg="none",
        stacks=(
            Stack(
                "transformer_blocks",
                stream="dual",
                returns=("hidden", "encoder"),
                modules=DUAL_STREAM,
                # the token-replace (I2V) block modulates differently: it keeps running
                gated=dual_stream_gates("HunyuanVideoTransformerBlock"),
            ),
            Stack(
                "single_transformer_blocks",
                returns=("hidden", "encoder"),
                modules=(
                    ModuleSite("attn", "self_attn", returns=("hidden", "encoder")),
                    ModuleSite("proj_mlp", "ff"),
                ),
            ),
        ),
        media="video",
        provides=LATENT_DIT,
        output="frames",
        seed_arg="generator",
        call_args={"output_type": "np"},
        fields=(prompt(), *IMAGE, FRAMES, STEPS, guidance()),
    )
)

_LLAMA_SPECIALS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_FILLER = "<|reserved_special_token_0|>"


def _llama_tokenizer() -> Any:
    """Word-level tokenizer whose template prefix is exactly the pipeline's ``crop_start``.

    The pipeline drops the first ``crop_start`` (95) tokens, meant to be its system-prompt
    template; filler tokens after BOS pad our shorter word-level prefix to that length so the
    crop lands exactly on the user prompt.
    """
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    template, crop = DEFAULT_PROMPT_TEMPLATE["template"], DEFAULT_PROMPT_TEMPLATE["crop_start"]
    kwargs: dict[str, Any] = {
        "texts": [template],
        "specials": _LLAMA_SPECIALS,
        "bos": "<|begin_of_text|>",
        "eos": None,
    }
    short = template_prefix_length(word_tokenizer(**kwargs), template)
    if short > crop:
        raise RuntimeError(f"template prefix has {short} tokens, more than crop_start {crop}")
    return word_tokenizer(**kwargs, prefix=[_FILLER] * (crop - short))


def build_tiny(seed: int = 0) -> Any:
    """HunyuanVideoPipeline: 1 dual + 2 single blocks (dim 32), tiny Llama and CLIP, tiny VAE."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import LlamaConfig, LlamaModel

    with seeded(seed):
        tokenizer = _llama_tokenizer()
        llama = LlamaModel(
            LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=1024,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=None,
            )
        ).eval()
        clip_tokenizer, clip = tiny_clip()
        transformer = HunyuanVideoTransformer3DModel(
            in_channels=16,
            out_channels=16,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=1,
            num_single_layers=2,
            num_refiner_layers=1,
            mlp_ratio=2.0,
            patch_size=2,
            patch_size_t=1,
            qk_norm="rms_norm",
            guidance_embeds=True,
            text_embed_dim=32,
            pooled_projection_dim=32,
            rope_theta=256.0,
            rope_axes_dim=(4, 6, 6),
        ).eval()
        vae = AutoencoderKLHunyuanVideo(
            in_channels=3,
            out_channels=3,
            latent_channels=16,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            norm_num_groups=4,
            spatial_compression_ratio=8,
            temporal_compression_ratio=4,
        ).eval()
    return HunyuanVideoPipeline(
        text_encoder=llama,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=clip,
        tokenizer_2=clip_tokenizer,
    )
