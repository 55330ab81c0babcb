"""Dream's sampler pieces (``diffusion_generate`` of Dream's HF ``generation_utils.py``,
research/dlm.md §1.2).

Inputs are one step's candidates: logits ``[B, m, V]`` (already shifted: the engine gives the
logits that predict each candidate) with ``valid [B, m]`` marking the real ones. Random draws
come from one generator or one per row (``diffcache.pipelines.sampling.random``).
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch

from diffcache.pipelines.sampling.random import Generators, uniform
from diffcache.pipelines.sampling.stats import token_stats

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
EPSILON = 1e-10  # the reference's log(p + eps) in the entropy confidence


def filter_logits(
    logits: torch.Tensor, temperature: float, top_p: float | None, top_k: int | None
) -> torch.Tensor:
    """Dream's logit processing: divide by T (when T > 0), then top-p (keep the most probable
    tokens up to and including the one whose cumulative probability first exceeds ``top_p``;
    only when ``top_p < 1``), then top-k (keep values >= the k-th largest). Removed tokens get
    −inf (the reference uses the dtype's minimum; the softmax is the same)."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        ordered, index = logits.sort(-1, descending=True)
        drop = ordered.softmax(-1).cumsum(-1) > top_p
        drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, index, drop), float("-inf"))
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_p: float | None = None,
    top_k: int | None = None,
    generator: Generators = None,
    margin: bool = False,
    neg_entropy: bool = False,
    *,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dream's ``sample_tokens``: ``(confidence [B, m] fp64, tokens [B, m])``.

    probs = softmax(:func:`filter_logits`) in fp32 (fp64 for fp64 logits). T > 0: the token
    is drawn from probs (inverse-CDF with one fp64 uniform per candidate — the same
    distribution as the reference's ``Categorical``) and the confidence is its probability;
    T = 0: the most probable token and its probability. ``margin``: confidence = top-1 −
    top-2 probability; ``neg_entropy``: Σ p log(p + 1e-10) (the negative entropy)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    probs = filter_logits(logits, temperature, top_p, top_k).softmax(-1)
    if temperature > 0:
        u = uniform(tuple(probs.shape[:-1]), generator, probs.device, valid)
        cdf = probs.double().cumsum(-1)
        # right=True: the first token whose cumulative mass exceeds u (never a zero-mass one)
        tokens = torch.searchsorted(cdf, (u * cdf[..., -1])[..., None], right=True)[..., 0]
        tokens = tokens.clamp(max=probs.shape[-1] - 1)
        confidence = probs.gather(-1, tokens[..., None])[..., 0]
    else:
        confidence, tokens = probs.max(-1)
    if margin:
        top2 = probs.topk(2, dim=-1).values
        confidence = top2[..., 0] - top2[..., 1]
    elif neg_entropy:
        confidence = (probs * (probs + EPSILON).log()).sum(-1)
    return confidence.double(), tokens


def dream_confidence(
    alg: str,
    logits: torch.Tensor,
    temperature: float,
    top_p: float | None = None,
    top_k: int | None = None,
    generator: Generators = None,
    valid: torch.Tensor | None = None,
    backend: str = "torch",
    record: MutableMapping[str, str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and confidences ``(tokens [B, m], confidence [B, m] fp64)`` for a Dream ``alg``:
    ``maskgit_plus`` (probability of the chosen token), ``topk_margin`` (top-1 − top-2),
    ``entropy`` (negative entropy); ``origin`` samples the same way (its confidence is not
    used: see :func:`origin_reveal`). Note the order: tokens first, like ``llada_candidates``
    (``sample_tokens`` returns the reference's confidence-first order). At T = 0 without top-p
    / top-k filtering, ``backend`` may route them through the fused kernel
    (:mod:`~diffcache.pipelines.sampling.stats`; its entropy is Σ p log p, without the
    reference's 1e-10 inside the log; ``record`` gets the backend that computed them)."""
    if alg not in ALGS:
        raise ValueError(f"alg must be one of {ALGS}, got {alg!r}")
    plain = temperature == 0 and (top_p is None or top_p >= 1) and top_k is None
    stats = token_stats(logits, backend if plain else "torch", record)
    if stats is not None:
        if alg == "topk_margin":
            return stats.top1, (stats.p1 - stats.p2).double()
        if alg == "entropy":
            return stats.top1, stats.neg_entropy.double()
        return stats.top1, stats.p1.double()
    confidence, tokens = sample_tokens(
        logits,
        temperature,
        top_p,
        top_k,
        generator,
        margin=alg == "topk_margin",
        neg_entropy=alg == "entropy",
        valid=valid,
    )
    return tokens, confidence


def timesteps(steps: int, eps: float) -> torch.Tensor:
    """Dream's time grid ``linspace(1, eps, steps + 1)`` (fp32, as the reference)."""
    return torch.linspace(1, eps, steps + 1)


def _reveal_ratio(i: int, steps: int, eps: float) -> torch.Tensor:
    """1 − s/t at step ``i`` (fp32 scalar tensor)."""
    grid = timesteps(steps, eps)
    return 1 - grid[i + 1] / grid[i]


def dream_transfer_count(
    mask_count: torch.Tensor, i: int, steps: int, eps: float, reference_compat: bool = False
) -> torch.Tensor:
    """Masks to commit at step ``i`` of ``steps`` ``[B]``: int(M · (1 − s/t)) with t, s =
    timesteps[i], timesteps[i + 1] (product in fp32 like the reference); on the last step
    every remaining mask.

    Deliberate difference: M is each row's own mask count ``mask_count[b]``. The reference
    uses the batch mean ``mask_index.sum() / B`` for every row (``reference_compat=True``),
    which makes a row depend on its batch-mates; in the plain reference loop all rows have the
    same count, so both agree there. On the last step the reference commits int(mean) per
    row; here every row commits all of its masks in both modes."""
    mask_count = mask_count.long()
    if i >= steps - 1:
        return mask_count.clone()
    ratio = _reveal_ratio(i, steps, eps).to(mask_count.device)
    if reference_compat:
        mean = mask_count.sum() / mask_count.numel()
        return torch.full_like(mask_count, int(mean.float() * ratio))
    return (mask_count.float() * ratio).long()


def origin_commit(
    valid: torch.Tensor, i: int, steps: int, eps: float, generator: Generators = None
) -> torch.Tensor:
    """``alg="origin"``: which candidates are revealed ``[B, m]`` — each valid one
    independently with probability 1 − s/t (one U(0, 1) draw per candidate), all of them on
    the last step."""
    if i >= steps - 1:
        return valid.clone()
    p = float(_reveal_ratio(i, steps, eps))
    return valid & (uniform(tuple(valid.shape), generator, valid.device, valid) < p)


def origin_reveal(
    logits: torch.Tensor,
    valid: torch.Tensor,
    i: int,
    steps: int,
    eps: float,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    generator: Generators = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dream's ``alg="origin"`` step: ``(reveal [B, m] bool, tokens [B, m])`` —
    :func:`origin_commit`, then tokens from :func:`sample_tokens` (reveal draws first, then
    token draws, as the reference). Tokens are drawn for every valid candidate (the reference
    samples only the revealed ones; the distribution of a revealed token is the same)."""
    reveal = origin_commit(valid, i, steps, eps, generator)
    _, tokens = sample_tokens(logits, temperature, top_p, top_k, generator, valid=valid)
    return reveal, tokens
