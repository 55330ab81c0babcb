"""VAR's token sampler (research/var.md §1.1.2): top-k then top-p filtering of the guided logits,
one ``torch.multinomial`` draw per token with the generation's ``torch.Generator``; and the
Gumbel-softmax of the ``more_smooth`` visualisation path (over the same filtered logits: upstream
filters them in place before it)."""

from __future__ import annotations

import torch


def keep_mask(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """The candidates sampling keeps ``[..., V]`` (bool).

    ``top_k > 0`` keeps logits >= the k-th largest (ties with it stay). ``top_p > 0`` then drops
    the low tail, in ascending order of the (top-k filtered) logits, whose cumulative softmax
    mass is <= 1 - top_p; the largest logit always stays.
    """
    keep = torch.ones_like(logits, dtype=torch.bool)
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        keep = logits >= kth
    if top_p > 0:
        masked = logits.masked_fill(~keep, -torch.inf)
        ascending, order = masked.sort(dim=-1)
        tail = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
        tail[..., -1] = False
        keep = keep & ~tail.scatter(-1, order, tail)
    return keep


def filtered(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """``logits`` with the candidates :func:`keep_mask` drops at -inf."""
    return logits.masked_fill(~keep_mask(logits, top_k, top_p), -torch.inf)


def draw(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per token of (filtered) ``logits`` ``[B, l, V]`` -> ``[B, l]``."""
    b, n, v = logits.shape
    probs = logits.softmax(-1).view(-1, v)
    return torch.multinomial(probs, 1, generator=generator).view(b, n)


def gumbel_softmax(
    logits: torch.Tensor, tau: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Soft one-hot ``softmax((logits + g) / tau)`` with Gumbel noise ``g = -log(Exp(1))`` drawn
    from ``generator``."""
    noise = -torch.empty_like(logits).exponential_(generator=generator).log()
    return ((logits + noise) / tau).softmax(-1)
