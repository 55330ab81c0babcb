"""Qwen-Image: text-to-image and its img2img / inpaint / edit variants (adapters and code-built
tiny pipelines with random weights)."""

from __future__ import annotations

from typing import Any

from diffcache import variants
from diffcache.adapter import Adapter
from diffcache.gated import GatedBlock, GatedTerm, Modulation, describe
from diffcache.pipelines._fields import (
    IMAGE,
    INPUT_IMAGE,
    MASK,
    NEGATIVE_PROMPT,
    STEPS,
    STRENGTH,
    guidance,
    prompt,
    required,
)
from diffcache.pipelines._stacks import LATENT_DIT
from diffcache.pipelines._tiny import (
    on_components,
    on_tiny,
    seeded,
    template_prefix_length,
    word_tokenizer,
)
from diffcache.registry import register_adapter
from diffcache.request import Field
from diffcache.sites import ModuleSite, Stack

# QwenImagePipeline runs true CFG as two separate transformer calls per step (cond, then
# uncond) when ``true_cfg_scale > 1`` and a negative prompt is given; the request's guidance is
# therefore ``true_cfg_scale``. The transformer has no guidance embedding (``guidance_scale``
# is ignored by the stock model).
# QwenImageTransformerBlock: img_mod / txt_mod (SiLU + Linear on temb) give 6 chunks per stream
# (its two halves of 3 are chunks 0-2 and 3-5); each stream adds attention times chunk 2 and its
# MLP times chunk 5, and is clipped to the float16 range in float16. With ``zero_cond_t`` or a
# ``modulate_index`` (Qwen-Image-Edit) the modulation differs: such blocks keep running.
GATED = GatedBlock(
    blocks=("QwenImageTransformerBlock",),
    modulations=(
        Modulation("img", "img_mod", "call", dim=-1),
        Modulation("txt", "txt_mod", "call", dim=-1),
    ),
    streams=(
        ("encoder", (GatedTerm("attn", 1, ("txt", 2)), GatedTerm("txt_mlp", gate=("txt", 5)))),
        ("hidden", (GatedTerm("attn", 0, ("img", 2)), GatedTerm("img_mlp", gate=("img", 5)))),
    ),
    requires=(("zero_cond_t", False),),
    absent=("modulate_index",),
    clip_fp16=("encoder", "hidden"),
)
describe(GATED)

ADAPTER = register_adapter(
    Adapter(
        name="qwenimage",
        pipelines=("QwenImagePipeline",),
        denoisers=("QwenImageTransformer2DModel",),
        channel_dim=-1,  # packed tokens (B, N, 4 * latent_channels)
        cfg="separate",
        stacks=(
            Stack(
                "transformer_blocks",
                stream="dual",
                returns=("encoder", "hidden"),
                modules=(
                    ModuleSite("attn", "self_attn", returns=("hidden", "encoder")),
                    ModuleSite("img_mlp", "ff"),
                    ModuleSite("txt_mlp", "context_ff"),
                ),
            ),
        ),
        media="image",
        provides=LATENT_DIT,
        output="images",
        seed_arg="generator",
        call_args={"output_type": "np"},
        fields=(prompt(), NEGATIVE_PROMPT, *IMAGE, STEPS, guidance("true_cfg_scale")),
    )
)


def variant(name: str, pipeline: str, *inputs: Field) -> Adapter:
    """A Qwen-Image pipeline variant: the same transformer and stacks, another pipeline class and
    its input fields; Qwen-Image plans serve it, and ``strength`` shortens its run."""
    return register_adapter(
        variants.variant(
            ADAPTER,
            name,
            (pipeline,),
            (prompt(), NEGATIVE_PROMPT, *inputs, *IMAGE, STEPS, guidance("true_cfg_scale")),
            steps_run=variants.img2img_steps if STRENGTH in inputs else None,
        )
    )


IMG2IMG = variant("qwenimage-img2img", "QwenImageImg2ImgPipeline", required(INPUT_IMAGE), STRENGTH)
INPAINT = variant(
    "qwenimage-inpaint", "QwenImageInpaintPipeline", required(INPUT_IMAGE), required(MASK), STRENGTH
)
# QwenImageEditPipeline: the input image enters the Qwen2.5-VL encoder (through its processor)
# and, as latents, the transformer's sequence after the noised latents; all steps run.
EDIT = variant("qwenimage-edit", "QwenImageEditPipeline", required(INPUT_IMAGE))

# Copied from the QwenImagePipeline constructor values (they are instance attributes there).
_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
_DROP = 34
_SPECIALS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def _qwen_tokenizer(
    template: str = _TEMPLATE, drop: int = _DROP, kept: str = "{}", pieces: tuple[str, ...] = ()
) -> Any:
    """Word-level tokenizer; like Qwen2's, it adds no BOS/EOS and pads with ``<|endoftext|>``.

    The pipeline drops the first ``drop`` tokens of its ``template``, which end where ``kept``
    starts; ``pieces`` (BPE-like merges) make our word split give that count.
    """
    tokenizer = word_tokenizer(
        texts=[template],
        specials=_SPECIALS,
        bos=None,
        eos=None,
        pad="<|endoftext|>",
        pieces=pieces,
        model_max_length=32768,
    )
    dropped = template_prefix_length(tokenizer, template, kept)
    if dropped != drop:
        raise RuntimeError(f"the template has {dropped} tokens before {kept!r}, not {drop}")
    return tokenizer


def _qwen_text_encoder(tokenizer: Any) -> Any:
    """Tiny Qwen2.5-VL (2 text layers of width 32, 1 vision block) built from config."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 4096,
            "bos_token_id": None,
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": tokenizer.pad_token_id,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [2, 3, 3],
            },
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": 32,
            "fullatt_block_indexes": [0],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_tiny(seed: int = 0) -> Any:
    """QwenImagePipeline: 2 MMDiT blocks (dim 32), tiny Qwen2.5-VL encoder, tiny 8x VAE."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    with seeded(seed):
        tokenizer = _qwen_tokenizer()
        text_encoder = _qwen_text_encoder(tokenizer)
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            axes_dims_rope=(4, 6, 6),
        ).eval()
        vae = AutoencoderKLQwenImage(
            base_dim=4,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    return QwenImagePipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


build_img2img = on_tiny("QwenImageImg2ImgPipeline", build_tiny)
build_inpaint = on_tiny("QwenImageInpaintPipeline", build_tiny)


#: Qwen2's BPE merges in the edit template ("user's", "background),"): with them our word split
#: gives its system part the 64 tokens the pipeline drops
_EDIT_PIECES = ("'s", "),")
#: the vision encoder sees the input image at 56 x 56 pixels: 4 x 4 patches of 14, 4 tokens
_EDIT_VISION_PIXELS = 56 * 56


def _image_only_processor(image_processor: Any, tokenizer: Any) -> Any:
    """A Qwen2-VL processor without its video processor (which needs torchvision): the
    processor's parts are the arguments its ``__init__`` names."""
    from transformers import Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor: Any, tokenizer: Any) -> None:
            super().__init__(image_processor, tokenizer, None)

    return ImageOnlyQwen2VLProcessor(image_processor, tokenizer)


def build_edit(seed: int = 0) -> Any:
    """QwenImageEditPipeline on qwenimage-tiny's transformer, VAE and scheduler, with a tiny
    Qwen2.5-VL encoder on the edit template's vocabulary and the slow (PIL) Qwen2-VL image
    processor."""
    from diffusers import QwenImageEditPipeline
    from transformers import Qwen2VLImageProcessorPil

    pipe = on_components(QwenImageEditPipeline, build_tiny(seed), processor=None)
    template = pipe.prompt_template_encode
    drop = pipe.prompt_template_encode_start_idx
    with seeded(seed):
        tokenizer = _qwen_tokenizer(template, drop, "<|vision_start|>", _EDIT_PIECES)
        text_encoder = _qwen_text_encoder(tokenizer)
    images = Qwen2VLImageProcessorPil(
        min_pixels=_EDIT_VISION_PIXELS, max_pixels=_EDIT_VISION_PIXELS
    )
    pipe.register_modules(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        processor=_image_only_processor(images, tokenizer),
    )
    return pipe
