"""Sites: the places where a method may reuse or forecast work, named as adapter data.

Kinds, coarse to fine: ``step`` (one whole denoiser call), ``block`` (one block of a stack),
``module`` (a module inside a block, ``ROLES``), and for our own pipelines ``token_layer`` (one
token row through one layer, text diffusion LMs), ``scale`` (one scale of a next-scale model) and
``attn_pair`` (one query row attending one key row: next-scale KV methods). Stats count each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

KINDS = ("step", "block", "module", "token_layer", "scale", "attn_pair")
ROLES = ("self_attn", "cross_attn", "ff", "context_ff")
PARTS = ("hidden", "encoder")  # the streams a block or module output may carry


@dataclass(frozen=True)
class ModuleSite:
    """A module inside a block, by attribute name.

    Args:
        attr: the block's attribute holding the module (``attn1``, ``ffn`` ...).
        role: ``self_attn`` (self or joint attention), ``cross_attn``, ``ff`` or ``context_ff``.
        returns: the output structure a hook must return: one tensor (``("hidden",)``) or a tuple
            of these stream parts in this order (joint attention: ``("hidden", "encoder")``).
    """

    attr: str
    role: str
    returns: tuple[str, ...] = ("hidden",)

    def __post_init__(self) -> None:
        assert self.role in ROLES, f"module role {self.role!r} not in {ROLES}"
        assert set(self.returns) <= set(PARTS), f"unknown output parts {self.returns}"


@dataclass(frozen=True)
class Modulation:
    """A block's AdaLN modulation, computed from the block's own parameters and the call's
    conditioning argument(s) exactly as the block's forward does; its chunks are the gates.

    Args:
        name: how ``GatedTerm.gate`` refers to it.
        source: the block attribute (dotted path) it comes from.
        kind: ``table``: the parameter ``source`` plus the conditioning in float32 (Wan's
            ``scale_shift_table + temb.float()``); ``linear``: the AdaLN-Zero module ``source``,
            ``m.linear(m.silu(c))``, where ``c`` is the conditioning, or ``m.emb(*args,
            hidden_dtype=...)`` when the module embeds its own (DiT: timestep and class labels);
            ``call``: the module ``source`` called on the conditioning (Qwen-Image's
            ``img_mod``).
        args: the block call arguments that condition it.
        chunks: how many equal chunks it splits into along ``dim``.
    """

    name: str
    source: str
    kind: str = "linear"
    args: tuple[str, ...] = ("temb",)
    chunks: int = 6
    dim: int = 1

    def __post_init__(self) -> None:
        assert self.kind in ("table", "linear", "call"), f"modulation kind {self.kind!r}"


@dataclass(frozen=True)
class GatedTerm:
    """One module output a block adds to a stream: ``part`` of module ``module``'s output
    (tuple outputs), times chunk ``gate = (modulation name, index)`` (None: added ungated);
    ``rows``: ``encoder`` / ``rest`` takes the first ``len(encoder stream)`` / the remaining
    tokens of an output shared by both streams (CogVideoX's feed-forward)."""

    module: str
    part: int = 0
    gate: tuple[str, int] | None = None
    rows: str | None = None


@dataclass(frozen=True)
class GatedBlock:
    """How a block combines its modules' outputs, for the block classes whose forward was read:
    each output stream is its input plus its terms, added in this order. When every module of
    such a block reuses its cached output, the block's result is that sum (``diffcache.gated``).

    Args:
        blocks: the block class names this describes (others keep their plain forward).
        modulations: where the gates come from.
        streams: ``(part, terms)`` for every part the block returns.
        requires: block attributes that must have these values (else the forward differs).
        absent: block call arguments that must be None or empty (else the forward differs).
        clip_fp16: streams the block clips to the float16 range when in float16.
    """

    blocks: tuple[str, ...]
    modulations: tuple[Modulation, ...]
    streams: tuple[tuple[str, tuple[GatedTerm, ...]], ...]
    requires: tuple[tuple[str, Any], ...] = ()
    absent: tuple[str, ...] = ()
    clip_fp16: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stack:
    """A list of blocks on the denoiser.

    Args:
        attr: the denoiser attribute holding the block list.
        stream: ``single`` (one token stream) or ``dual`` (separate text and image streams).
        returns: a block's output structure (see ``ModuleSite.returns``).
        modules: the modules inside each block.
        gated: how a block adds its modules' outputs to its input (AdaLN gates), where that
            is the whole block: a block whose every module is reused can then be skipped.
    """

    attr: str
    stream: str = "single"
    returns: tuple[str, ...] = ("hidden",)
    modules: tuple[ModuleSite, ...] = ()
    gated: GatedBlock | None = None

    def __post_init__(self) -> None:
        assert self.stream in ("single", "dual"), f"stream {self.stream!r}"
        assert set(self.returns) <= set(PARTS), f"unknown output parts {self.returns}"


@dataclass(frozen=True)
class Site:
    """One resolved site: a module of one expert, with where it sits."""

    kind: str
    name: str  # dotted path from the pipeline: "transformer.blocks.3.attn1"
    module: torch.nn.Module
    expert: int = 0
    stack: Stack | None = None
    index: int = 0  # block index within its stack
    spec: ModuleSite | None = None

    @property
    def returns(self) -> tuple[str, ...]:
        if self.spec is not None:
            return self.spec.returns
        return self.stack.returns if self.stack is not None else ("hidden",)

    @property
    def role(self) -> str | None:
        return self.spec.role if self.spec is not None else None
