"""Uniform draws per row from one generator or a generator per row."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


def uniform(
    shape: tuple[int, ...],
    generator: Generators,
    device: torch.device,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp64 U(0, 1) of ``shape`` ``[B, m, ...]``. With a generator per row, row b draws only for
    its ``valid`` candidates (the leading ones of its padded set), so its draws do not depend on
    how many candidates its batch-mates have."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(shape, generator=generator, dtype=torch.float64).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for {shape[0]} batch rows")
    out = torch.full(shape, 0.5, dtype=torch.float64)
    inner = math.prod(shape[2:])
    for b, g in enumerate(generator):
        n = shape[1] if valid is None else int(valid[b].sum())
        out[b, :n] = torch.rand(n * inner, generator=g, dtype=torch.float64).view(n, *shape[2:])
    return out.to(device)
