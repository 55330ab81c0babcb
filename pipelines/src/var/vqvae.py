"""VAR's multi-scale VQ-VAE: a VQGAN-f16-style encoder and decoder around the multi-scale
quantiser (``VQVAE``; upstream parameter names, so ``vae_ch160v4096z32.pth`` loads strictly)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffcache.pipelines.var.config import VQVAEConfig
from diffcache.pipelines.var.quant import MultiScaleQuantizer


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Two GroupNorm-SiLU-conv3x3 layers with a residual (a 1x1 conv when widths differ)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = group_norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map, with a residual."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        attn = (q.transpose(1, 2) @ k * c**-0.5).softmax(-1)  # [B, HW_q, HW_k]
        out = (v @ attn.transpose(1, 2)).view(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
    return level


def _middle(ch: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(ch, ch), AttnBlock(ch), ResnetBlock(ch, ch)
    return mid


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


class Encoder(nn.Module):
    """Image ``[B, 3, H, W]`` in [-1, 1] -> latent ``[B, z, H/f, W/f]``; attention at the
    lowest resolution."""

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        ch, mult, levels = config.ch, config.ch_mult, len(config.ch_mult)
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i, m in enumerate(mult):
            blocks, attns = [], []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * m))
                block_in = ch * m
                if i == levels - 1:
                    attns.append(AttnBlock(block_in))
            level = _level(blocks, attns)
            if i != levels - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = _middle(block_in)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent ``[B, z, h, w]`` -> image ``[B, 3, h*f, w*f]`` (unclamped); ``up[i]`` is level
    ``i`` (run from the lowest resolution, ``up[-1]``, to ``up[0]``)."""

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        ch, mult, levels = config.ch, config.ch_mult, len(config.ch_mult)
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, block_in, 3, padding=1)
        self.mid = _middle(block_in)
        up: list[nn.Module] = []
        for i in reversed(range(levels)):
            blocks, attns = [], []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * mult[i]))
                block_in = ch * mult[i]
                if i == levels - 1:
                    attns.append(AttnBlock(block_in))
            level = _level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(block_in)
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQVAE(nn.Module):
    """VAR's tokenizer: ``VQVAE(vocab_size=4096, z_channels=32, ch=160, share_quant_resi=4)`` is
    ``vae_ch160v4096z32.pth``. Built with PyTorch's default init (under the caller's seed)."""

    def __init__(
        self,
        vocab_size: int = 4096,
        z_channels: int = 32,
        ch: int = 160,
        share_quant_resi: int = 4,
        config: VQVAEConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config or VQVAEConfig(vocab_size, z_channels, ch, share_quant_resi)
        c = self.config
        self.encoder, self.decoder = Encoder(c), Decoder(c)
        self.quantize = MultiScaleQuantizer(
            c.vocab_size, c.z_channels, c.patch_nums, c.share_quant_resi, c.quant_resi
        )
        self.quant_conv = nn.Conv2d(c.z_channels, c.z_channels, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(c.z_channels, c.z_channels, 3, padding=1)
        self.eval().requires_grad_(False)

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Decoded image in [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    def img_to_idxBl(self, img: torch.Tensor) -> list[torch.Tensor]:  # noqa: N802 (upstream name)
        """Per-scale code indices ``[B, pn*pn]`` of images in [-1, 1]."""
        return self.quantize.quantize_scales(self.quant_conv(self.encoder(img)))
