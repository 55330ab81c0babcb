"""Dream (``DreamModel``): our own clean-room module with the upstream (Qwen2) tensor names.

A Qwen2 decoder with non-causal attention (research/dlm.md §1.3.2): RMSNorm (fp32) -> q/k/v
(with bias) -> RoPE (fp32) -> SDPA with GQA -> ``o_proj`` residual, then RMSNorm ->
``down_proj(silu(gate_proj(x)) * up_proj(x))`` residual; final ``model.norm`` and ``lm_head``.
Dream is trained with AR-style shifted targets: the hidden state at position p-1 predicts token
p (``logit_shift = 1``); position 0 keeps its own logits in the reference sampler.

Deviation from the reference: in bf16 the reference casts cos/sin to bf16 and rotates in bf16;
here, as for LLaDA, q/k are rotated in fp32 and cast back (the interface spec's rule).
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


@dataclasses.dataclass
class DreamConfig(DLMConfig):
    """The fields of a Dream ``config.json`` this module uses (defaults: Dream-v0-7B).

    Unknown keys are kept in ``extra`` and written back by :meth:`to_dict`. ``head_dim`` None
    means ``hidden_size // num_attention_heads``; ``num_key_value_heads`` None means MHA.
    Settings this module does not implement are refused when the config is built.
    """

    hidden_size: int = 3584
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int | None = 4
    head_dim: int | None = None
    intermediate_size: int = 18944
    vocab_size: int = 152064
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    use_sliding_window: bool = False
    mask_token_id: int = 151666
    pad_token_id: int = 151643
    eos_token_id: int = 151643
    bos_token_id: int | None = 151643

    FAMILY: ClassVar[str] = "Dream"
    MODEL_TYPE: ClassVar[str] = "Dream"
    ARCHITECTURE: ClassVar[str] = "DreamModel"
    IMPLEMENTS: ClassVar[str] = (
        "Dream-v0 architecture (Qwen2 layers, SiLU, default RoPE, full attention)"
    )
    SIZES: ClassVar[dict[str, str]] = {
        "width": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
        "kv_heads": "num_key_value_heads", "head_dim": "head_dim",
        "positions": "max_position_embeddings",
    }  # fmt: skip
    REQUIRED: ClassVar[dict[str, Any]] = {"hidden_act": "silu", "use_sliding_window": False}

    @classmethod
    def from_dict_fields(cls, own: dict[str, Any], d: dict[str, Any]) -> dict[str, Any]:
        """A transformers-v5 style ``rope_parameters`` dict supplies ``rope_theta`` /
        ``rope_scaling`` when they are absent."""
        params = d.get("rope_parameters")
        if isinstance(params, dict):
            if "rope_theta" not in own and "rope_theta" in params:
                own["rope_theta"] = params["rope_theta"]
            if "rope_scaling" not in own and params.get("rope_type", "default") != "default":
                own["rope_scaling"] = params
        return own

    def family_problems(self) -> list[str]:
        scaling = self.rope_scaling or {}
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            return [f"rope_scaling={self.rope_scaling!r} (needs None / default RoPE)"]
        return []


class DreamAttention(nn.Module):
    """Qwen2 attention projections: q/k/v with bias, o_proj without."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.dim_per_head
        self.q_proj = nn.Linear(d, config.num_attention_heads * hd, bias=True)
        self.k_proj = nn.Linear(d, config.kv_heads * hd, bias=True)
        self.v_proj = nn.Linear(d, config.kv_heads * hd, bias=True)
        self.o_proj = nn.Linear(config.num_attention_heads * hd, d, bias=False)


class DreamMLP(nn.Module):
    """SwiGLU MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        d, m = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, m, bias=False)
        self.up_proj = nn.Linear(d, m, bias=False)
        self.down_proj = nn.Linear(m, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DreamDecoderLayer(DLMBlock):
    """One Dream layer: ``input_layernorm`` and q/k/v, then ``o_proj`` and the MLP."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__(config)
        self.self_attn = DreamAttention(config)
        self.mlp = DreamMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def qkv_modules(self) -> tuple[nn.Module, nn.Linear, nn.Linear, nn.Linear]:
        a = self.self_attn
        return self.input_layernorm, a.q_proj, a.k_proj, a.v_proj

    def finish(self, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """``h + o_proj(o)``, then the MLP residual."""
        h = h + self.self_attn.o_proj(o)
        return h + self.mlp(self.post_attention_layernorm(h))


class DreamBaseModel(nn.Module):
    """``embed_tokens``, ``layers``, ``norm`` as in Qwen2."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        layers = (DreamDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DreamModel(DLMModel):
    """Dream diffusion LM (``logit_shift = 1``: the logits are unshifted, row p-1 predicts p).

    Positions default as in the reference sampler for padded batches. With
    ``tie_word_embeddings`` the LM head shares the embedding weight (:meth:`tie_weights`; call it
    again after replacing parameters, e.g. after ``load_state_dict(assign=True)``).
    """

    logit_shift = 1
    HEAD = "lm_head"

    def __init__(self, config: DreamConfig) -> None:
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding weight with the LM head when ``tie_word_embeddings``."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(h))


# Tier B "real-vocab tiny" (research/dlm.md §3.2): GQA, the real vocabulary and special ids.
DREAM_TINY: dict[str, Any] = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=64, vocab_size=152064, rope_theta=1000000.0, rms_norm_eps=1e-6,
    max_position_embeddings=512, mask_token_id=151666, eos_token_id=151643, pad_token_id=151643,
    bos_token_id=None,
)  # fmt: skip
# Tier A "micro": special ids remapped inside a 256-token vocabulary (fast unit tests).
DREAM_MICRO: dict[str, Any] = dict(
    DREAM_TINY, hidden_size=64, intermediate_size=128, vocab_size=256,
    max_position_embeddings=256, mask_token_id=250, eos_token_id=251, pad_token_id=251,
)  # fmt: skip
DREAM_EOT = {152064: 151645, 256: 252}  # <|im_end|> by vocabulary size


def build_tiny_dream(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    *,
    micro: bool = False,
    head_std: float = 0.5,
    **overrides: Any,
) -> tuple[DreamModel, CharTokenizer]:
    """A tiny Dream with deterministic random weights and a matching ``CharTokenizer``.

    Default: the real-vocab tier (hidden 32, 2 layers, 4 heads / 2 KV heads, MLP 64, vocab
    152064, mask 151666 / eos = pad 151643, eot = ``<|im_end|>`` 151645). ``micro=True``: hidden
    64, vocab 256, mask 250 / eos = pad 251 / eot 252. ``overrides`` replace config fields.
    Leaves the global RNG alone.
    """
    config = DreamConfig(**{**(DREAM_MICRO if micro else DREAM_TINY), **overrides})
    specials = {
        "mask": config.mask_token_id,
        "eos": config.eos_token_id,
        "pad": config.pad_token_id,
    }
    if config.vocab_size in DREAM_EOT:
        specials["eot"] = DREAM_EOT[config.vocab_size]
    return build_tiny(DreamModel, config, seed, dtype, head_std, specials)
