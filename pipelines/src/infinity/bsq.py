"""The BSQ VAE's image decoder with upstream key names (``infinity/models/bsq_vae``).

Only the decoder side: summed codes ``[B, d, H, W]`` -> an image in [-1, 1]. Upstream's
``AutoEncoder`` wraps every convolution (``Conv``: ``<name>.conv.*``) and group norm
(``Normalize``: ``<name>.norm.*``); its released configuration is 2-D convolutions, no
attention, ``base_ch`` 128, 2 residual blocks per level (+1 in the decoder), nearest-neighbour
upsampling then a 3x3 convolution. The checkpoint's ``vae`` entry holds the encoder, quantizer
and decoder; only ``decoder.*`` is read.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffcache.errors import DiffCacheError


@dataclasses.dataclass(frozen=True)
class BSQConfig:
    """A BSQ VAE decoder: code width ``d``, channel multipliers, base width, residual blocks
    per level, and pixels per code cell (``patch``: 2 ** upsamplings)."""

    d: int
    ch_mult: tuple[int, ...]
    patch: int
    ch: int = 128
    num_res_blocks: int = 2


#: the released VAEs (``tools/run_infinity.py::load_visual_tokenizer``)
BSQ_CONFIGS = {
    "infinity_vae_d32reg.pth": BSQConfig(d=32, ch_mult=(1, 2, 4, 4, 4), patch=16),
    "infinity_vae_d56_f8_14_patchify.pth": BSQConfig(d=14, ch_mult=(1, 2, 4, 4), patch=8),
}


class Conv(nn.Module):
    """``nn.Conv2d`` one level down (upstream's ``Conv`` wrapper)."""

    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Normalize(nn.Module):
    """Group norm (32 groups, or 24 when the width is not a multiple of 32), eps 1e-6."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        groups = 32 if channels % 32 == 0 else 24
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = Normalize(cin), Conv(cin, cout, 3)
        self.norm2, self.conv2 = Normalize(cout), Conv(cout, cout, 3)
        if cin != cout:
            self.nin_shortcut = Conv(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Decoder(nn.Module):
    """Upstream's ``Decoder``: ``conv_in``, ``mid.block_{1,2}``, ``up.{level}.block.{i}`` with
    ``up.{level}.upsample`` on levels 1..log2(patch), ``norm_out``, ``conv_out``; run from the
    last level to level 0."""

    def __init__(self, config: BSQConfig) -> None:
        super().__init__()
        mult, ch = config.ch_mult, config.ch
        width = ch * mult[-1]
        self.conv_in = Conv(config.d, width, 3)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(width, width)
        self.mid.block_2 = ResnetBlock(width, width)
        levels = []
        for level in reversed(range(len(mult))):
            up = nn.Module()
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(width, ch * mult[level]))
                width = ch * mult[level]
            up.block = nn.ModuleList(blocks)
            if 1 <= level <= math.log2(config.patch):
                up.upsample = Upsample(width)
            levels.insert(0, up)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(width)
        self.conv_out = Conv(width, 3, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
        for up in reversed(self.up):
            for block in up.block:
                h = block(h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class BSQDecoder(nn.Module):
    """The VAE as the pipeline uses it: ``decode(codes [B, d, H, W])`` -> ``[B, 3, pH, pW]``
    clamped to [-1, 1]."""

    def __init__(self, config: BSQConfig) -> None:
        super().__init__()
        self.decoder = Decoder(config)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).clamp(-1, 1)


def _wrapped(key: str) -> str:
    """A bare ``nn.Conv2d`` / ``nn.GroupNorm`` key in the wrappers' naming (upstream's
    ``load_cnn`` accepts both)."""
    stem, leaf = key.rsplit(".", 1)
    inner = "norm" if stem.rsplit(".", 1)[-1].startswith("norm") else "conv"
    return f"{stem}.{inner}.{leaf}"


def load_bsq_decoder(path: str | Path, config: BSQConfig | None = None) -> BSQDecoder:
    """The decoder of an upstream BSQ VAE checkpoint (its ``vae`` entry, or a bare state
    dict); ``config`` defaults to the released VAE of that file name. Raises a DiffCacheError
    listing missing and unexpected decoder keys."""
    path = Path(path)
    config = config or BSQ_CONFIGS.get(path.name)
    if config is None:
        raise DiffCacheError(f"{path}: unknown BSQ VAE; known: {', '.join(BSQ_CONFIGS)}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("vae", state)
    model = BSQDecoder(config)
    own = model.state_dict()
    found = {}
    for key, value in state.items():
        if key.startswith("decoder."):
            found[key if key in own else _wrapped(key)] = value
    missing = [k for k in own if k not in found]
    unexpected = [k for k in found if k not in own]
    if missing or unexpected:
        raise DiffCacheError(
            f"{path}: not a BSQ decoder of {config} ({len(missing)} missing: "
            f"{', '.join(missing)}; {len(unexpected)} unexpected: {', '.join(unexpected)})"
        )
    model.load_state_dict(found)
    return model.eval()
