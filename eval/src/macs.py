"""Multiply-accumulates of a module's ``nn.Linear`` layers: one unit of work for every
configuration, ours and diffusers' built-in caches alike.

Each Linear call adds ``input.numel() // in_features * in_features * out_features`` (forward
hooks). A Linear inside a skipped block, module or row never runs, so its hook never fires;
attention's score and value products and convolutions are not counted (in a DiT or a text
diffusion LM the Linear layers hold most of the MACs).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def count_macs(*modules: torch.nn.Module) -> Iterator[list[int]]:
    """Sum the MACs of every nn.Linear call inside ``modules`` into the yielded one-item list."""
    total = [0]

    def hook(mod: torch.nn.Linear, inputs: tuple[Any, ...], _out: Any) -> None:
        total[0] += inputs[0].numel() // mod.in_features * mod.in_features * mod.out_features

    linears = {id(m): m for module in modules for m in module.modules()}  # shared once
    handles = [
        m.register_forward_hook(hook) for m in linears.values() if isinstance(m, torch.nn.Linear)
    ]
    try:
        yield total
    finally:
        for h in handles:
            h.remove()
