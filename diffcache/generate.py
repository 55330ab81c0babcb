"""Generation requests: one call of a supported pipeline, and saving what it makes."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffcache.adapter import REQUEST_FIELDS
from diffcache.errors import DiffCacheError, UnsupportedModelError
from diffcache.registry import find_adapter

VIDEO_SUFFIXES = (".mp4", ".gif")
IMAGE_SUFFIXES = (".png",)


@dataclasses.dataclass(frozen=True)
class Request:
    """What to generate. ``None`` fields are left to the pipeline's own defaults."""

    prompt: str | None = None
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    steps: int | None = None
    guidance: float | None = None
    class_label: int | None = None
    seed: int = 0

    def merged(self, defaults: dict[str, Any]) -> Request:
        """This request with ``defaults`` filling the fields left ``None``."""
        unknown = set(defaults) - set(REQUEST_FIELDS) - {"seed"}
        if unknown:
            raise DiffCacheError(f"unknown request fields in model defaults: {sorted(unknown)}")
        filled = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return dataclasses.replace(self, **filled)


def pipeline_kwargs(pipe: Any, request: Request) -> dict[str, Any]:
    """The keyword arguments of ``pipe(...)`` for ``request`` (validated against the family)."""
    adapter = find_adapter(pipe)
    kwargs: dict[str, Any] = {}
    for field in REQUEST_FIELDS:
        value = getattr(request, field)
        if value is None:
            continue
        if field not in adapter.call_args:
            accepted = ", ".join(f.replace("_", "-") for f in adapter.call_args)
            raise UnsupportedModelError(
                f"{adapter.name} models take no {field.replace('_', '-')}; they take: {accepted}."
            )
        kwargs[adapter.call_args[field]] = [value] if field == "class_label" else value
    kwargs["generator"] = torch.Generator("cpu").manual_seed(request.seed)
    kwargs["output_type"] = "np"
    return kwargs


def generate(pipe: Any, request: Request, progress: bool = False) -> np.ndarray:
    """Run ``pipe`` once; returns float32 media in [0, 1]: (F, H, W, C) video or (H, W, C) image."""
    adapter = find_adapter(pipe)
    kwargs = pipeline_kwargs(pipe, request)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=not progress)
    with torch.inference_mode():
        out = pipe(**kwargs)
    media = out.frames if adapter.media == "video" else out.images
    return np.asarray(media[0], dtype=np.float32)


def check_media_path(path: str | Path, video: bool) -> Path:
    """``path`` as a Path if its extension fits the media kind, else a DiffCacheError."""
    path = Path(path)
    allowed = VIDEO_SUFFIXES if video else IMAGE_SUFFIXES
    if path.suffix.lower() not in allowed:
        kind = "video" if video else "image"
        raise DiffCacheError(
            f"{path}: a {kind} is written as {' or '.join(allowed)}; change the file extension."
        )
    return path


def save_media(media: np.ndarray, path: str | Path, fps: int = 8) -> Path:
    """Write (F, H, W, C) video as .mp4/.gif or (H, W, C) image as .png."""
    video = media.ndim == 4
    path = check_media_path(path, video)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.clip(media, 0.0, 1.0) * 255).round().astype(np.uint8)
    if pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    import imageio.v3 as iio

    if path.suffix.lower() == ".gif":
        iio.imwrite(path, pixels, extension=".gif", duration=1000 / fps, loop=0)
    elif video:
        iio.imwrite(path, pixels, extension=".mp4", fps=fps, codec="libx264", macro_block_size=1)
    else:
        iio.imwrite(path, pixels, extension=".png")
    return path
