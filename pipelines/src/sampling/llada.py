"""LLaDA's sampler pieces (ML-GSAI/LLaDA ``generate.py``, research/dlm.md §1.1).

Inputs are one step's candidates: logits ``[B, m, V]`` with ``valid [B, m]`` marking the real
ones of each padded row. Random draws come from one generator or one per row
(``diffcache.pipelines.sampling.random``).
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch

from diffcache.pipelines.sampling.random import Generators, uniform
from diffcache.pipelines.sampling.stats import token_stats

REMASKING = ("low_confidence", "random")


def num_transfer_tokens(mask_count: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's fixed schedule: tokens committed at each of ``steps`` steps ``[B, steps]`` for
    ``mask_count`` masks ``[B]`` — ⌊M/steps⌋ each, the remainder M mod steps one more on the
    first steps (``get_num_transfer_tokens``; e.g. M=10, 4 steps -> 3, 3, 2, 2)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    mask_count = mask_count.long()
    base = mask_count[:, None] // steps
    extra = torch.arange(steps, device=mask_count.device)[None] < (mask_count % steps)[:, None]
    return base + extra.long()


def gumbel_argmax(
    logits: torch.Tensor,
    temperature: float,
    generator: Generators = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token choice ``[B, m]`` by LLaDA's Gumbel-max (``add_gumbel_noise``): T = 0 is the plain
    argmax of ``logits``; T > 0 is argmax(exp(l) / (−log u)^T) with u ~ U(0, 1) in fp64, an
    exact sample from softmax(l / T). fp64 on purpose (arXiv:2409.02908). ``valid`` only routes
    per-row generator draws to the real candidates."""
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
    backend: str = "torch",
    record: MutableMapping[str, str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaDA's per-candidate token and confidence: ``(tokens [B, m], confidence [B, m] fp64)``.

    Tokens by :func:`gumbel_argmax`. ``remasking="low_confidence"``: confidence is the
    *un-noised* fp64 softmax probability of the chosen token; ``"random"``: a U(0, 1) draw
    (drawn after the Gumbel noise). ``logits_eos_inf``: EOS gets logit −inf before sampling
    (never produced). ``confidence_eos_eot_inf``: after the choice, EoT (and EOS) get logit
    −inf in the softmax, so candidates that chose them get confidence 0 (committed last) and
    the others are renormalised. At T = 0 with ``low_confidence``, ``backend`` may route the
    confidence through the fused kernel (:mod:`~diffcache.pipelines.sampling.stats`; ``record``
    gets the backend that computed it).

    Deliberate difference: the intended rule demotes EOS and EoT at every temperature. The
    reference demotes EoT always but EOS only at T = 0 (its ``logits_with_noise`` *is*
    ``logits`` then, so the EOS write aliases); ``reference_compat=True`` reproduces that.
    """
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
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
    stats = token_stats(logits, backend if temperature == 0 else "torch", record)
    if stats is not None:  # a token demoted to -inf above has probability 0
        return tokens, torch.where(stats.top1 == tokens, stats.p1.double(), 0.0)
    probs = logits.double().softmax(-1)
    return tokens, probs.gather(-1, tokens[..., None])[..., 0]


def cfg_mix(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Unsupervised classifier-free guidance (SMDM, LLaDA; the unconditional branch has the
    prompt masked): ``un + (scale + 1) · (cond − un)``."""
    return uncond_logits + (scale + 1.0) * (cond_logits - uncond_logits)
