"""d²Cache's certainty prior and selection helpers (Kamichanw/d2Cache, research/dlm.md §2.4).

``certainty_density`` scales decoding confidences (the decoding prior, §2.4.5) and stage-1
scores; ``stage1`` picks the certainty prior's masks (§2.4.3); ``nucleus_select`` and
``inflate`` build the rest of the query set (§2.4.4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _kernel(radius: int, sigma: float, device: torch.device) -> torch.Tensor:
    """exp(−d² / 2σ²) for d = −radius .. radius, fp64."""
    d = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    return torch.exp(-(d**2) / (2 * sigma**2))


def certainty_density(
    decoded: torch.Tensor,
    sigma: float,
    prompt_decoded: bool = True,
    reference_compat: bool = False,
) -> torch.Tensor:
    """d²Cache's certainty density ``[B, G]`` fp64 of the generated region ``decoded [B, G]``
    (True = decoded): D(i) = Σ_j K(i − j) m_j / Σ_j K(i − j), K(d) = exp(−d² / 2σ²), with j
    over a canvas of 3G positions — G before the region (decoded when ``prompt_decoded``,
    d²Cache's rule; not decoded otherwise), the region, and G after it, which count as
    decoded only when the region's last position is decoded.

    Computed directly (a 1-D convolution in fp64); the reference uses an fp32 FFT. Its
    denominator is the kernel summed over all 6G offsets of its FFT circle (−3G .. 3G − 1) at
    every position, not over the canvas; the two differ by O(exp(−G² / 2σ²)), i.e. only when
    G is not much larger than σ. ``reference_compat=True`` uses the reference's denominator.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    b, g = decoded.shape
    if g == 0:
        return torch.zeros(b, 0, dtype=torch.float64, device=decoded.device)
    m = decoded.to(torch.float64)
    left = torch.full((b, g), float(prompt_decoded), dtype=torch.float64, device=m.device)
    right = m[:, -1:].expand(b, g)
    canvas = torch.cat([left, m, right], 1)[:, None]  # [B, 1, 3G]
    # offsets up to 2G reach the whole canvas from every generated position; zero padding G
    # each side makes the output exactly the G generated positions (kernel is symmetric)
    kernel = _kernel(2 * g, sigma, m.device)[None, None]
    num = F.conv1d(canvas, kernel, padding=g)[:, 0]
    if reference_compat:
        d = torch.arange(-3 * g, 3 * g, device=m.device, dtype=torch.float64)
        return num / torch.exp(-(d**2) / (2 * sigma**2)).sum()
    den = F.conv1d(torch.ones_like(canvas[:1]), kernel, padding=g)[:, 0]
    return num / den


def stage1(
    masked: torch.Tensor,
    conf: torch.Tensor | None,
    prompt_len: int,
    block: tuple[int, int],
    k: int,
    sigma: float,
    reference_compat: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1 of d²Cache's query set (research §2.4.3): the ``k`` masked positions ``[B, L]``
    with the highest confidence ``conf [B, L]`` (None: all 1) × certainty density of width
    ``sigma`` (0: confidence only), searched from the current ``block``'s start up to the block
    boundary that holds the ``k``-th mask, the block's masks first; and the scores ``[B, L]``
    they were ranked by (before that block bias)."""
    p, (start, end) = prompt_len, block
    gen_masked = masked[:, p:]
    density = (
        certainty_density(~gen_masked, sigma, reference_compat=reference_compat) if sigma else 1.0
    )
    ones = torch.ones_like(gen_masked, dtype=torch.float64)
    scores = (conf[:, p:] if conf is not None else ones) * density
    col = torch.arange(gen_masked.shape[1], device=masked.device)
    in_block = (col >= start - p) & (col < end - p)
    biased = scores + in_block * scores.max(dim=1, keepdim=True).values
    reached = gen_masked.long().cumsum(1) >= k
    first = torch.where(reached.any(1), reached.long().argmax(1), gen_masked.shape[1] - 1)
    size = end - start
    search_end = ((first - (start - p)) // size + 1) * size + (start - p)
    allowed = gen_masked & (col[None] >= start - p) & (col[None] < search_end[:, None])
    biased = biased.masked_fill(~allowed, float("-inf"))
    top = biased.topk(min(k, biased.shape[1]), dim=1)
    chosen = torch.zeros_like(masked)
    chosen[:, p:].scatter_(1, top.indices, torch.isfinite(top.values))
    full = torch.zeros(masked.shape, dtype=torch.float64, device=masked.device)
    full[:, p:] = scores
    return chosen, full


def nucleus_select(
    scores: torch.Tensor, p: float, allowed: torch.Tensor, min_k: int = 1
) -> torch.Tensor:
    """d²Cache's ``nucleus_select`` ``[B, L]`` bool: normalise the (non-negative) ``scores``
    over the ``allowed`` positions, rank them (largest first, ties to the lower index), and
    keep the longest prefix whose cumulative mass is <= ``p``, plus the top ``min_k`` (at
    least one per row with anything allowed; all allowed ones when their scores are all 0, as
    the reference). Never selects a position outside ``allowed``.

    Differences: fp64, exact normalisation (the reference adds 1e-9 to the sum), stable
    ranking (the reference's sort leaves ties unordered), negative scores count as 0."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    w = torch.where(allowed, scores.double().clamp(min=0), 0.0)
    w = w / w.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    key = torch.where(allowed, w, -1.0)  # disallowed rank after every allowed position
    ordered, index = key.sort(dim=-1, descending=True, stable=True)
    keep = ordered.clamp(min=0).cumsum(-1) <= p
    keep |= torch.arange(keep.shape[-1], device=keep.device) < min_k
    keep &= allowed.gather(-1, index)
    return torch.zeros_like(allowed).scatter(-1, index, keep)


def inflate(selected: torch.Tensor, w: int) -> torch.Tensor:
    """d²Cache's inflation ``[B, L]``: ``selected`` plus every position lying between two
    selected positions a < b with b − a <= ``w`` (d²Cache's "gap length" is that distance, so
    at most w − 1 unselected positions are filled). ``w <= 1`` changes nothing."""
    length = selected.shape[-1]
    pos = torch.arange(length, device=selected.device).expand_as(selected)
    prev = torch.where(selected, pos, -1).cummax(-1).values
    nxt = torch.where(selected, pos, length).flip(-1).cummin(-1).values.flip(-1)
    return selected | ((prev >= 0) & (nxt < length) & (nxt - prev <= w))
