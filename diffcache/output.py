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
