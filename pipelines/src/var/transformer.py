"""VAR's transformer (research/var.md §1.1.1, §1.1.3), with upstream's parameter names so that
``var_d{depth}.pth`` loads strictly.

Each block is AdaLN-conditioned on the class embedding: self-attention then a GELU FFN, each on a
non-affine LayerNorm modulated by ``(1 + scale, shift)`` and gated by ``gamma``. The attention is
cosine attention (``attn_l2_norm``): q and k are L2-normalised and q is multiplied by a learned
per-head temperature ``exp(min(scale_mul, ln 100))``, with softmax scale 1. Instead of keeping
its own K/V cache, the attention hands the new scale's q, k, v to the generation's history store
(:meth:`diffcache.kv.history.History.attend`), which attends over the kept history and keeps the
new rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from diffcache.kv.history import History, ScaleCall, Schedule, at_least_fp32
from diffcache.pipelines.var.config import VARConfig

#: the temperature's upper bound (log-space)
MAX_SCALE_MUL = math.log(100)


class SelfAttention(nn.Module):
    """Multi-head self-attention of one scale's tokens over the history store."""

    def __init__(self, config: VARConfig) -> None:
        super().__init__()
        c, self.num_heads, self.head_dim = config.embed_dim, config.num_heads, config.head_dim
        self.attn_l2_norm = config.attn_l2_norm
        if self.attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, self.num_heads, 1, 1), math.log(4)))
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(c, 3 * c, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("zero_k_bias", torch.zeros(c))
        self.proj = nn.Linear(c, c)

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, L, C]`` -> ``[B, H, L, head_dim]``."""
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def raw_query(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        """The queries re-projected without bias or normalisation (computed when called)."""
        weight = self.mat_qkv.weight[: x.shape[-1]]
        return lambda: self.heads(F.linear(x, weight))

    def forward(self, x: torch.Tensor, history: History, call: ScaleCall) -> torch.Tensor:
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        q, k, v = (self.heads(t) for t in F.linear(x, self.mat_qkv.weight, bias).chunk(3, -1))
        if self.attn_l2_norm:
            temperature = self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp()
            # as upstream's F.normalize under CUDA autocast, on every device: the history
            # keeps K in fp32 next to 16-bit V (research/var.md §1.1.3)
            q = F.normalize(at_least_fp32(q), dim=-1) * temperature
            k = F.normalize(at_least_fp32(k), dim=-1)
        call = dataclasses.replace(call, scale=self.scale, raw_query=self.raw_query(x))
        out = history.attend(call, q, k, v)
        return self.proj(out.transpose(1, 2).flatten(2))


class FFN(nn.Module):
    def __init__(self, config: VARConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.embed_dim, config.ffn_dim)
        self.fc2 = nn.Linear(config.ffn_dim, config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def ada_lin(cond_dim: int, out: int) -> nn.Sequential:
    """SiLU then a linear layer (keys ``ada_lin.1.*``)."""
    return nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, out))


class AdaLNSelfAttn(nn.Module):
    """One block: AdaLN-modulated, gated self-attention and FFN."""

    def __init__(self, config: VARConfig, index: int) -> None:
        super().__init__()
        c = config.embed_dim
        self.index = index
        self.attn, self.ffn = SelfAttention(config), FFN(config)
        self.ln_wo_grad = nn.LayerNorm(c, eps=config.norm_eps, elementwise_affine=False)
        self.shared_aln = config.shared_aln
        if self.shared_aln:  # per-block offset added to the shared linear's [B, 1, 6, C]
            self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, c))
        else:
            self.ada_lin = ada_lin(c, 6 * c)

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor, history: History, call: ScaleCall
    ) -> torch.Tensor:
        """``cond``: the class embedding ``[B, D]``, or (shared AdaLN) the shared linear's
        output ``[B, 1, 6, C]``."""
        if self.shared_aln:
            mod = self.ada_gss + cond
        else:
            mod = self.ada_lin(cond).view(-1, 1, 6, x.shape[-1])
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod.unbind(2)
        h = self.ln_wo_grad(x) * (scale1 + 1) + shift1
        x = x + self.attn(h, history, dataclasses.replace(call, layer=self.index)) * gamma1
        h = self.ln_wo_grad(x) * (scale2 + 1) + shift2
        return x + self.ffn(h) * gamma2


class AdaLNBeforeHead(nn.Module):
    """The final AdaLN (no gate) before the head."""

    def __init__(self, config: VARConfig) -> None:
        super().__init__()
        c = config.embed_dim
        self.ln_wo_grad = nn.LayerNorm(c, eps=config.norm_eps, elementwise_affine=False)
        self.ada_lin = ada_lin(c, 2 * c)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, x.shape[-1]).unbind(2)
        return self.ln_wo_grad(x) * (scale + 1) + shift


class BlockCausal:
    """Training's attention (a :class:`History` that keeps nothing): every scale's tokens in one
    call, each query seeing its own and the coarser scales (``attn_bias_for_masking``)."""

    def __init__(self, bias: torch.Tensor) -> None:
        self.bias = bias

    def attend(
        self, call: ScaleCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias, scale=call.scale)

    def nbytes(self) -> int:
        return 0

    def history_nbytes(self) -> int:
        return 0

    def peak_nbytes(self) -> int:
        return 0


class VARTransformer(nn.Module):
    """VAR's class-conditional next-scale transformer (the VQ-VAE is not part of it)."""

    def __init__(self, config: VARConfig) -> None:
        super().__init__()
        self.config = c = config
        width, sides = c.embed_dim, c.patch_nums
        self.first_l = sides[0] ** 2
        self.word_embed = nn.Linear(c.z_channels, width)
        self.class_emb = nn.Embedding(c.num_classes + 1, width)
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, width))
        self.pos_1LC = nn.Parameter(torch.zeros(1, c.num_tokens, width))
        self.lvl_embed = nn.Embedding(len(sides), width)
        self.shared_ada_lin = ada_lin(width, 6 * width) if c.shared_aln else nn.Identity()
        self.blocks = nn.ModuleList(AdaLNSelfAttn(c, i) for i in range(c.depth))
        scale_of = torch.cat([torch.full((p * p,), i) for i, p in enumerate(sides)])
        self.register_buffer("lvl_1L", scale_of.view(1, -1))
        visible = scale_of.view(-1, 1) >= scale_of.view(1, -1)  # training's block-causal mask
        mask = torch.zeros(visible.shape).masked_fill(~visible, -math.inf)
        self.register_buffer("attn_bias_for_masking", mask.view(1, 1, *visible.shape))
        self.head_nm = AdaLNBeforeHead(c)
        self.head = nn.Linear(width, c.vocab_size)

    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Our deterministic random init (under the caller's seed): truncated normal
        ``std`` (default sqrt(1 / 3C)) for weights and embeddings, zero biases, temperature 4,
        and the AdaLN gates' bias at 1 so every block contributes."""
        width = self.config.embed_dim
        std = math.sqrt(1 / width / 3) if std is None else std
        for name, p in self.named_parameters():
            if name.endswith("bias"):  # Linear biases, q_bias, v_bias
                p.zero_()
            elif name.endswith("scale_mul_1H11"):
                p.fill_(math.log(4))
            else:
                nn.init.trunc_normal_(p, std=std)
        for block in self.blocks:  # chunks 0 and 1 are gamma1, gamma2
            gates = (
                block.ada_gss[0, 0, :2] if block.shared_aln else block.ada_lin[1].bias[: 2 * width]
            )
            gates.add_(1.0)

    def level_positions(self) -> torch.Tensor:
        """``[1, L, C]``: each position's scale embedding plus its absolute position embedding."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def first_input(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The class embedding ``[B, C]`` of ``labels`` (the null class is ``num_classes``) and
        the first scale's input ``[B, first_l, C]``."""
        cond = self.class_emb(labels)
        x = cond.unsqueeze(1) + self.pos_start + self.level_positions()[:, : self.first_l]
        return cond, x

    def next_input(self, si: int, tokens: torch.Tensor) -> torch.Tensor:
        """Scale ``si``'s input from its VQ-VAE features ``[B, pn*pn, Cvae]``."""
        start = sum(p * p for p in self.config.patch_nums[:si])
        positions = self.level_positions()[:, start : start + tokens.shape[1]]
        return self.word_embed(tokens) + positions

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor, history: History, call: ScaleCall
    ) -> torch.Tensor:
        """Logits ``[B, l, V]`` of one scale's tokens ``x`` ``[B, l, C]`` (``call``: the scale,
        its ``layer`` is set per block); the blocks' attention goes through ``history``."""
        mod = self.shared_ada_lin(cond)
        if self.config.shared_aln:
            mod = mod.view(-1, 1, 6, self.config.embed_dim)
        for block in self.blocks:
            x = block(x, mod, history, call)
        dtype = torch.promote_types(x.dtype, torch.float32)  # the head runs in >= fp32
        return self.head(self.head_nm(x.to(dtype), cond.to(dtype)))

    def teacher_forcing(self, labels: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Training's forward (upstream ``VAR.forward``): logits ``[B, L, V]`` of every scale at
        once, given the class ``labels`` (the null class included) and the ground-truth inputs of
        scales 1.. ``[B, L - first_l, Cvae]`` (``MultiScaleQuantizer.teacher_input``), through
        the same blocks with the block-causal mask."""
        cond, first = self.first_input(labels)
        x = torch.cat((first, self.next_input(1, inputs)), dim=1)
        schedule = Schedule.square(self.config.patch_nums)
        call = ScaleCall(0, len(schedule) - 1, schedule, cond_rows=len(labels))
        return self(x, cond, BlockCausal(self.attn_bias_for_masking), call)
