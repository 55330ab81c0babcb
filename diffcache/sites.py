"""Sites: the places where a method may reuse or forecast work, named as adapter data.

Kinds, coarse to fine: ``step`` (one whole denoiser call), ``block`` (one block of a stack),
``module`` (a module inside a block, ``ROLES``), and for our own pipelines ``token_layer`` (one
token row through one layer, text diffusion LMs), ``scale`` (one scale of a next-scale model) and
``attn_pair`` (one query row attending one key row: next-scale KV methods). Stats count each.
"""

from __future__ import annotations

from dataclasses import dataclass

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
class Stack:
    """A list of blocks on the denoiser.

    Args:
        attr: the denoiser attribute holding the block list.
        stream: ``single`` (one token stream) or ``dual`` (separate text and image streams).
        returns: a block's output structure (see ``ModuleSite.returns``).
        modules: the modules inside each block.
    """

    attr: str
    stream: str = "single"
    returns: tuple[str, ...] = ("hidden",)
    modules: tuple[ModuleSite, ...] = ()

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
