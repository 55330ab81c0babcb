"""Layer pieces shared by our LLaDA and Dream modules, their bases, and their forward.

RMSNorm in fp32, RoPE in fp32 (HF Llama ``rotate_half`` convention), non-causal SDPA with GQA;
:class:`DLMBlock` and :class:`DLMModel`, the bases of the families' layers and models;
:func:`diffusion_forward`: the whole model over every row, or — given a step plan — over the
planned rows with K/V kept in a position-indexed store (:func:`.dlm_engine.forward_rows`), which
is how our text pipelines always call the model; :func:`build_tiny`, the deterministic tiny
models of tests and demos.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from diffcache.pipelines._tiny import seeded
from diffcache.pipelines.dlm_engine import forward_rows
from diffcache.pipelines.dlm_tokenizer import CharTokenizer

if TYPE_CHECKING:
    from diffcache.pipelines.dlm_config import DLMConfig

# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMS norm computed in fp32 and cast back to the input dtype before the affine weight
    (the LLaDA/OLMo and Qwen2 order); an optional bias follows the weight."""

    def __init__(self, size: int, eps: float, bias: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight * y.to(x.dtype)
        return y if self.bias is None else y + self.bias


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[B, n, head_dim]`` in fp32 for integer ``positions`` ``[B, n]``.

    ``inv_freq = 1 / theta^(arange(0, hd, 2) / hd)``; the angles are repeated over both halves
    (``cat(freqs, freqs)``), as in HF Llama and the LLaDA/Dream references.
    """
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (exponent / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, n, hd]`` by cos/sin ``[B, n, hd]`` in fp32 (fp64 for an fp64 x);
    returns x's dtype. ``rotate_half``: the first half pairs with the second."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Non-causal SDPA of q ``[B, H, n, hd]`` over k/v ``[B, Hkv, m, hd]``: ``[B, n, H*hd]``.

    GQA: each k/v head serves ``H // Hkv`` consecutive query heads (``repeat_interleave``).
    ``mask`` is bool ``[B, 1, 1|n, m]`` (True = attend) or None.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
    b, h, n, d = o.shape
    return o.transpose(1, 2).reshape(b, n, h * d)


class DLMBlock(nn.Module, abc.ABC):
    """One layer, split into :meth:`qkv`, :meth:`attend` and :meth:`finish` (the pieces
    :func:`.dlm_engine.forward_rows` runs on the planned rows). A family gives its input norm
    and q/k/v projections (:meth:`qkv_modules`) and writes :meth:`finish`."""

    def __init__(self, config: DLMConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.heads, config.kv_heads
        self.head_dim = config.dim_per_head

    def qkv(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[B, H, n, hd]``, k and v ``[B, Hkv, n, hd]``; q and k after RoPE."""
        norm, q_proj, k_proj, v_proj = self.qkv_modules()
        b, n, _ = h.shape
        x = norm(h)
        q = q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    @abc.abstractmethod
    def qkv_modules(self) -> tuple[nn.Module, nn.Linear, nn.Linear, nn.Linear]:
        """The input norm and the q, k and v projections."""

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Non-causal attention of q over k/v (GQA); ``[B, n, H*hd]`` before the output
        projection."""
        return attend(q, k, v, mask)

    @abc.abstractmethod
    def finish(self, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The attention output ``o`` projected into the residual ``h``, then the MLP residual."""

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        return self.finish(h, self.attend(*self.qkv(h, cos, sin), mask))


class DiffusionLM(Protocol):
    """What :func:`diffusion_forward` needs of a model (see the shared interface spec)."""

    def blocks(self) -> nn.ModuleList: ...
    def embed(self, ids: torch.Tensor) -> torch.Tensor: ...
    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def head(self, h: torch.Tensor) -> torch.Tensor: ...


def default_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``cumsum(attention_mask) - 1`` clamped at 0 when a mask is given, else ``arange(L)``."""
    b, n = input_ids.shape
    if attention_mask is None:
        return torch.arange(n, device=input_ids.device).expand(b, n)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def diffusion_forward(
    model: DiffusionLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    **step: Any,
) -> torch.Tensor:
    """embed -> every layer (cos/sin of ``position_ids``, key-padding mask) -> head: logits
    ``[B, L, V]``. With ``plan=`` (and ``store=``, ``policy=``, ``step=``) only the planned rows
    run and the logits are those of ``plan.targets`` (:func:`.dlm_engine.forward_rows`)."""
    if position_ids is None:
        position_ids = default_positions(input_ids, attention_mask)
    if step.get("plan") is not None:
        mask = None if attention_mask is None else attention_mask.bool()
        return forward_rows(model, input_ids, position_ids, mask, **step)
    mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
    h = model.embed(input_ids)
    cos, sin = model.rope(position_ids)
    for layer in model.blocks():
        h = layer(h, cos, sin, mask)
    return model.head(h)


class DLMModel(nn.Module):
    """Base of the LLaDA and Dream modules: the sizes diffcache reads, RoPE and the forward.

    A family registers its modules under the checkpoint's names and gives :meth:`blocks`,
    :meth:`embed` and :meth:`head` (the :class:`DiffusionLM` protocol) and ``logit_shift``
    (1: the row at p-1 predicts token p). :meth:`forward` defaults ``position_ids`` to
    ``cumsum(attention_mask) - 1`` (clamped at 0) when a mask is given, so a left-padded row
    decodes as the same row alone.
    """

    logit_shift: ClassVar[int]
    #: the LM head's submodule path
    HEAD: ClassVar[str]

    def __init__(self, config: DLMConfig) -> None:
        super().__init__()
        self.config = config
        self.mask_id = config.mask_token_id  # type: ignore[attr-defined]
        self.num_layers = config.layers
        self.num_heads = config.heads
        self.num_kv_heads = config.kv_heads
        self.head_dim = config.dim_per_head
        self.vocab_size = config.logits_size
        self.max_positions = config.max_positions

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(positions, self.head_dim, self.config.rope_theta)  # type: ignore[attr-defined]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **step: Any,
    ) -> torch.Tensor:
        """Logits ``[B, L, V]`` of a full bidirectional forward (unshifted). With ``plan=``:
        the planned rows only (:func:`diffusion_forward`)."""
        return diffusion_forward(self, input_ids, attention_mask, position_ids, **step)

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers (the block sites diffcache hooks)."""
        return self.blocks()


def tiny_init_(model: nn.Module, head: nn.Linear, head_std: float) -> None:
    """Deterministic random weights in place (run it under ``seeded``): embeddings N(0, 1),
    linear weights N(0, 1/fan_in), the LM head N(0, head_std²) (spread-out confidences), biases
    N(0, 0.1²), norm weights 1 + N(0, 0.1²). Parameters are visited in registration order."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 1.0)
            elif isinstance(module, nn.Linear):
                std = head_std if module is head else module.in_features**-0.5
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.1)
            elif isinstance(module, RMSNorm):
                module.weight.normal_(1.0, 0.1)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.1)


M = TypeVar("M", bound=DLMModel)


def build_tiny(
    model_cls: type[M],
    config: DLMConfig,
    seed: int,
    dtype: torch.dtype,
    head_std: float,
    specials: dict[str, int],
) -> tuple[M, CharTokenizer]:
    """``model_cls(config)`` with :func:`tiny_init_` weights drawn under ``seeded(seed)`` (the
    global RNG is left alone), in ``dtype`` and eval mode, and a :class:`CharTokenizer` with
    ``specials`` over its logits."""
    with seeded(seed):  # the default init inside the constructor is overwritten
        model = model_cls(config)
        tiny_init_(model, model.get_submodule(model.HEAD), head_std)
    return model.to(dtype).eval(), CharTokenizer(specials, vocab_size=config.logits_size)
