"""LLaDA (``LLaDAModelLM``): our own clean-room module with the upstream tensor names.

The architecture is a bidirectional Llama (research/dlm.md §1.3.1): RMSNorm (fp32) -> q/k/v ->
RoPE (fp32, HF Llama ``rotate_half`` convention) -> non-causal SDPA -> ``attn_out`` residual, then
RMSNorm -> ``ff_out(silu(ff_proj(x)) * up_proj(x))`` residual; final ``ln_f`` and the LM head
``ff_out``. Parameter names match the published checkpoints (``model.transformer.wte.weight``,
``model.transformer.blocks.{i}.q_proj.weight``, ...), so their safetensors load unchanged.

The layer pieces shared with Dream are in ``pipelines/src/dlm_layers.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from diffcache.errors import UnsupportedModelError
from diffcache.pipelines._tiny import seeded
from diffcache.pipelines.dlm_layers import (
    RMSNorm,
    apply_rope,
    attend,
    config_fields,
    diffusion_forward,
    rope_cos_sin,
    tiny_init_,
)
from diffcache.pipelines.dlm_tokenizer import CharTokenizer

# ---------------------------------------------------------------------------------------------
# LLaDA
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LLaDAConfig:
    """The fields of a LLaDA ``config.json`` this module uses (defaults: LLaDA-8B-Instruct).

    Unknown keys are kept in ``extra`` and written back by :meth:`to_dict`. ``eot_token_id``
    (``<|eot_id|>``, ends a chat turn) is not in the published config.json. Settings this module
    does not implement are refused when the config is built, all of them in one error.
    ``rope_full_precision`` is accepted either way: RoPE is always computed in fp32.
    """

    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    multi_query_attention: bool | None = None
    mlp_hidden_size: int | None = 12288
    mlp_ratio: int = 4
    vocab_size: int = 126464
    embedding_size: int | None = 126464
    max_sequence_length: int = 4096
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    pad_token_id: int = 126081
    eot_token_id: int = 126348
    include_bias: bool = False
    include_qkv_bias: bool = False
    bias_for_layer_norm: bool | None = None
    layer_norm_with_affine: bool = True
    weight_tying: bool = False
    activation_type: str = "silu"
    block_type: str = "llama"
    layer_norm_type: str = "rms"
    rope: bool = True
    rope_full_precision: bool = True
    alibi: bool = False
    attention_layer_norm: bool = False
    clip_qkv: float | None = None
    scale_logits: bool = False
    input_emb_norm: bool = False
    block_group_size: int = 1
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    MODEL_TYPE: ClassVar[str] = "llada"
    ARCHITECTURE: ClassVar[str] = "LLaDAModelLM"

    def __post_init__(self) -> None:
        problems = self.unsupported()
        if problems:
            raise UnsupportedModelError(
                f"LLaDA config: unsupported setting(s) {'; '.join(problems)}. diffcache's LLaDA "
                "module implements the published LLaDA-8B architecture (llama blocks, RMSNorm, "
                "RoPE, untied LM head); use a checkpoint with that architecture."
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LLaDAConfig:
        """From a config.json dict; unknown keys go to ``extra``."""
        own, extra = config_fields(cls, d)
        return cls(**own, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """A config.json dict (``extra`` keys, then the fields; model_type/architectures added)."""
        out = {"model_type": self.MODEL_TYPE, "architectures": [self.ARCHITECTURE], **self.extra}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        out.pop("extra")
        return out

    @property
    def kv_heads(self) -> int:
        """``n_kv_heads``; None means ``n_heads`` (1 with ``multi_query_attention``)."""
        if self.n_kv_heads is not None:
            return self.n_kv_heads
        return 1 if self.multi_query_attention else self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_hidden(self) -> int:
        return (
            self.mlp_hidden_size
            if self.mlp_hidden_size is not None
            else (self.mlp_ratio * self.d_model)
        )

    @property
    def logits_size(self) -> int:
        """Rows of ``wte`` and of the LM head ``ff_out``: ``embedding_size`` or ``vocab_size``."""
        return self.embedding_size if self.embedding_size is not None else self.vocab_size

    @property
    def norm_bias(self) -> bool:
        return self.include_bias if self.bias_for_layer_norm is None else self.bias_for_layer_norm

    def unsupported(self) -> list[str]:
        """Every setting this module does not implement, as ``name=value (needs ...)``."""
        wanted: dict[str, Any] = {
            "block_type": "llama",
            "layer_norm_type": "rms",
            "activation_type": "silu",
            "alibi": False,
            "rope": True,
            "weight_tying": False,
            "attention_layer_norm": False,
            "clip_qkv": None,
            "scale_logits": False,
            "input_emb_norm": False,
            "block_group_size": 1,
            "layer_norm_with_affine": True,
        }
        problems = [
            f"{k}={getattr(self, k)!r} (needs {v!r})"
            for k, v in wanted.items()
            if getattr(self, k) != v
        ]
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            problems.append(
                f"d_model={self.d_model} with n_heads={self.n_heads} (needs an even "
                "head_dim dividing d_model)"
            )
        if self.n_heads % self.kv_heads:
            problems.append(f"n_kv_heads={self.kv_heads} (must divide n_heads={self.n_heads})")
        if self.logits_size < self.vocab_size:
            problems.append(f"embedding_size={self.embedding_size} < vocab_size={self.vocab_size}")
        return problems


class LLaDALlamaBlock(nn.Module):
    """One LLaDA layer, split into :meth:`qkv`, :meth:`attend` and :meth:`finish`."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        d, hd, bias = config.d_model, config.head_dim, config.include_bias
        qkv_bias = config.include_bias or config.include_qkv_bias
        self.num_heads, self.num_kv_heads, self.head_dim = config.n_heads, config.kv_heads, hd
        self.attn_norm = RMSNorm(d, config.rms_norm_eps, bias=config.norm_bias)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps, bias=config.norm_bias)
        self.q_proj = nn.Linear(d, config.n_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(d, config.kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, config.kv_heads * hd, bias=qkv_bias)
        self.attn_out = nn.Linear(config.n_heads * hd, d, bias=bias)
        self.ff_proj = nn.Linear(d, config.mlp_hidden, bias=bias)
        self.up_proj = nn.Linear(d, config.mlp_hidden, bias=bias)
        self.ff_out = nn.Linear(config.mlp_hidden, d, bias=bias)

    def qkv(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[B, H, n, hd]``, k and v ``[B, Hkv, n, hd]``; q and k after RoPE."""
        b, n, _ = h.shape
        x = self.attn_norm(h)
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Non-causal attention of q over k/v; ``[B, n, H*hd]`` before ``attn_out``."""
        return attend(q, k, v, mask)

    def finish(self, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """``h + attn_out(o)``, then the SwiGLU MLP residual."""
        h = h + self.attn_out(o)
        x = self.ff_norm(h)
        return h + self.ff_out(F.silu(self.ff_proj(x)) * self.up_proj(x))

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        return self.finish(h, self.attend(*self.qkv(h, cos, sin), mask))


class LLaDAModel(nn.Module):
    """Holds ``transformer`` (``wte``, ``blocks``, ``ln_f``, ``ff_out``) as upstream does."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.logits_size, config.d_model),
                "blocks": nn.ModuleList(LLaDALlamaBlock(config) for _ in range(config.n_layers)),
                "ln_f": RMSNorm(config.d_model, config.rms_norm_eps, bias=config.norm_bias),
                "ff_out": nn.Linear(config.d_model, config.logits_size, bias=config.include_bias),
            }
        )


class LLaDAModelLM(nn.Module):
    """LLaDA masked-diffusion LM (``logit_shift = 0``: position p's logits predict token p).

    :meth:`forward` defaults ``position_ids`` to ``cumsum(attention_mask) - 1`` (clamped at 0)
    when a mask is given. The upstream code uses ``arange(L)`` even for left-padded rows; the
    cumsum keeps every row of a left-padded batch equal to the same row run alone. Logits have
    ``ff_out`` rows (``embedding_size``, 126464 for LLaDA-8B, equal to ``vocab_size``).
    """

    logit_shift = 0

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LLaDAModel(config)
        self.mask_id = config.mask_token_id
        self.num_layers = config.n_layers
        self.num_heads = config.n_heads
        self.num_kv_heads = config.kv_heads
        self.head_dim = config.head_dim
        self.vocab_size = config.logits_size
        self.max_positions = config.max_sequence_length

    def blocks(self) -> nn.ModuleList:
        return self.model.transformer["blocks"]  # type: ignore[return-value]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.transformer["wte"](ids)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(positions, self.head_dim, self.config.rope_theta)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        t = self.model.transformer
        return t["ff_out"](t["ln_f"](h))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **step: Any,
    ) -> torch.Tensor:
        """Logits ``[B, L, V]`` of a full bidirectional forward. With ``plan=``: the
        planned rows only (``diffcache.pipelines.dlm_layers.diffusion_forward``)."""
        return diffusion_forward(self, input_ids, attention_mask, position_ids, **step)

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers (the block sites diffcache hooks)."""
        return self.blocks()


# ---------------------------------------------------------------------------------------------
# Tiny deterministic models
# ---------------------------------------------------------------------------------------------


# Tier B "real-vocab tiny" (research/dlm.md §3.2): the real vocabulary and special ids.
LLADA_TINY: dict[str, Any] = dict(
    d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=64, vocab_size=126464,
    embedding_size=126464, max_sequence_length=512, rope_theta=500000.0, rms_norm_eps=1e-5,
    mask_token_id=126336, eos_token_id=126081, pad_token_id=126081, eot_token_id=126348,
)  # fmt: skip
# Tier A "micro": special ids remapped inside a 256-token vocabulary (fast unit tests).
LLADA_MICRO: dict[str, Any] = dict(
    LLADA_TINY, d_model=64, mlp_hidden_size=128, vocab_size=256, embedding_size=256,
    max_sequence_length=256, mask_token_id=250, eos_token_id=251, pad_token_id=251,
    eot_token_id=252,
)  # fmt: skip
LLADA_BOS = {126464: 126080, 256: 253}  # <|startoftext|> by vocabulary size


def build_tiny_llada(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    *,
    micro: bool = False,
    head_std: float = 0.5,
    **overrides: Any,
) -> tuple[LLaDAModelLM, CharTokenizer]:
    """A tiny LLaDA with deterministic random weights and a matching ``CharTokenizer``.

    Default: the real-vocab tier (d_model 32, 2 layers, 4 heads MHA, MLP 64, vocab 126464,
    mask 126336 / eos = pad 126081 / eot 126348). ``micro=True``: d_model 64, vocab 256, mask 250
    / eos = pad 251 / eot 252. ``overrides`` replace config fields. Leaves the global RNG alone.
    """
    config = LLaDAConfig(**{**(LLADA_MICRO if micro else LLADA_TINY), **overrides})
    with seeded(seed):  # the default init inside the constructor is overwritten
        model = LLaDAModelLM(config)
        tiny_init_(model, model.model.transformer["ff_out"], head_std)
    specials = {
        "mask": config.mask_token_id, "eos": config.eos_token_id, "eot": config.eot_token_id,
        "pad": config.pad_token_id,
    }  # fmt: skip
    if config.logits_size in LLADA_BOS:
        specials["bos"] = LLADA_BOS[config.logits_size]
    tokenizer = CharTokenizer(specials, vocab_size=config.logits_size)
    return model.to(dtype).eval(), tokenizer
