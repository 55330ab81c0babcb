"""d²Cache's certainty prior and selection helpers (Kamichanw/d2Cache, research/dlm.md §2.4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def certainty_density(decoded: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian-weighted share of decoded positions around each generated position ``[B, G]``
    (fp64): D(i) = Σ_j K(i−j) m_j / Σ_j K(i−j), K(d) = exp(−d²/2σ²), over a canvas where the
    G positions before the answer count as decoded and the G after it count as decoded only
    when the answer's last token is."""
    b, g = decoded.shape
    m = decoded.double()
    left = torch.ones(b, g, dtype=torch.float64, device=decoded.device)
    right = m[:, -1:].expand(b, g)
    canvas = torch.cat([left, m, right], 1)[:, None]
    d = torch.arange(-g, g + 1, device=decoded.device, dtype=torch.float64)
    kernel = torch.exp(-(d**2) / (2 * sigma**2))[None, None]
    num = F.conv1d(canvas, kernel)[:, 0, :]  # positions g .. 2g-1 of the canvas, centred
    den = F.conv1d(torch.ones_like(canvas), kernel)[:, 0, :]
    return num / den


def nucleus_select(scores: torch.Tensor, p: float, allowed: torch.Tensor) -> torch.Tensor:
    """The smallest set of allowed positions, most important first, whose normalised mass is
    at most ``p`` — at least one per row with anything allowed."""
    w = scores.double().clamp(min=0) * allowed
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-300)
    ordered, index = w.sort(dim=-1, descending=True, stable=True)
    keep = ordered.cumsum(-1) <= p
    keep[:, 0] = True
    keep &= torch.gather(allowed, 1, index)
    return torch.zeros_like(allowed).scatter(1, index, keep)


def inflate(selected: torch.Tensor, width: int) -> torch.Tensor:
    """``selected`` plus every gap of at most ``width`` positions between two selected ones."""
    length = selected.shape[1]
    pos = torch.arange(length, device=selected.device).expand_as(selected)
    none = torch.full_like(pos, -1)
    prev = torch.where(selected, pos, none).cummax(1).values
    big = torch.full_like(pos, length)
    nxt = torch.where(selected, pos, big).flip(1).cummin(1).values.flip(1)
    gap = nxt - prev - 1
    return selected | ((prev >= 0) & (nxt < length) & (gap <= width))
