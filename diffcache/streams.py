"""Reading a block call's streams: its ``hidden`` / ``encoder`` inputs by argument name and its
output parts, in the site's output order (for methods that cache or skip whole blocks)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from diffcache.sites import Site


class BlockStreams:
    """Reads a block call's stream inputs (``hidden_states``, ``encoder_hidden_states``) and
    output parts, both in the site's output order (``Site.returns``)."""

    ARGS = {"hidden": "hidden_states", "encoder": "encoder_hidden_states"}

    def __init__(self, sites: Sequence[Site]) -> None:
        self.where = {s.name: positions(s.module.forward) for s in sites}

    def inputs(self, call: Any) -> tuple[torch.Tensor, ...]:
        pos = self.where[call.site.name]
        return tuple(call.arg(self.ARGS[p], pos.get(self.ARGS[p])) for p in call.site.returns)

    @staticmethod
    def parts(output: Any) -> tuple[torch.Tensor, ...]:
        return tuple(output) if isinstance(output, (tuple, list)) else (output,)


def positions(fn: Callable) -> dict[str, int]:
    """Parameter name -> positional index of a callable (for reading arguments by name)."""
    return {name: i for i, name in enumerate(inspect.signature(fn).parameters)}
