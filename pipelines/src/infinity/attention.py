"""Infinity's attention modules, upstream parameter names (research/var.md §1.2.3-§1.2.4).

Self-attention is cosine attention (q and k L2-normalised, q times a per-head temperature
clamped at 100) with 2-D RoPE; its history lives in the generation's store
(:class:`diffcache.kv.history.History`), which it calls once per scale. Cross-attention reads
padded text with a key-padding mask (upstream uses flash-attn's varlen kernel instead).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from diffcache.kv.history import History, ScaleCall, Schedule, at_least_fp32
from diffcache.pipelines.infinity.schedule import apply_rope


@dataclasses.dataclass
class ScaleContext:
    """What every layer's self-attention needs at one scale of one generation."""

    history: History
    schedule: Schedule
    si: int
    cond_rows: int
    rope: torch.Tensor  # schedule.rope_table [2, total, head_dim // 2]


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, L, H*d]`` -> ``[B, H, L, d]``."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, d]`` -> ``[B, L, H*d]``."""
    return x.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """Cosine self-attention over the layer's history plus the new map."""

    def __init__(self, embed_dim: int, num_heads: int, layer: int) -> None:
        super().__init__()
        self.num_heads, self.layer = num_heads, layer
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        self.max_scale_mul = math.log(100)
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor, ctx: ScaleContext) -> torch.Tensor:
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        q, k, v = (
            split_heads(t, self.num_heads)
            for t in F.linear(x, self.mat_qkv.weight, bias).chunk(3, -1)
        )
        # as upstream's F.normalize under CUDA autocast, on every device: the history keeps K
        # in fp32 next to bf16 V (research/var.md §1.2.4)
        q = (
            F.normalize(at_least_fp32(q), dim=-1, eps=1e-12)
            * self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
        )
        k = F.normalize(at_least_fp32(k), dim=-1, eps=1e-12)
        q = apply_rope(q, ctx.rope, ctx.schedule, ctx.si)
        k = apply_rope(k, ctx.rope, ctx.schedule, ctx.si)
        width = x.shape[-1]

        def raw_query() -> torch.Tensor:
            return split_heads(F.linear(x, self.mat_qkv.weight[:width]), self.num_heads)

        call = ScaleCall(self.layer, ctx.si, ctx.schedule, ctx.cond_rows, 1.0, raw_query)
        return self.proj(merge_heads(ctx.history.attend(call, q, k, v.contiguous())))


@dataclasses.dataclass
class Text:
    """Padded text features ``[B, T, C]`` and their mask ``[B, T]`` (True: a real token)."""

    features: torch.Tensor
    mask: torch.Tensor


class CrossAttention(nn.Module):
    """Softmax attention of queries over padded text (``for_pool``: one learned query per
    head, the text attentive pool); text K has no bias, V a learned one."""

    def __init__(self, embed_dim: int, kv_dim: int, num_heads: int, for_pool: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        if for_pool:
            self.mat_q = nn.Parameter(torch.zeros(1, num_heads, self.head_dim))
        else:
            self.mat_q = nn.Linear(embed_dim, embed_dim)
        self.mat_kv = nn.Linear(kv_dim, 2 * embed_dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor | None, text: Text) -> torch.Tensor:
        kv = F.linear(text.features, self.mat_kv.weight, torch.cat((self.zero_k_bias, self.v_bias)))
        k, v = (split_heads(t, self.num_heads) for t in kv.chunk(2, -1))
        if isinstance(self.mat_q, nn.Parameter):
            q = self.mat_q.to(k.dtype).unsqueeze(2).expand(k.shape[0], -1, -1, -1)
        else:
            q = split_heads(self.mat_q(x), self.num_heads)
        mask = text.mask[:, None, None, :]
        return self.proj(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))


class TextAttentivePool(nn.Module):
    """The start-of-sequence condition: one learned query per head attending over the text."""

    def __init__(self, text_channels: int, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        self.ca = CrossAttention(embed_dim, text_channels, num_heads, for_pool=True)

    def forward(self, text: Text) -> torch.Tensor:
        return self.ca(None, text).squeeze(1)
