"""HunyuanVideo text- and image-to-video: adapters and code-built tiny pipelines with random
weights."""

from __future__ import annotations

from typing import Any

from diffcache import variants
from diffcache.adapter import Adapter
from diffcache.gated import describe
from diffcache.pipelines._fields import (
    FRAMES,
    IMAGE,
    INPUT_IMAGE,
    NEGATIVE_PROMPT,
    STEPS,
    TRUE_CFG,
    guidance,
    prompt,
    required,
    true_cfg_rule,
)
from diffcache.pipelines._stacks import DUAL_STREAM, LATENT_DIT, dual_stream_gates
from diffcache.pipelines._tiny import (
    on_components,
    seeded,
    template_prefix_length,
    tiny_clip,
    word_tokenizer,
)
from diffcache.registry import register_adapter
from diffcache.sites import ModuleSite, Stack

# the dual-stream blocks; the token-replace (I2V) block modulates differently: it keeps running
describe(dual_stream_gates("HunyuanVideoTransformerBlock"))

# HunyuanVideo is guidance-distilled: ``guidance_scale`` feeds the transformer's guidance
# embedding and each step makes one transformer call. With a negative prompt and
# ``true_cfg_scale > 1`` (the ``true_cfg`` field) the pipeline also runs true CFG: a second,
# separate call per step, cond first (branch 0), then uncond (the negative prompt: branch 1).
# cfg stays "none": true CFG is opt-in, off by default.
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
        fields=(prompt(), NEGATIVE_PROMPT, TRUE_CFG, *IMAGE, FRAMES, STEPS, guidance()),
        rules=(true_cfg_rule("hunyuanvideo"),),
    )
)


# HunyuanVideoImageToVideoPipeline: the image enters the Llava text encoder, and the first latent
# frame is the image's (``token_replace``: the transformer's token-replace blocks; the 33-channel
# ``latent_concat`` checkpoint concatenates image latents and a mask instead). One transformer
# call per step, as in text-to-video, and true CFG alike (its uncond call: the negative prompt
# with a black image).
I2V = register_adapter(
    variants.variant(
        ADAPTER,
        "hunyuanvideo-i2v",
        ("HunyuanVideoImageToVideoPipeline",),
        (
            prompt(),
            NEGATIVE_PROMPT,
            TRUE_CFG,
            required(INPUT_IMAGE),
            *IMAGE,
            FRAMES,
            STEPS,
            guidance(),
        ),
        rules=(true_cfg_rule("hunyuanvideo-i2v"),),
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


def _tiny_transformer(image_condition_type: str | None = None) -> Any:
    """1 dual-stream + 2 single-stream blocks of width 32 on 16 latent channels (33 with
    ``latent_concat``: latents, image latents and a mask)."""
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel(
        in_channels=33 if image_condition_type == "latent_concat" else 16,
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
        image_condition_type=image_condition_type,
    ).eval()


def build_tiny(seed: int = 0) -> Any:
    """HunyuanVideoPipeline: 1 dual + 2 single blocks (dim 32), tiny Llama and CLIP, tiny VAE."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
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
        transformer = _tiny_transformer()
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


#: the I2V template's one split word: our word split gives its system part one token fewer than
#: the ``crop_start`` of Llama-3's BPE, so ``transitions`` is two tokens, as BPE may make it
_I2V_PIECES = ("transition",)
#: the tiny vision tower's patch grid: (48 / 2)^2 = 576 image features, the template's
#: ``image_emb_len``
_VISION_SIDE, _VISION_PATCH = 48, 2


def _llava_tokenizer() -> Any:
    """Word-level tokenizer for the I2V template: its ``<image>`` token is at the template's
    ``image_emb_start`` and the user prompt starts at its ``crop_start``."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import (
        DEFAULT_PROMPT_TEMPLATE,
    )

    template = DEFAULT_PROMPT_TEMPLATE["template"]
    tokenizer = word_tokenizer(
        texts=[template],
        specials=(*_LLAMA_SPECIALS, "<image>"),
        bos="<|begin_of_text|>",
        eos=None,
        pieces=_I2V_PIECES,
    )
    image_at = tokenizer(template).input_ids.index(tokenizer.convert_tokens_to_ids("<image>"))
    crop = template_prefix_length(tokenizer, template)
    want = (DEFAULT_PROMPT_TEMPLATE["image_emb_start"], DEFAULT_PROMPT_TEMPLATE["crop_start"])
    if (image_at, crop) != want:
        raise RuntimeError(f"template positions (image, prompt) are {(image_at, crop)}, not {want}")
    return tokenizer


def _tiny_llava(tokenizer: Any) -> Any:
    """LlavaForConditionalGeneration: a 2-layer CLIP vision tower (48 px, patch 2) and a 3-layer
    Llama of width 32, built from config."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": _VISION_SIDE,
            "patch_size": _VISION_PATCH,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 1024,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": None,
        },
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        # the pipeline reads it at the top level, as the checkpoint's config.json has it
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaForConditionalGeneration(config).eval()


def build_tiny_i2v(seed: int = 0, image_condition_type: str = "token_replace") -> Any:
    """HunyuanVideoImageToVideoPipeline on hunyuanvideo-tiny's VAE, CLIP text encoder and
    scheduler, with a tiny Llava encoder and a tiny image-conditioned transformer
    (``token_replace`` as HunyuanVideo-I2V, or the 33-channel ``latent_concat``)."""
    from diffusers import HunyuanVideoImageToVideoPipeline
    from transformers import CLIPImageProcessorPil

    base = build_tiny(seed)
    with seeded(seed):
        tokenizer = _llava_tokenizer()
        text_encoder = _tiny_llava(tokenizer)
        transformer = _tiny_transformer(image_condition_type)
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": _VISION_SIDE},
        crop_size={"height": _VISION_SIDE, "width": _VISION_SIDE},
    )
    return on_components(
        HunyuanVideoImageToVideoPipeline,
        base,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        image_processor=processor,
    )


def build_tiny_i2v_33ch(seed: int = 0) -> Any:
    """:func:`build_tiny_i2v` with the ``latent_concat`` transformer (HunyuanVideo-I2V-33ch)."""
    return build_tiny_i2v(seed, "latent_concat")
