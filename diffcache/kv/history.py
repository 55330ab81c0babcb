"""The history KV store of next-scale (visual autoregressive) models: VAR and Infinity.

A next-scale model generates an image as a sequence of token maps, coarse to fine (its
:class:`Schedule`). At scale ``si`` every layer's self-attention lets the queries of the new map
attend, with no mask, to the keys of every earlier map (the *history*) and of its own map; the
new map's K and V then join the history (research/var.md §1.1.3, §1.2.3). Keys are cached after
their position encoding (VAR: absolute embeddings added to the input; Infinity: 2-D RoPE whose
offset depends on the scale, not on the cache length), so dropping history rows never re-indexes
the rows kept.

The model meets the store in one call per layer and scale, :meth:`History.attend`: it hands over
the new map's q, k and v exactly as its attention would use them (after normalisation, temperature
and RoPE) and gets back the attention output. :class:`FullHistory` keeps everything, the upstream
``torch.cat`` cache: the plain model. A KV-compression method hands the pipeline a store of its
own (``diffcache.kv.budget``) that keeps at most a budget of rows per layer.

All tensors are ``[B, H, n, head_dim]`` (the BHLd layout; an adapter whose model keeps BLHd
converts at its boundary). With CFG the batch holds the conditional rows first.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The token maps of one generation, ``(h, w)`` per scale; positions run over the maps in
    order, each map in raster order."""

    sizes: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", tuple((int(h), int(w)) for h, w in self.sizes))
        assert self.sizes and all(h > 0 and w > 0 for h, w in self.sizes), self.sizes

    @classmethod
    def square(cls, sides: tuple[int, ...] | list[int]) -> Schedule:
        """VAR's ``patch_nums``: square maps of these sides."""
        return cls(tuple((s, s) for s in sides))

    def __len__(self) -> int:
        return len(self.sizes)

    def tokens(self, si: int) -> int:
        """Tokens of map ``si``."""
        h, w = self.sizes[si]
        return h * w

    def start(self, si: int) -> int:
        """Position of map ``si``'s first token: the history its queries see before it."""
        return self._starts[si]

    @property
    def total(self) -> int:
        return self._starts[-1]

    @functools.cached_property
    def _starts(self) -> tuple[int, ...]:
        out = [0]
        for si in range(len(self.sizes)):
            out.append(out[-1] + self.tokens(si))
        return tuple(out)

    def scale_of(self, positions: torch.Tensor) -> torch.Tensor:
        """The map each position belongs to."""
        starts = torch.tensor(self._starts[1:], device=positions.device)
        return torch.bucketize(positions, starts, right=True)


@dataclasses.dataclass(frozen=True)
class ScaleCall:
    """One layer's self-attention at one scale, as the model describes it to the store.

    Args:
        layer: the layer (flat index, 0 = first block).
        si: the scale (0-based) whose map the queries belong to.
        schedule: the generation's maps.
        cond_rows: rows ``[0:cond_rows]`` are conditional, the rest their unconditional twins
            (CFG batch doubling); the whole batch without CFG.
        scale: the softmax scale the model's attention applies to ``q·k`` (cosine attention
            with the temperature folded into q: 1.0).
        raw_query: the new map's queries re-projected from the attention's input without bias,
            normalisation, temperature or RoPE ``[B, H, n, head_dim]`` (what ScaleKV's released
            code scores with); None if the model does not offer it.
        positions: set by a budgeted store for its selection (the model leaves it None): the
            generation position of each row of the ``k`` the selection is handed,
            ``[B, Hg, L]`` (the group's kept history, then the new map); the store owns them.
        kernels: set by a budgeted store: the plan's kernel backend (``auto | torch | triton``)
            for the selection's scoring ops, and ``record``, where they note the backend that
            ran (``record[op] = "torch" | "triton"``).
    """

    layer: int
    si: int
    schedule: Schedule
    cond_rows: int
    scale: float = 1.0
    raw_query: Callable[[], torch.Tensor] | None = None
    positions: torch.Tensor | None = None
    kernels: str = "auto"
    record: dict[str, str] | None = None


@runtime_checkable
class History(Protocol):
    """A generation's history store: the seam a next-scale model's attention calls."""

    def attend(
        self, call: ScaleCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Attention of the new map's queries ``q`` over the layer's kept history and the new
        map's own ``k``/``v``; the new rows join the history (as the store's rule keeps them).
        Returns ``[B, H, n, head_dim]``."""
        ...

    def nbytes(self) -> int:
        """Bytes of the K and V tensors the store holds now."""
        ...

    def history_nbytes(self) -> int:
        """Bytes of the history rows held (what the next scale's queries will see)."""
        ...

    def peak_nbytes(self) -> int:
        """The most bytes held at any moment of the generation so far, transient rows included
        (a layer's new map before its rows are compacted)."""
        ...


@runtime_checkable
class Selection(Protocol):
    """A KV-compression rule, as a budgeted history store (``diffcache.kv.budget``) asks it.

    ``when`` is ``"pre"`` (select before the scale's attention, over history + the new map's
    rows; the queries then attend only to the kept rows: HACK as reconstructed) or ``"post"``
    (attend over everything, then select what the next scale keeps: ScaleKV). ``groups``
    partitions a layer's heads; each group keeps one number of rows (a dense tensor). The store
    owns which generation position each row holds and hands them over in ``call.positions``, so
    a selection keeps no state between calls.
    """

    when: str

    def groups(self, layer: int, heads: int) -> list[list[int]]:
        """The head groups of ``layer`` (a partition of ``range(heads)``)."""
        ...

    def keep(
        self, call: ScaleCall, group: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor | None:
        """The rows group ``group`` keeps, sorted ascending, ``[B, Hg, m]`` int64 indices into
        ``k``/``v`` ``[B, Hg, L, d]`` (the group's history followed by the new map's rows; ``q``
        ``[B, Hg, n, d]`` the new map's queries), or None to keep them all."""
        ...


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is a 16-bit float (float64 stays): what cosine attention's
    F.normalize gives under CUDA autocast, so the history keeps K in fp32 on every device."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Unmasked SDPA; K and V are cast to q's dtype where the model keeps them in another
    (cosine attention caches K in fp32 next to 16-bit V, research/var.md §1.1.3)."""
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), scale=scale)


class FullHistory:
    """The plain model's cache: every layer keeps every row (upstream's ``torch.cat``)."""

    def __init__(self) -> None:
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def attend(
        self, call: ScaleCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        if call.layer in self.k:
            k = torch.cat((self.k[call.layer], k), dim=2)
            v = torch.cat((self.v[call.layer], v), dim=2)
        self.k[call.layer], self.v[call.layer] = k, v
        return attention(q, k, v, call.scale)

    def nbytes(self) -> int:
        return sum(t.nelement() * t.element_size() for t in (*self.k.values(), *self.v.values()))

    def history_nbytes(self) -> int:
        return self.nbytes()

    def peak_nbytes(self) -> int:
        return self.nbytes()  # it only grows
