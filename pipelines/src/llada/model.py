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

from diffcache.pipelines.dlm_config import DLMConfig
from diffcache.pipelines.dlm_layers import DLMBlock, DLMModel, RMSNorm, build_tiny
from diffcache.pipelines.dlm_tokenizer import CharTokenizer

# ---------------------------------------------------------------------------------------------
# LLaDA
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LLaDAConfig(DLMConfig):
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

    FAMILY: ClassVar[str] = "LLaDA"
    MODEL_TYPE: ClassVar[str] = "llada"
    ARCHITECTURE: ClassVar[str] = "LLaDAModelLM"
    IMPLEMENTS: ClassVar[str] = (
        "LLaDA-8B architecture (llama blocks, RMSNorm, RoPE, untied LM head)"
    )
    SIZES: ClassVar[dict[str, str]] = {
        "width": "d_model", "layers": "n_layers", "heads": "n_heads", "kv_heads": "n_kv_heads",
        "positions": "max_sequence_length",
    }  # fmt: skip
    REQUIRED: ClassVar[dict[str, Any]] = {
        "block_type": "llama", "layer_norm_type": "rms", "activation_type": "silu",
        "alibi": False, "rope": True, "weight_tying": False, "attention_layer_norm": False,
        "clip_qkv": None, "scale_logits": False, "input_emb_norm": False, "block_group_size": 1,
        "layer_norm_with_affine": True,
    }  # fmt: skip

    @property
    def kv_heads(self) -> int:
        """``n_kv_heads``; None means ``n_heads`` (1 with ``multi_query_attention``)."""
        if self.n_kv_heads is None and self.multi_query_attention:
            return 1
        return super().kv_heads

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

    def family_problems(self) -> list[str]:
        if self.logits_size < self.vocab_size:
            return [f"embedding_size={self.embedding_size} < vocab_size={self.vocab_size}"]
        return []


class LLaDALlamaBlock(DLMBlock):
    """One LLaDA layer: ``attn_norm`` and q/k/v, then ``attn_out`` and the SwiGLU MLP."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__(config)
        d, hd, bias = config.d_model, config.dim_per_head, config.include_bias
        qkv_bias = config.include_bias or config.include_qkv_bias
        self.attn_norm = RMSNorm(d, config.rms_norm_eps, bias=config.norm_bias)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps, bias=config.norm_bias)
        self.q_proj = nn.Linear(d, config.n_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(d, config.kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, config.kv_heads * hd, bias=qkv_bias)
        self.attn_out = nn.Linear(config.n_heads * hd, d, bias=bias)
        self.ff_proj = nn.Linear(d, config.mlp_hidden, bias=bias)
        self.up_proj = nn.Linear(d, config.mlp_hidden, bias=bias)
        self.ff_out = nn.Linear(config.mlp_hidden, d, bias=bias)

    def qkv_modules(self) -> tuple[nn.Module, nn.Linear, nn.Linear, nn.Linear]:
        return self.attn_norm, self.q_proj, self.k_proj, self.v_proj

    def finish(self, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """``h + attn_out(o)``, then the SwiGLU MLP residual."""
        h = h + self.attn_out(o)
        x = self.ff_norm(h)
        return h + self.ff_out(F.silu(self.ff_proj(x)) * self.up_proj(x))


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


class LLaDAModelLM(DLMModel):
    """LLaDA masked-diffusion LM (``logit_shift = 0``: position p's logits predict token p).

    The upstream code uses ``arange(L)`` positions even for left-padded rows; the default
    ``cumsum(attention_mask) - 1`` keeps every row of a left-padded batch equal to the same row
    run alone. Logits have ``ff_out`` rows (``embedding_size``, 126464 for LLaDA-8B, equal to
    ``vocab_size``).
    """

    logit_shift = 0
    HEAD = "model.transformer.ff_out"

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__(config)
        self.model = LLaDAModel(config)

    def blocks(self) -> nn.ModuleList:
        return self.model.transformer["blocks"]  # type: ignore[return-value]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.transformer["wte"](ids)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        t = self.model.transformer
        return t["ff_out"](t["ln_f"](h))


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
    specials = {
        "mask": config.mask_token_id, "eos": config.eos_token_id, "eot": config.eot_token_id,
        "pad": config.pad_token_id,
    }  # fmt: skip
    if config.logits_size in LLADA_BOS:
        specials["bos"] = LLADA_BOS[config.logits_size]
    return build_tiny(LLaDAModelLM, config, seed, dtype, head_std, specials)
