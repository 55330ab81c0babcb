"""Quality metrics: an accelerated output against the un-accelerated baseline.

Both outputs come from the same prompt and seed. Media are numpy float arrays in [0, 1]:
an image is (H, W, C), a video is (F, H, W, C).

Conventions:

* ``psnr`` is computed over the whole sample: one mean squared error over every frame, pixel and
  channel, then ``10 * log10(1 / mse)``. It is not the mean of per-frame PSNRs, so a video with
  one frame identical to the baseline (and others that differ) gets a finite PSNR; only a sample
  equal to the baseline everywhere has ``float("inf")``. Reports never store inf: the eval
  runner writes such a run's PSNR as null and says why in the report's ``notes``.
* ``ssim`` is computed per frame and averaged over frames. It uses torchmetrics' Gaussian window
  (sigma 1.5, 11 px) when both image sides are at least 11 px. For smaller images the window is
  the largest odd size not above the shorter side, with sigma scaled by the same ratio
  (sigma = 0.3 * radius), so tiny test images (8x8, 16x16) work; sides of 1-2 px get a 1 px
  window (a per-pixel comparison).
* ``lpips`` (AlexNet) is computed per frame and averaged, and only when it can run offline; it
  never downloads anything. Otherwise it returns ``(None, reason)``.

torch, torchmetrics and lpips are imported inside the functions that need them.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

#: File name of torchvision's AlexNet weights in the torch hub cache (``checkpoints/``).
ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"
#: Smallest image side AlexNet's feature stack accepts (two 3x3/2 max-pools after a 11x11/4 conv).
LPIPS_MIN_SIDE = 31
_SSIM_DEFAULT_KERNEL = 11
_SSIM_DEFAULT_SIGMA = 1.5


def _as_frames(ref: Any, test: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate a pair of media arrays and return both as float64 (N, H, W, C) frame stacks."""
    a = np.asarray(ref, dtype=np.float64)
    b = np.asarray(test, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(
            f"reference and test media differ in shape: {a.shape} vs {b.shape}; "
            "compare outputs of the same size (same resolution, frame count and channels)"
        )
    if a.ndim not in (3, 4):
        raise ValueError(
            f"media array has shape {a.shape}; expected an image (H, W, C) or a video (F, H, W, C)"
        )
    if a.size == 0:
        raise ValueError(f"media array of shape {a.shape} is empty")
    for name, arr in (("reference", a), ("test", b)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} media contains NaN or inf; expected values in [0, 1]")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"{name} media has values in [{lo:.4g}, {hi:.4g}]; expected [0, 1] "
                "(clamp and rescale decoder output before comparing)"
            )
    if a.ndim == 3:
        a, b = a[None], b[None]
    return a, b


def _to_nchw(frames: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) numpy -> (N, C, H, W) float64 tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2)))


def psnr(ref: Any, test: Any) -> float:
    """Peak signal-to-noise ratio in dB (data range 1.0) over the whole sample; ``inf`` when the
    inputs are identical.

    Video: one mean squared error over all frames and pixels (not a mean of per-frame PSNRs).
    """
    a, b = _as_frames(ref, test)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(1.0 / mse))


def ssim_window(height: int, width: int) -> tuple[int, float]:
    """Gaussian SSIM window (kernel_size, sigma) valid for an image of this size.

    11 px / sigma 1.5 (torchmetrics' default) when both sides are >= 11; otherwise the largest
    odd size <= the shorter side, with sigma = 0.3 * radius (the default's ratio, 1.5 / 5).
    """
    side = min(height, width)
    if side >= _SSIM_DEFAULT_KERNEL:
        return _SSIM_DEFAULT_KERNEL, _SSIM_DEFAULT_SIGMA
    kernel = side if side % 2 == 1 else side - 1
    kernel = max(kernel, 1)
    radius = (kernel - 1) // 2
    sigma = 0.3 * radius if radius > 0 else 0.1
    # torchmetrics derives the Gaussian window size from sigma: int(3.5 * sigma + 0.5) * 2 + 1.
    assert int(3.5 * sigma + 0.5) * 2 + 1 == kernel
    return kernel, sigma


def ssim(ref: Any, test: Any) -> float:
    """Structural similarity (data range 1.0); 1.0 for identical inputs.

    Video: SSIM per frame, then the mean over frames. The Gaussian window is chosen by
    :func:`ssim_window` so that it never exceeds the image side.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = _as_frames(ref, test)
    kernel, sigma = ssim_window(a.shape[1], a.shape[2])
    values = structural_similarity_index_measure(
        _to_nchw(b),
        _to_nchw(a),
        gaussian_kernel=True,
        sigma=sigma,
        kernel_size=kernel,
        reduction="none",
        data_range=1.0,
    )
    return float(values.mean())


def _find_spec(name: str) -> Any:
    """``importlib.util.find_spec`` that treats any lookup failure as "not installed"."""
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def alexnet_weights_path() -> str:
    """Where torchvision looks for the AlexNet weights (torch hub cache; honours TORCH_HOME)."""
    import torch

    return os.path.join(torch.hub.get_dir(), "checkpoints", ALEXNET_WEIGHTS)


@functools.lru_cache(maxsize=1)
def lpips_unavailable_reason() -> str | None:
    """Why LPIPS cannot be computed offline here, or None when it can. Cached.

    Checks, without downloading anything: the ``lpips`` package is installed (with its linear
    layer weights), ``torchvision`` imports, and the AlexNet backbone weight file is present in
    the torch hub cache. Call ``lpips_unavailable_reason.cache_clear()`` after changing any of it.
    """
    missing: list[str] = []
    spec = _find_spec("lpips")
    if spec is None:
        missing.append("the 'lpips' package is not installed")
    else:
        locations = list(spec.submodule_search_locations or [])
        linear = [os.path.join(loc, "weights", "v0.1", "alex.pth") for loc in locations]
        if linear and not any(os.path.isfile(p) for p in linear):
            missing.append(f"the lpips linear-layer weights are missing ({linear[0]})")
    try:
        importlib.import_module("torchvision")
    except Exception as exc:  # any failure means "not importable"
        missing.append(f"torchvision is not importable ({type(exc).__name__}: {exc})")
    weights = alexnet_weights_path()
    if not os.path.isfile(weights):
        missing.append(f"the AlexNet backbone weights are not in the torch hub cache ({weights})")
    if missing:
        return "LPIPS (AlexNet) not computed offline: " + "; ".join(missing) + " (never downloaded)"
    return None


@functools.lru_cache(maxsize=1)
def _lpips_model() -> Any:
    """Build the LPIPS AlexNet model once (only after the availability check passed)."""
    import lpips as lpips_pkg

    model = lpips_pkg.LPIPS(net="alex", verbose=False)
    model.eval()
    return model


def lpips(ref: Any, test: Any) -> tuple[float | None, str | None]:
    """LPIPS (AlexNet) distance, lower is closer: ``(value, None)`` or ``(None, reason)``.

    Inputs are scaled to [-1, 1]; video is scored per frame and averaged. Grayscale is repeated to
    three channels and an alpha channel is dropped. Never downloads weights: when the package,
    torchvision or the backbone weights are missing, or the frames are smaller than
    ``LPIPS_MIN_SIDE`` px, the value is None and the reason says why.
    """
    a, b = _as_frames(ref, test)
    reason = lpips_unavailable_reason()
    if reason is not None:
        return None, reason
    height, width, channels = a.shape[1:]
    if min(height, width) < LPIPS_MIN_SIDE:
        return None, (
            f"LPIPS (AlexNet) needs frames of at least {LPIPS_MIN_SIDE}x{LPIPS_MIN_SIDE} px; "
            f"got {height}x{width}"
        )
    if channels == 1:
        a, b = np.repeat(a, 3, axis=3), np.repeat(b, 3, axis=3)
    elif channels == 4:
        a, b = a[..., :3], b[..., :3]
    elif channels != 3:
        raise ValueError(f"LPIPS needs 1, 3 or 4 channels; got {channels}")
    try:
        model = _lpips_model()
    except Exception as exc:  # report it; never crash an eval run
        return None, f"LPIPS (AlexNet) model failed to load: {type(exc).__name__}: {exc}"

    import torch

    values: list[float] = []
    with torch.no_grad():
        for fa, fb in zip(a, b, strict=True):
            ta = _to_nchw(fa[None]).float() * 2.0 - 1.0
            tb = _to_nchw(fb[None]).float() * 2.0 - 1.0
            values.append(float(model(ta, tb).mean()))
    return float(np.mean(values)), None


def agreement(ref: str, test: str) -> float:
    """1.0 if the two texts are exactly equal, else 0.0."""
    return 1.0 if ref == test else 0.0


def mean(values: Iterable[float | None]) -> float | None:
    """Mean of the non-None values; None when there are none."""
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return None
    return sum(kept) / len(kept)
