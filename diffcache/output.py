"""Reading and rebuilding denoiser outputs (tensor, tuple, or diffusers ``BaseOutput``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


def sample_of(output: Any) -> torch.Tensor:
    """The predicted sample in a denoiser output: a tensor, ``output[0]`` or ``output.sample``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"cannot find the sample in a denoiser output of type {type(output).__name__}")


def rebuild_output(template: Any, sample: torch.Tensor) -> Any:
    """An output shaped like ``template`` (a previous output) carrying ``sample``."""
    if isinstance(template, torch.Tensor):
        return sample
    if isinstance(template, (tuple, list)):
        return type(template)([sample, *template[1:]])
    if dataclasses.is_dataclass(template):
        return dataclasses.replace(template, sample=sample)
    raise TypeError(f"cannot rebuild a denoiser output of type {type(template).__name__}")


def split_residual(x: torch.Tensor, v: torch.Tensor, dim: int) -> tuple[torch.Tensor, Any]:
    """``v - x`` in float32 on the channels the input ``x`` and output ``v`` share along ``dim``,
    and ``v``'s extra channels (DiT's learned variance) as a raw copy, or None."""
    n = min(x.shape[dim], v.shape[dim])
    residual = v.narrow(dim, 0, n).float() - x.narrow(dim, 0, n).float()
    extra = v.shape[dim] - n
    return residual, (v.narrow(dim, n, extra).clone() if extra else None)


def with_extra(out: torch.Tensor, extra: torch.Tensor | None, dim: int) -> torch.Tensor:
    """``out`` with the raw extra channels of :func:`split_residual` appended along ``dim``."""
    return out if extra is None else torch.cat((out, extra), dim=dim)


def latent_part(x: torch.Tensor, v: torch.Tensor, dim: int) -> torch.Tensor:
    """The channels of a denoiser input ``x`` that its output ``v`` predicts along ``dim``: the
    latent without the condition channels image-to-video pipelines concatenate after it (Wan,
    CogVideoX); ``x`` itself when it has no more channels than ``v``."""
    n = v.shape[dim]
    return x.narrow(dim, 0, n) if x.shape[dim] > n else x
