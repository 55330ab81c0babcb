"""Request fields shared by families (each adapter lists the ones it takes); a field one flag
serves must mean the same in every family (``register_adapter`` checks)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from diffcache.request import Field

#: diffusers schedulers are built for 1000 training timesteps; more steps than that are refused.
MAX_STEPS = 1000


def prompt(call_arg: str = "prompt") -> Field:
    return Field("prompt", str, "what to generate", call_arg, required=True, input=True)


NEGATIVE_PROMPT = Field(
    "negative_prompt",
    str,
    "what to steer away from (CFG; on FLUX and HunyuanVideo only with --true-cfg above 1)",
    "negative_prompt",
)
#: a guidance-distilled family's classifier-free guidance on top of its guidance embedding
#: (FLUX, HunyuanVideo): above 1, with a negative prompt, a second denoiser call per step
TRUE_CFG = Field(
    "true_cfg", float,
    "FLUX / HunyuanVideo true CFG scale: above 1, with --negative-prompt, a second denoiser "
    "call per step", "true_cfg_scale",
    min=0.0, max=100.0,
)  # fmt: skip


def true_cfg_rule(family: str) -> Callable[[Mapping[str, Any]], str | None]:
    """The rule of a family taking :data:`NEGATIVE_PROMPT` and :data:`TRUE_CFG`: its pipeline
    runs true CFG only with both (a scale above 1), and ignores either one given alone."""

    def rule(values: Mapping[str, Any]) -> str | None:
        negative, scale = values.get("negative_prompt"), values.get("true_cfg")
        if negative is not None and (scale is None or scale <= 1):
            given = "" if scale is None else f" (--true-cfg {scale:g})"
            return f"--negative-prompt needs --true-cfg above 1 on {family} models{given}"
        if negative is None and scale is not None and scale > 1:
            return f"--true-cfg {scale:g} needs --negative-prompt on {family} models"
        return None

    return rule


STEPS = Field("steps", int, "denoising steps", "num_inference_steps", min=1, max=MAX_STEPS)
#: the video VAEs of Wan, HunyuanVideo and CogVideoX compress time 4x and keep the first frame,
#: so they make 4k + 1 frames; their pipelines would change another count without an error
FRAMES = Field(
    "frames", int, "video frames (4k + 1)", "num_frames", min=1, max=1025, multiple_of=4, offset=1
)


def side(name: str, multiple_of: int = 16) -> Field:
    """Image height or width in pixels: a multiple of the VAE factor times the patch size."""
    return Field(
        name, int, f"{name} in pixels", name, min=multiple_of, max=8192, multiple_of=multiple_of
    )


def class_label(limit: Callable[[Any], int]) -> Field:
    """The class id of a class-conditional model (DiT, VAR); ``limit``: the largest id a
    pipeline takes."""
    return Field(
        "class_label",
        int,
        "class id (class-conditional models)",
        "class_labels",
        min=0,
        as_list=True,
        limit=limit,
        input=True,
    )


def guidance(call_arg: str = "guidance_scale") -> Field:
    return Field("guidance", float, "guidance scale", call_arg, min=0.0, max=100.0)


IMAGE = (side("height"), side("width"))


def _image(path: str) -> Any:
    from diffusers.utils import load_image

    return load_image(path)


def _video(path: str) -> Any:
    """The frames as RGB images: a GIF's first frame is often a palette image and the rest RGB,
    which the pipelines' video processors cannot stack."""
    from diffusers.utils import load_video

    return load_video(path, convert_method=lambda frames: [f.convert("RGB") for f in frames])


#: inputs of the image-to-image / image-to-video / edit / inpaint variants, read from files
INPUT_IMAGE = Field("image", str, "input image file (.png, .jpg)", "image", load=_image)
MASK = Field("mask", str, "inpainting mask file: white is repainted", "mask_image", load=_image)
INPUT_VIDEO = Field("video", str, "input video file (.mp4, .gif)", "video", load=_video)
#: how far the input is noised: the pipeline runs about strength x steps of its schedule
STRENGTH = Field(
    "strength", float, "how much of the input to repaint (0..1)", "strength", min=0.0, max=1.0
)
#: FLUX Kontext scales its output to this many pixels, keeping the height / width aspect ratio
MAX_AREA = Field(
    "max_area",
    int,
    "output area in pixels (height x width set the aspect)",
    "max_area",
    min=16 * 16,
    max=8192 * 8192,
)


def required(field: Field) -> Field:
    """``field`` as a variant that cannot run without it takes it (an img2img pipeline's image)."""
    return replace(field, required=True)


#: a video family whose pipelines take a negative prompt (Wan, CogVideoX): the fields of its
#: text-to-video, image-to-video and video-to-video (as many frames as the input) pipelines
T2V_FIELDS = (prompt(), NEGATIVE_PROMPT, *IMAGE, FRAMES, STEPS, guidance())
I2V_FIELDS = (prompt(), NEGATIVE_PROMPT, required(INPUT_IMAGE), *IMAGE, FRAMES, STEPS, guidance())
V2V_FIELDS = (prompt(), NEGATIVE_PROMPT, required(INPUT_VIDEO), STRENGTH, *IMAGE, STEPS, guidance())


#: next-scale models (VAR: over the codebook; Infinity: over each bit's two values)
TOP_K = Field("top_k", int, "top-k sampling: keep the k likeliest tokens (0: all)", "top_k", min=0)
TOP_P = Field("top_p", float, "top-p (nucleus) sampling mass (0: off)", "top_p", min=0.0, max=1.0)
