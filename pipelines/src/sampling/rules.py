"""Which candidates a step commits: ``[B, m]`` booleans from confidences ``[B, m]``; and which
positions leave decoding after a row's end-of-sequence token (:func:`after_first_eos`).

``confidence`` carries −inf at padding; rules that take ``valid`` also ignore whatever is not
valid. Ties: candidates are ranked by a stable descending sort, so equal confidences go to the
lower candidate index. ``torch.topk`` (used by the references) leaves its tie order
unspecified (on CPU it varies with size and layout, and CUDA differs again), so exact tie
parity with a reference is not possible; with real-valued fp64 confidences ties are rare.
"""

from __future__ import annotations

import torch

from diffcache.pipelines.sampling.random import Generators, uniform

NEG_INF = float("-inf")


def _ranks(confidence: torch.Tensor) -> torch.Tensor:
    """Rank of each candidate in its row (0 = most confident), ties to the lower index."""
    order = confidence.argsort(dim=-1, descending=True, stable=True)
    return torch.empty_like(order).scatter_(
        -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
    )


def commit_topk(confidence: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The ``k[b]`` most confident candidates of each row (LLaDA's and Dream's count rules,
    ``torch.topk(confidence[j], k)``). Never a −inf (padding) candidate, so a row with fewer
    than ``k[b]`` real candidates commits them all."""
    return (_ranks(confidence) < k.to(confidence.device)[:, None]) & (confidence > NEG_INF)


def commit_threshold(confidence: torch.Tensor, valid: torch.Tensor, tau: float) -> torch.Tensor:
    """Fast-dLLM's threshold rule (``get_transfer_index`` with ``threshold``): the most
    confident valid candidate always, plus every other valid one with confidence >= τ (so a
    row with nothing >= τ commits exactly one)."""
    confidence = confidence.masked_fill(~valid, NEG_INF)
    best = (_ranks(confidence) == 0) & valid
    return best | (valid & (confidence >= tau))


def commit_factor(
    confidence: torch.Tensor, valid: torch.Tensor, factor: float, reference_compat: bool = False
) -> torch.Tensor:
    """Fast-dLLM's factor rule (``get_transfer_index_dynamic``): with the valid confidences
    sorted c_1 >= c_2 >= ... >= c_N, commit the top n* = max{n : c_k >= 1 − factor/(k + 1)
    for every 2 <= k <= n} (c_1 always; all N when none fails).

    Reference quirk (``reference_compat=True``): when the first failing rank is the last one
    (k = N, N >= 2), the reference commits all N instead of N − 1 (its ``top_i ==
    len(threshs) - 1`` branch meant for "none failed")."""
    confidence = confidence.masked_fill(~valid, NEG_INF)
    ranks = _ranks(confidence)
    ordered = confidence.sort(dim=-1, descending=True, stable=True).values
    k = torch.arange(1, ordered.shape[-1] + 1, device=ordered.device, dtype=torch.float64)
    n_valid = valid.sum(-1)
    fails = (ordered < 1 - factor / (k + 1)) & (k >= 2) & (k <= n_valid[:, None])
    first = torch.where(fails.any(-1), fails.long().argmax(-1), n_valid)  # 0-based rank
    if reference_compat:
        first = torch.where(first == n_valid - 1, n_valid, first)
    return valid & (ranks < first.clamp(min=1)[:, None])


def commit_parallel(
    confidence: torch.Tensor, valid: torch.Tensor, threshold: float | None, factor: float | None
) -> torch.Tensor | None:
    """Fast-dLLM's parallel decoding: the threshold rule when ``threshold`` is set, else the
    factor rule when ``factor`` is set; None when neither is (no parallel rule)."""
    if threshold is not None:
        return commit_threshold(confidence, valid, threshold)
    if factor is not None:
        return commit_factor(confidence, valid, factor)
    return None


def commit_confident(p_max: torch.Tensor, valid: torch.Tensor, threshold: float) -> torch.Tensor:
    """Elastic-Cache's rule (``get_decoded_token_confident``): every valid candidate whose
    confidence (fp64 max probability) is >= min(threshold, the row's best) — so at least the
    best one (all tied best ones) of each row with a valid candidate."""
    best = p_max.masked_fill(~valid, NEG_INF).max(-1, keepdim=True).values
    return valid & (p_max >= best.clamp(max=threshold))


def after_first_eos(
    ids: torch.Tensor,
    eos_id: int | None,
    prompt_len: int,
    committed: torch.Tensor,
    cut: torch.Tensor,
    once: bool,
) -> torch.Tensor:
    """Elastic-Cache's EOS stop ``[B, L]``: the positions of ``ids`` from each row's first
    decoded EOS on (its masks leave decoding; a later EOS further left cuts again). ``once``
    (its reference) cuts a row once, at the first EOS among the tokens ``committed`` at the
    first step that commits one (``cut``: the positions cut so far)."""
    hit = ids == eos_id
    hit[:, :prompt_len] = False
    if once:
        hit &= committed & ~cut.any(1, keepdim=True)
    return hit.long().cumsum(1) > 0


def commit_sampled(
    confidence: torch.Tensor,
    valid: torch.Tensor,
    k: torch.Tensor,
    alg_temp: float,
    generator: Generators = None,
) -> torch.Tensor:
    """Dream with ``alg_temp`` > 0: ``k[b]`` candidates drawn without replacement from
    softmax(confidence / alg_temp) over the valid ones (the reference's
    ``multinomial(softmax(c / alg_temp), k)``). Drawn here as Gumbel-top-k (log-weights plus
    Gumbel noise, then the k largest), which has the same distribution as sequential
    sampling without replacement; one uniform per valid candidate."""
    if alg_temp <= 0:
        raise ValueError(f"alg_temp must be > 0 for sampled commits, got {alg_temp}")
    weights = (confidence.double() / alg_temp).masked_fill(~valid, NEG_INF).log_softmax(-1)
    u = uniform(tuple(weights.shape), generator, weights.device, valid)
    u = u.clamp(min=torch.finfo(torch.float64).tiny)  # a 0 draw would give a −inf key
    keys = (weights - (-u.log()).log()).masked_fill(~valid, NEG_INF)
    return commit_topk(keys, k) & valid
