"""LLaDA's sampler (ML-GSAI/LLaDA ``generate.py``, research/dlm.md §1.1)."""

from __future__ import annotations

import torch

from diffcache.pipelines.sampling._random import Generators, uniform


def num_transfer_tokens(mask_count: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens committed at each of ``steps`` steps ``[B, steps]`` for ``mask_count`` masks
    ``[B]``: ⌊M/steps⌋ each, the remainder one more on the first steps."""
    base = mask_count[:, None] // steps
    extra = torch.arange(steps, device=mask_count.device)[None] < (mask_count % steps)[:, None]
    return base + extra.long()


def gumbel_argmax(
    logits: torch.Tensor,
    temperature: float,
    generator: Generators = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gumbel-max token choice: argmax(exp(l) / (−log u)^T) in fp64, exactly sampling from
    softmax(l / T) (LLaDA's ``add_gumbel_noise``; fp64 on purpose, arXiv:2409.02908); T = 0
    is the plain argmax."""
    if temperature == 0:
        return logits.argmax(-1)
    noise = uniform(tuple(logits.shape), generator, logits.device, valid)
    return (logits.double().exp() / (-noise.log()) ** temperature).argmax(-1)


def llada_candidates(
    logits: torch.Tensor,
    temperature: float,
    remasking: str,
    generator: Generators = None,
    *,
    eos_id: int,
    eot_id: int,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    reference_compat: bool = False,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and fp64 confidences of candidates ``[B, m]`` from their logits ``[B, m, V]``.

    ``low_confidence``: the un-noised softmax probability of the chosen token; ``random``: a
    uniform draw. ``logits_eos_inf`` forbids EOS. ``confidence_eos_eot_inf`` gives EOS and EoT
    choices confidence 0 (committed last); the reference demotes EOS only at temperature 0 (its
    noisy logits alias the logits then) — ``reference_compat`` reproduces that.
    """
    if logits_eos_inf:
        logits = logits.clone()
        logits[..., eos_id] = float("-inf")
    tokens = gumbel_argmax(logits, temperature, generator, valid)
    if remasking == "random":
        return tokens, uniform(tuple(tokens.shape), generator, tokens.device, valid)
    if confidence_eos_eot_inf:
        logits = logits.clone()
        logits[..., eot_id] = float("-inf")
        if not reference_compat or temperature == 0:
            logits[..., eos_id] = float("-inf")
    probs = logits.double().softmax(-1)
    return tokens, probs.gather(-1, tokens[..., None])[..., 0]


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Unsupervised classifier-free guidance (SMDM, LLaDA): un + (scale + 1)(cond − un)."""
    return uncond + (scale + 1.0) * (cond - uncond)
