"""Dream's sampler (``diffusion_generate`` of the Dream HF code, research/dlm.md §1.2)."""

from __future__ import annotations

import torch

from diffcache.pipelines.sampling._random import Generators, uniform

EPSILON = 1e-10  # the reference's log(p + eps) in the entropy confidence


def filtered(
    logits: torch.Tensor, temperature: float, top_p: float | None, top_k: int | None
) -> torch.Tensor:
    """Logits divided by the temperature, then top-p and top-k filtered (−inf outside)."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        ordered, index = logits.sort(-1, descending=True)
        mass = ordered.softmax(-1).cumsum(-1)
        drop = mass > top_p
        drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, index, drop), float("-inf"))
    if top_k is not None and top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def dream_confidence(
    alg: str,
    logits: torch.Tensor,
    temperature: float,
    top_p: float | None = None,
    top_k: int | None = None,
    generator: Generators = None,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and confidences ``[B, m]``: the token is sampled (T > 0) or the most probable;
    ``maskgit_plus`` / ``origin``: its probability; ``topk_margin``: top-1 minus top-2
    probability; ``entropy``: Σ p log p (the negative entropy)."""
    probs = filtered(logits.float(), temperature, top_p, top_k).softmax(-1)
    if temperature > 0:
        u = uniform(tuple(probs.shape[:-1]), generator, probs.device, valid)
        cdf = probs.double().cumsum(-1)
        tokens = torch.searchsorted(cdf, u[..., None] * cdf[..., -1:]).squeeze(-1)
        tokens = tokens.clamp(max=probs.shape[-1] - 1)
        confidence = probs.gather(-1, tokens[..., None])[..., 0]
    else:
        confidence, tokens = probs.max(-1)
    if alg == "topk_margin":
        top2 = probs.topk(2, dim=-1).values
        confidence = top2[..., 0] - top2[..., 1]
    elif alg == "entropy":
        confidence = (probs * (probs + EPSILON).log()).sum(-1)
    return tokens, confidence.double()


def timesteps(steps: int, eps: float) -> torch.Tensor:
    """Dream's time grid: ``linspace(1, eps, steps + 1)``."""
    return torch.linspace(1, eps, steps + 1)


def dream_transfer_count(
    masks_left: torch.Tensor, i: int, steps: int, eps: float, reference_compat: bool = False
) -> torch.Tensor:
    """Masks committed at step ``i`` ``[B]``: int(M · (1 − s/t)), all on the last step. M is
    each row's own count; the reference uses the batch mean (``reference_compat``)."""
    if i >= steps - 1:
        return masks_left
    grid = timesteps(steps, eps)
    ratio = float(1 - grid[i + 1] / grid[i])
    if reference_compat:
        mean = float(masks_left.float().mean())
        return torch.full_like(masks_left, int(mean * ratio))
    return (masks_left.double() * ratio).long()


def origin_commit(
    valid: torch.Tensor, i: int, steps: int, eps: float, generator: Generators = None
) -> torch.Tensor:
    """``alg="origin"``: each candidate is revealed with probability 1 − s/t (all on the last
    step)."""
    if i >= steps - 1:
        return valid.clone()
    grid = timesteps(steps, eps)
    p = float(1 - grid[i + 1] / grid[i])
    return valid & (uniform(tuple(valid.shape), generator, valid.device, valid) < p)
