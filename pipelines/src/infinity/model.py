"""The Infinity transformer with upstream state-dict names (research/var.md §1.2.3-§1.2.4).

Blocks are registered as upstream does (``block_chunks.{c}.module.{j}``, layer
``c * per_chunk + j``), so an upstream checkpoint loads strictly; :attr:`Infinity.layers` is the
flat list. A generation calls :meth:`Infinity.condition` once and :meth:`Infinity.scale` then
:meth:`Infinity.logits` once per scale.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffcache.errors import DiffCacheError
from diffcache.pipelines.infinity.attention import (
    CrossAttention,
    ScaleContext,
    SelfAttention,
    Text,
    TextAttentivePool,
)
from diffcache.pipelines.infinity.config import InfinityConfig


def ada_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """Layer norm without affine, then ``* (1 + scale) + shift``."""
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale) + shift


class FFN(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CrossAttnBlock(nn.Module):
    """Self-attention, cross-attention to the text and FFN; the self-attention and FFN are
    modulated by the shared AdaLN condition plus this block's ``ada_gss``."""

    def __init__(self, config: InfinityConfig, layer: int) -> None:
        super().__init__()
        c = config.embed_dim
        self.eps = config.norm_eps
        self.sa = SelfAttention(c, config.num_heads, layer)
        self.ca = CrossAttention(c, c, config.num_heads)
        self.ca_norm = nn.LayerNorm(c, eps=config.norm_eps)
        self.ffn = FFN(c, config.ffn_dim)
        self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, c))

    def forward(
        self, x: torch.Tensor, gss: torch.Tensor, text: Text, ctx: ScaleContext
    ) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + gss).unbind(2)
        x = x + self.sa(ada_norm(x, scale1, shift1, self.eps), ctx) * gamma1
        x = x + self.ca(self.ca_norm(x), text)
        return x + self.ffn(ada_norm(x, scale2, shift2, self.eps)) * gamma2


class Chunk(nn.Module):
    """A group of consecutive blocks (upstream ``MultipleLayers``: only a naming level)."""

    def __init__(self, blocks: list[CrossAttnBlock]) -> None:
        super().__init__()
        self.module = nn.ModuleList(blocks)


class SharedAdaLin(nn.Linear):
    """The condition's six modulation vectors ``[B, 1, 6, C]`` shared by all blocks."""

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return super().forward(cond).unflatten(-1, (1, 6, -1))


class HeadNorm(nn.Module):
    """AdaLN before the head (upstream ``AdaLNBeforeHead``)."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).unflatten(-1, (1, 2, -1)).unbind(2)
        return ada_norm(x, scale, shift, self.eps)


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


@dataclasses.dataclass
class Condition:
    """A generation's text condition, CFG rows included (conditional first)."""

    text: Text  # projected text the blocks cross-attend to
    cond: torch.Tensor  # [B, C] the pooled text (sos and the head's AdaLN condition)
    gss: torch.Tensor  # [B, 1, 6, C] shared AdaLN


class Infinity(nn.Module):
    """Infinity's transformer (no VAE, no text encoder)."""

    def __init__(self, config: InfinityConfig) -> None:
        super().__init__()
        self.config = config
        c, ct5 = config.embed_dim, config.text_channels
        self.cfg_uncond = nn.Parameter(torch.zeros(config.text_maxlen, ct5))
        self.text_norm = RMSNorm(ct5, config.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(ct5, c, config.pool_heads)
        self.text_proj_for_ca = nn.Sequential(
            nn.Linear(ct5, c), nn.GELU(approximate="tanh"), nn.Linear(c, c)
        )
        self.pos_start = nn.Parameter(torch.zeros(1, 1, c))
        self.lvl_embed = nn.Embedding(config.levels, c)
        self.word_embed = nn.Linear(config.d_vae, c)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(c, 6 * c))
        per = config.per_chunk
        self.block_chunks = nn.ModuleList(
            Chunk([CrossAttnBlock(config, ci * per + j) for j in range(per)])
            for ci in range(config.block_chunks)
        )
        self.head_nm = HeadNorm(c, config.norm_eps)
        self.head = nn.Linear(c, config.vocab)

    @property
    def layers(self) -> list[CrossAttnBlock]:
        """The blocks in order (flat layer index)."""
        return [b for chunk in self.block_chunks for b in chunk.module]

    def condition(self, features: torch.Tensor, mask: torch.Tensor) -> Condition:
        """The condition of T5 features ``[B, T, Ct5]`` with mask ``[B, T]`` (CFG rows
        already in the batch)."""
        normed = Text(self.text_norm(features), mask)
        cond = self.text_proj_for_sos(normed)
        text = Text(self.text_proj_for_ca(normed.features), mask)
        return Condition(text, cond, self.shared_ada_lin(cond))

    def unconditional(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Each row's text replaced by the learned ``cfg_uncond`` over its valid length."""
        uncond = self.cfg_uncond[: features.shape[1]].to(features.dtype)
        return torch.where(mask[..., None], uncond.expand_as(features), features)

    def start(self, cond: Condition) -> torch.Tensor:
        """The first scale's input ``[B, 1, C]``: the pooled text plus ``pos_start``."""
        return cond.cond[:, None, :] + self.pos_start

    def scale(self, x: torch.Tensor, cond: Condition, ctx: ScaleContext) -> torch.Tensor:
        """The blocks over map ``ctx.si``'s input ``[B, n, C]`` (the scale embedding is added
        before the first block only)."""
        x = x + self.lvl_embed.weight[ctx.si]
        for block in self.layers:
            x = block(x, cond.gss, cond.text, ctx)
        return x

    def logits(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Bit logits ``[B, n, 2 * d_vae]`` of the last hidden state."""
        return self.head(self.head_nm(h, cond))


# ---------------------------------------------------------------------------------- loading
_CHUNKED = re.compile(r"block_chunks\.(\d+)\.module\.(\d+)\.")


def flat_layer(key: str, per_chunk: int) -> int | None:
    """The flat layer index of a block parameter's name (``c * per_chunk + j``), else None."""
    m = _CHUNKED.match(key)
    return int(m[1]) * per_chunk + int(m[2]) if m else None


def key_problems(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """Missing and unexpected keys, and shape mismatches, of ``state`` for ``model`` (one
    line), or None when it fits exactly."""
    own = model.state_dict()
    parts = []
    for what, keys in (
        ("missing", [k for k in own if k not in state]),
        ("unexpected", [k for k in state if k not in own]),
        ("wrong shape", [k for k in own if k in state and state[k].shape != own[k].shape]),
    ):
        if keys:
            parts.append(f"{len(keys)} {what}: {', '.join(keys)}")
    return "; ".join(parts) or None


def load_transformer(model: Infinity, path: str | Path) -> Infinity:
    """Load upstream weights into ``model``: a torch state dict file (2B) or a folder of
    sharded torch checkpoints with an index (8B, through ``transformers``). Raises a
    DiffCacheError listing missing and unexpected keys."""
    path = Path(path)
    if path.is_dir():
        try:  # transformers < 5
            from transformers.modeling_utils import load_sharded_checkpoint
        except ImportError:
            from transformers.trainer_utils import load_sharded_checkpoint

        result = load_sharded_checkpoint(model, str(path), strict=False)
        problems = [
            f"{len(keys)} {what}: {', '.join(keys)}"
            for what, keys in (
                ("missing", result.missing_keys),
                ("unexpected", result.unexpected_keys),
            )
            if keys
        ]
        if problems:
            raise DiffCacheError(f"{path}: does not fit {_name(model)} ({'; '.join(problems)})")
        return model
    state = torch.load(path, map_location="cpu", weights_only=True)
    problem = key_problems(model, state)
    if problem:
        raise DiffCacheError(f"{path}: does not fit {_name(model)} ({problem})")
    model.load_state_dict(state)
    return model


def _name(model: Infinity) -> str:
    c = model.config
    return f"an Infinity transformer of depth {c.depth}, width {c.embed_dim}"


def init_random(model: Infinity, seed: int) -> Infinity:
    """Deterministic random weights: every matrix and vector from N(0, 1/(3C)) except the
    layer-norm weights (1) and the attention temperatures (log 4); ``cfg_uncond`` as
    upstream initialises it (std 1.2 over sqrt(Ct5))."""
    g = torch.Generator().manual_seed(seed)
    std = math.sqrt(1 / model.config.embed_dim / 3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale_mul_1H11"):
                continue
            if name.endswith(("norm.weight", "ca_norm.weight")):
                p.fill_(1.0)
            elif name == "cfg_uncond":
                p.copy_(
                    torch.randn(p.shape, generator=g).clamp(-2, 2) * 1.2 / math.sqrt(p.shape[1])
                )
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model
