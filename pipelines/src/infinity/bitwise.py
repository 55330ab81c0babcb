"""Infinity's bitwise tokens: per-bit sampling, bits -> codes, and the next scale's input
(research/var.md §1.2.3 item 4; the BSQ quantizer's ``indices_to_codes`` with bit labels).

Codes are ``[B, d, 1, h, w]`` (channels first, a time axis of 1) as the VAE's quantizer keeps
them; the 8B's patchified VAE has ``d`` bits per VAE cell and 4 cells (2x2, pixel-unshuffled)
per transformer token.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from diffcache.kv.history import Schedule

#: how codes are resized between maps (the quantizer's ``z_interplote_up``)
UPSAMPLE = "trilinear"


def sample_bits(
    logits: torch.Tensor, top_k: int, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """One draw per bit from ``logits`` ``[B, n, 2 * d]`` (consecutive pairs are a bit's two
    classes): top-k then top-p filtering of each pair, then ``torch.multinomial`` over the
    softmax with ``generator``. Returns ``[B, n, d]`` in {0, 1}."""
    b, n, v = logits.shape
    pairs = logits.reshape(b, n * v // 2, 2).clone()
    if top_k > 0:
        kth = pairs.topk(min(top_k, 2), dim=-1).values.amin(dim=-1, keepdim=True)
        pairs = pairs.masked_fill(pairs < kth, -torch.inf)
    if top_p > 0:
        ordered, order = pairs.sort(dim=-1)
        drop = ordered.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[..., -1] = False
        pairs = pairs.masked_fill(drop.scatter(-1, order, drop), -torch.inf)
    draws = torch.multinomial(pairs.softmax(dim=-1).view(-1, 2), 1, True, generator=generator)
    return draws.view(b, n, v // 2)


def greedy_bits(logits: torch.Tensor) -> torch.Tensor:
    """Each bit's likelier class (the ``tau -> 0`` limit; a tie gives 0) ``[B, n, d]``."""
    return logits.unflatten(-1, (-1, 2)).argmax(-1)


def bits_to_codes(bits: torch.Tensor, d: int) -> torch.Tensor:
    """Codes of bits ``[..., d]``: each bit to ``±s`` (``s = 1/sqrt(d)``, the codebook scale),
    then the vector L2-normalised."""
    scale = d**-0.5
    return F.normalize(bits * (2 * scale) - scale, dim=-1)


@dataclasses.dataclass
class Codes:
    """The running sum of a generation's codes at the final map's size, and how to turn it into
    the next map's input.

    Args:
        schedule: the transformer's maps.
        d: bits per VAE cell.
        patchify: 2x2 VAE cells per token (the 8B): VAE maps are twice the token maps.
        dtype: of the codes.
    """

    schedule: Schedule
    d: int
    patchify: bool = False
    dtype: torch.dtype = torch.float32
    summed: torch.Tensor | None = None

    def vae_size(self, si: int) -> tuple[int, int, int]:
        h, w = self.schedule.sizes[si]
        f = 2 if self.patchify else 1
        return (1, f * h, f * w)

    def codes(self, bits: torch.Tensor, si: int) -> torch.Tensor:
        """Codes ``[B, d, 1, h, w]`` of map ``si``'s bits ``[B, n, d_token]``."""
        h, w = self.schedule.sizes[si]
        grid = bits.to(self.dtype).unflatten(1, (h, w))
        if self.patchify:
            grid = F.pixel_shuffle(grid.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        return bits_to_codes(grid, self.d).permute(0, 3, 1, 2).unsqueeze(2)

    def add(self, bits: torch.Tensor, si: int) -> torch.Tensor | None:
        """Add map ``si``'s bits; return the next map's input ``[B, n_next, d_token]`` (the sum
        so far resized to the next map), or None after the last map."""
        codes = self.codes(bits, si)
        last = len(self.schedule) - 1
        if si < last:
            codes = F.interpolate(codes, size=self.vae_size(last), mode=UPSAMPLE)
        self.summed = codes if self.summed is None else self.summed + codes
        if si == last:
            return None
        nxt = F.interpolate(self.summed, size=self.vae_size(si + 1), mode=UPSAMPLE).squeeze(2)
        if self.patchify:
            nxt = F.pixel_unshuffle(nxt, 2)
        return nxt.flatten(2).transpose(1, 2)
