"""Fused confidence statistics for the samplers (``diffcache.kernels.token_confidence``).

The references take a float64 softmax over every candidate's vocabulary row; at T = 0 the
samplers only need the argmax and a few numbers per row (its probability, the runner-up's, the
negative entropy). :func:`token_stats` gets them from the Triton kernel in one pass over the
logits, float32 accumulation, when the backend picks the kernel for these logits, and returns
None otherwise, so the samplers' float64 path (the references' numerics, bit for bit) runs.

Deliberate difference when the kernel runs: confidences are float32-accurate (about 1e-6
relative) instead of float64, so two candidates whose confidences agree to that level may be
committed in the other order than the reference would. Plans choose it with ``kernels:``
(``auto``: on CUDA); the plain pipeline always takes the float64 path.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import NamedTuple

import torch

from diffcache import kernels
from diffcache.kernels.token_confidence import SPEC


class TokenStats(NamedTuple):
    """Per-candidate statistics ``[B, m]`` of the softmax of the logits."""

    top1: torch.Tensor  # argmax token (lowest index on ties)
    p1: torch.Tensor  # its probability
    p2: torch.Tensor  # second-largest probability
    neg_entropy: torch.Tensor  # sum p log p


def token_stats(
    logits: torch.Tensor, backend: str, record: MutableMapping[str, str] | None = None
) -> TokenStats | None:
    """:class:`TokenStats` of ``logits [B, m, V]`` from the Triton kernel, or None when
    ``backend`` does not pick it for these logits (``"torch"``; ``"auto"`` off CUDA). Either
    way ``record["token_confidence"]`` (when a record is given) says which path ran.

    Raises:
        KernelUnavailableError: ``backend="triton"`` and the kernel cannot run here.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    if backend == "torch" or kernels.pick(SPEC, backend, flat) is not kernels.Backend.TRITON:
        if record is not None:
            record[SPEC.name] = "torch"
        return None
    out = kernels.token_confidence(flat, backend="triton", record=record)
    return TokenStats(*(t.view(logits.shape[:-1]) for t in out))
