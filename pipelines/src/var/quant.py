"""VAR's multi-scale residual quantiser (``VQVAE.quantize``), research/var.md §1.1.2.

An image's latent ``f`` is the sum over scales of each scale's codes, upsampled (bicubic) to the
last map's size and passed through a 3x3 conv mix ``Phi``; the encoder side finds the codes
scale by scale on what is left, the generator side (:meth:`next_input`) adds one sampled scale
at a time and hands the transformer the running sum, area-downsampled to the next map.
Parameter names are upstream's (``quantize.embedding``, ``quantize.quant_resi.qresi_ls.{k}``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Phi(nn.Conv2d):
    """``Phi(h) = (1 - r) h + r conv3x3(h)``."""

    def __init__(self, channels: int, ratio: float) -> None:
        super().__init__(channels, channels, kernel_size=3, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


def phi_ticks(count: int) -> np.ndarray:
    """Where each of ``count`` Phi convs sits on [0, 1] (the scale's position si / (SN - 1)):
    ``linspace(1/12, 11/12, 4)`` for four, else the centres of ``count`` equal bins."""
    edge = 1 / (3 * count) if count == 4 else 1 / (2 * count)
    return np.linspace(edge, 1 - edge, count)


def nearest_tick(count: int, at: float) -> int:
    """The Phi conv used at position ``at`` in [0, 1]: the nearest tick, the first of equal
    float64 distances (with four convs and ten scales, 2/9 and 7/9 sit halfway in exact
    arithmetic: numpy's linspace rounding sends them to ticks 1 and 3, as upstream)."""
    return int(np.argmin(np.abs(phi_ticks(count) - at)))


class PhiPartiallyShared(nn.Module):
    """``share_quant_resi >= 2``: that many convs, each serving the scales nearest its tick."""

    def __init__(self, convs: list[Phi]) -> None:
        super().__init__()
        self.qresi_ls = nn.ModuleList(convs)

    def __getitem__(self, at: float) -> Phi:
        return self.qresi_ls[nearest_tick(len(self.qresi_ls), at)]


class PhiShared(nn.Module):
    """``share_quant_resi == 1``: one conv for every scale."""

    def __init__(self, conv: Phi) -> None:
        super().__init__()
        self.qresi = conv

    def __getitem__(self, at: float) -> Phi:
        return self.qresi


class PhiNonShared(nn.ModuleList):
    """``share_quant_resi == 0``: one conv per scale."""

    def __getitem__(self, at: float) -> Phi:  # type: ignore[override]
        return super().__getitem__(nearest_tick(len(self), at))


class MultiScaleQuantizer(nn.Module):
    """Codebook, Phi convs and the multi-scale residual rule.

    Args:
        vocab_size: codebook entries.
        z_channels: code width.
        patch_nums: the scales' sides, coarse to fine (the last is the latent's side).
        share_quant_resi: how many Phi convs the scales share (see the Phi classes).
        quant_resi: Phi's mix ratio.
    """

    def __init__(
        self,
        vocab_size: int,
        z_channels: int,
        patch_nums: tuple[int, ...],
        share_quant_resi: int = 4,
        quant_resi: float = 0.5,
    ) -> None:
        super().__init__()
        assert quant_resi != 0, "quant_resi 0 (no Phi) is not supported"
        self.vocab_size, self.z_channels = vocab_size, z_channels
        self.patch_nums = tuple(patch_nums)
        count = share_quant_resi or len(self.patch_nums)
        convs = [Phi(z_channels, quant_resi) for _ in range(count)]
        if share_quant_resi == 0:
            self.quant_resi: nn.Module = PhiNonShared(convs)
        elif share_quant_resi == 1:
            self.quant_resi = PhiShared(convs[0])
        else:
            self.quant_resi = PhiPartiallyShared(convs)
        # codebook usage per scale (training statistics, kept for the checkpoint's keys)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))
        self.embedding = nn.Embedding(vocab_size, z_channels)

    def phi(self, si: int, num_scales: int) -> Phi:
        """The Phi conv of scale ``si`` of ``num_scales``."""
        return self.quant_resi[si / (num_scales - 1)]

    def codes(self, idx: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Code vectors ``[B, Cvae, h, w]`` of indices ``[B, h*w]`` (raster order)."""
        return self.embedding(idx).transpose(1, 2).reshape(idx.shape[0], self.z_channels, h, w)

    def residual(self, si: int, num_scales: int, h: torch.Tensor, side: int) -> torch.Tensor:
        """Scale ``si``'s contribution to ``f_hat``: its code map ``h`` upsampled (bicubic) to
        the last map's ``side`` (not the last scale: already that size), then Phi."""
        if si != num_scales - 1:
            h = F.interpolate(h, size=(side, side), mode="bicubic")
        return self.phi(si, num_scales)(h)

    def next_input(
        self, si: int, num_scales: int, f_hat: torch.Tensor, h: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Generation (upstream ``get_next_autoregressive_input``): ``f_hat`` plus scale ``si``'s
        codes ``h``, and what the transformer reads next (``f_hat`` area-downsampled to the next
        map; at the last scale ``f_hat`` itself)."""
        side = self.patch_nums[-1]
        f_hat = f_hat + self.residual(si, num_scales, h, side)
        if si == num_scales - 1:
            return f_hat, f_hat
        nxt = self.patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(nxt, nxt), mode="area")

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook entry (squared L2) of each row of ``z`` ``[N, Cvae]``."""
        e = self.embedding.weight
        d = (z * z).sum(1, keepdim=True) + (e * e).sum(1) - 2 * z @ e.T
        return d.argmin(1)

    def quantize_scales(self, f: torch.Tensor, to_fhat: bool = False) -> list[torch.Tensor]:
        """The encoder side (upstream ``f_to_idxBl_or_fhat``): ``f`` ``[B, Cvae, H, W]`` coded
        scale by scale on the residual left by the coarser ones; per scale, the indices
        ``[B, pn*pn]`` or (``to_fhat``) the running ``f_hat``. ``f`` gets no gradient; the
        ``f_hat`` maps do, to the codebook and the Phi convs, when they require it (training)."""
        f = f.detach()
        b, c, height, width = f.shape
        side = self.patch_nums[-1]
        assert height == width == side, f"latent {height}x{width}, last scale {side}"
        rest, f_hat, out = f.clone(), torch.zeros_like(f), []
        num = len(self.patch_nums)
        for si, pn in enumerate(self.patch_nums):
            small = rest if si == num - 1 else F.interpolate(rest, size=(pn, pn), mode="area")
            idx = self.nearest(small.permute(0, 2, 3, 1).reshape(-1, c)).view(b, pn * pn)
            h = self.residual(si, num, self.codes(idx, pn, pn), side)
            f_hat = f_hat + h
            rest = rest - h
            out.append(f_hat.clone() if to_fhat else idx)
        return out

    def teacher_input(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """What the transformer reads at scales 1..K-1 when the codes are given (training;
        upstream ``idxBl_to_var_input``): ``[B, L - 1, Cvae]``."""
        side, num = self.patch_nums[-1], len(self.patch_nums)
        b = indices[0].shape[0]
        f_hat = self.embedding.weight.new_zeros(b, self.z_channels, side, side)
        out = []
        for si in range(num - 1):
            pn, nxt = self.patch_nums[si], self.patch_nums[si + 1]
            f_hat = f_hat + self.residual(si, num, self.codes(indices[si], pn, pn), side)
            small = F.interpolate(f_hat, size=(nxt, nxt), mode="area")
            out.append(small.flatten(2).transpose(1, 2))
        return torch.cat(out, dim=1)
