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
    """fp64 U(0, 1) of ``shape`` ``[B, m, ...]`` on ``device``.

    One generator (or ``None``, the global one) draws the whole tensor at once. A list gives
    row b its own generator, which draws ``prod(shape[2:])`` numbers for each of the row's
    ``valid`` candidates, in candidate order, and nothing for padding (0.5 there): a row's
    draws then depend only on its own candidates, not on its batch-mates. A generator draws on
    its own device (CPU or CUDA)."""
    if generator is None:
        return torch.rand(shape, dtype=torch.float64, device=device)
    if isinstance(generator, torch.Generator):
        out = torch.rand(shape, generator=generator, dtype=torch.float64, device=generator.device)
        return out.to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for {shape[0]} batch rows")
    out = torch.full(shape, 0.5, dtype=torch.float64, device=device)
    inner = math.prod(shape[2:])
    for b, g in enumerate(generator):
        if valid is None:
            n = shape[1]
            draws = torch.rand(n * inner, generator=g, dtype=torch.float64, device=g.device)
            out[b] = draws.view(shape[1:]).to(device)
        else:
            n = int(valid[b].sum())
            draws = torch.rand(n * inner, generator=g, dtype=torch.float64, device=g.device)
            out[b, valid[b].to(device)] = draws.view(n, *shape[2:]).to(device)
    return out
