"""Skipping a block whose every module reuses its cached output.

A DiT block adds each module's output to its input through an AdaLN gate computed from the
block's modulation parameters and the current conditioning. When a method reuses the raw output
of every module of a block, running the block only recomputes its layer norms and modulations
and multiplies and adds: the result is ``input + sum_m gate_m * cached_m`` (plus ungated
terms), which :func:`diffcache.kernels.gated_apply` computes in one pass. Each family's module
describes how its block classes do that (:class:`GatedBlock`, recorded by :func:`describe`
beside its adapter); :class:`BlockSkipper` skips the blocks of a described class, with the gates
computed as the block's forward computes them, and answers None (compute the block) whenever a
call is not one the description covers.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diffcache.session import Call
from diffcache.sites import Site
from diffcache.streams import BlockStreams, positions


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
    such a block reuses its cached output, the block's result is that sum (:class:`BlockSkipper`).

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


#: how each described block class adds its modules' outputs, by class name (``describe``)
DESCRIBED: dict[str, GatedBlock] = {}


def describe(gated: GatedBlock) -> GatedBlock:
    """Record ``gated`` for each of its block classes (a family's module calls it beside its
    adapter); a class described twice must be described the same way."""
    for name in gated.blocks:
        if DESCRIBED.setdefault(name, gated) != gated:
            raise ValueError(f"block class {name!r} is described twice, differently")
    return gated


class BlockSkipper:
    """The block sites that can be answered from their modules' cached outputs.

    A block qualifies when its class is described (:func:`describe`), the description's
    ``requires`` attributes hold, and its terms name exactly the block's module sites and its
    streams exactly the block's output parts.
    """

    def __init__(self, blocks: Sequence[Site], modules: Sequence[Site]) -> None:
        self.spec: dict[str, tuple[GatedBlock, list[Site], dict[str, int]]] = {}
        for b in blocks:
            g = DESCRIBED.get(type(b.module).__name__)
            if g is None or any(getattr(b.module, a, None) != v for a, v in g.requires):
                continue
            mine = [m for m in modules if m.expert == b.expert and m.name.startswith(b.name + ".")]
            used = {t.module for _, terms in g.streams for t in terms}
            if used != {m.spec.attr for m in mine} or {p for p, _ in g.streams} != set(b.returns):
                continue
            self.spec[b.name] = (g, mine, positions(b.module.forward))

    def modules(self, block: str) -> list[Site]:
        """The module sites of a block that qualifies (empty for others)."""
        return self.spec[block][1] if block in self.spec else []

    def __call__(
        self, call: Call, cached: Callable[[Site], Any], kernel: Callable[..., Any]
    ) -> Any | None:
        """The block's output from ``cached(module site)`` of every module, or None when some
        module has no cached output or the call is outside what the data describes
        (``kernel``: the session's :meth:`~diffcache.session.Session.kernel`)."""
        from diffcache import kernels

        found = self.spec.get(call.site.name)
        if found is None:
            return None
        g, mine, pos = found
        for a in g.absent:
            v = call.arg(a, pos.get(a))
            if v is not None and not (isinstance(v, Mapping) and not v):
                return None
        outs: dict[str, tuple] = {}
        for m in mine:
            o = cached(m)
            parts = BlockStreams.parts(o) if o is not None else ()
            if len(parts) != len(m.returns):  # nothing cached, or an extra output (IP adapter)
                return None
            outs[m.spec.attr] = parts
        args = BlockStreams.ARGS
        x = {p: call.arg(args[p], pos.get(args[p])) for p in call.site.returns}
        chunks = {}
        for mod in g.modulations:
            cond = [call.arg(a, pos.get(a)) for a in mod.args]
            if any(c is None for c in cond):
                return None
            src = operator.attrgetter(mod.source)(call.site.module)
            if mod.kind == "table":
                params = src + cond[0].float()
            elif mod.kind == "linear":
                emb = getattr(src, "emb", None)
                c = emb(*cond, hidden_dtype=x["hidden"].dtype) if emb is not None else cond[0]
                params = src.linear(src.silu(c))
            else:
                params = src(cond[0])
            chunks[mod.name] = params.chunk(mod.chunks, dim=mod.dim)
        streams = dict(g.streams)
        results = []
        for part in call.site.returns:
            xs = x[part]
            values, gates = [], []
            for t in streams[part]:
                v = outs[t.module][t.part]
                if t.rows is not None:
                    n = x["encoder"].shape[1]
                    v = v[:, :n] if t.rows == "encoder" else v[:, n:]
                gate = None
                if t.gate is not None:
                    gate = chunks[t.gate[0]][t.gate[1]]
                    if gate.dim() > xs.dim():  # (B, N, 1, D) per-token chunks
                        gate = gate.squeeze(-2)
                    elif gate.dim() < xs.dim():  # (B, D)
                        gate = gate.unsqueeze(1)
                values.append(v)
                gates.append(gate)
            out = kernel(kernels.gated_apply, xs, values, gates)
            if out.dtype == torch.float16 and part in g.clip_fp16:
                out = out.clip(-65504, 65504)
            results.append(out)
        return tuple(results) if len(results) > 1 else results[0]
