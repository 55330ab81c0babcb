"""Which candidates a step commits. ``confidence`` is ``[B, m]`` with −inf at padding; ties
go to the lower candidate index (a stable descending sort)."""

from __future__ import annotations

import torch

from diffcache.pipelines.sampling._random import Generators, uniform


def _ranks(confidence: torch.Tensor) -> torch.Tensor:
    """Rank of each candidate in its row (0 = most confident), stable."""
    order = confidence.argsort(dim=-1, descending=True, stable=True)
    return torch.empty_like(order).scatter_(
        -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
    )


def commit_topk(confidence: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The ``k[b]`` most confident candidates of each row (LLaDA / Dream count rules)."""
    return (_ranks(confidence) < k[:, None]) & (confidence > float("-inf"))


def commit_threshold(confidence: torch.Tensor, valid: torch.Tensor, tau: float) -> torch.Tensor:
    """Fast-dLLM: the most confident candidate, and every other one with confidence >= τ."""
    best = (_ranks(confidence) == 0) & valid
    return best | (valid & (confidence >= tau))


def commit_factor(
    confidence: torch.Tensor, valid: torch.Tensor, factor: float, reference_compat: bool = False
) -> torch.Tensor:
    """Fast-dLLM's factor rule: with confidences sorted c_1 >= c_2 >= ..., commit the longest
    prefix n with c_k >= 1 − factor/(k+1) for every 2 <= k <= n (c_1 always). The reference
    also commits all N when only the last candidate fails (``reference_compat``)."""
    ranks = _ranks(confidence)
    ordered = confidence.sort(dim=-1, descending=True, stable=True).values
    k = torch.arange(1, ordered.shape[-1] + 1, device=ordered.device)
    fails = (ordered < 1 - factor / (k + 1)) & (k >= 2) & (ordered > float("-inf"))
    n_valid = valid.sum(-1)
    first = torch.where(fails.any(-1), fails.long().argmax(-1), n_valid)  # 0-based rank
    if reference_compat:
        first = torch.where(first == n_valid - 1, n_valid, first)
    return valid & (ranks < first.clamp(min=1)[:, None])


def commit_confident(
    confidence: torch.Tensor, valid: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Elastic-Cache: every candidate with confidence >= min(threshold, the row's best)."""
    best = confidence.masked_fill(~valid, float("-inf")).max(-1, keepdim=True).values
    return valid & (confidence >= torch.minimum(best, torch.full_like(best, threshold)))


def commit_sampled(
    confidence: torch.Tensor,
    valid: torch.Tensor,
    k: torch.Tensor,
    alg_temp: float,
    generator: Generators = None,
) -> torch.Tensor:
    """Dream with ``alg_temp`` > 0: ``k[b]`` candidates drawn without replacement from
    softmax(confidence / alg_temp) (Gumbel-top-k, the same distribution as multinomial)."""
    weights = (confidence / alg_temp).masked_fill(~valid, float("-inf")).log_softmax(-1)
    gumbel = -(-uniform(tuple(weights.shape), generator, weights.device, valid).log()).log()
    return commit_topk((weights + gumbel).masked_fill(~valid, float("-inf")), k)
