"""The budgeted history store of next-scale models: "grouped rectangular" (research/var.md §4.2).

Each layer's heads are split into the groups its :class:`~diffcache.kv.history.Selection` names;
a group is a dense ``[B, Hg, L, d]`` K and V (one row count for the whole group), so attention is
one plain SDPA call per group. At every scale the store concatenates the group's history with the
new map's rows and asks the selection which rows to keep:

- ``when="post"`` (ScaleKV): attend over history + new rows, then compact to the kept rows, which
  are what the next scale sees;
- ``when="pre"`` (HACK as reconstructed): compact first, then attend over the kept rows.

A selection may also offer ``merge(call, group, k, v, keep) -> (k, v)`` (LOOK-M style: evicted
rows folded into kept ones); the store then uses it instead of the plain gather. A selection may
offer ``budget(call, group, length) -> int | None``: the store then checks it never keeps more.

K and V keep the dtypes the model hands over (cosine attention: K fp32 next to 16-bit V). The
store is contiguous (``torch.cat`` then ``torch.gather``): with one group of all heads in order
and nothing evicted it is bit-exact with :class:`~diffcache.kv.history.FullHistory`.
"""

from __future__ import annotations

import dataclasses

import torch

from diffcache.kv.history import ScaleCall, Selection, attention


def _nbytes(*ts: torch.Tensor) -> int:
    return sum(t.nelement() * t.element_size() for t in ts)


def check_keep(keep: torch.Tensor, shape: tuple[int, int, int], budget: int | None) -> None:
    """Raise ValueError unless ``keep`` is ``[B, Hg, m]`` int64, strictly increasing, in
    ``[0, L)`` and ``m`` is within ``budget`` (``shape`` = ``(B, Hg, L)``)."""
    b, hg, length = shape
    if keep.dtype != torch.int64 or keep.dim() != 3 or tuple(keep.shape[:2]) != (b, hg):
        raise ValueError(
            f"kept indices must be int64 [B={b}, Hg={hg}, m], got {keep.dtype} {list(keep.shape)}"
        )
    m = keep.shape[-1]
    if budget is not None and m > budget:
        raise ValueError(f"the selection kept {m} rows, more than its budget of {budget}")
    if m and (int(keep.min()) < 0 or int(keep.max()) >= length):
        raise ValueError(
            f"kept indices must lie in [0, {length}), got [{keep.min()}, {keep.max()}]"
        )
    if m > 1 and not bool((keep.diff(dim=-1) > 0).all()):
        raise ValueError("kept indices must be sorted ascending and unique per (row, head)")


def gather_rows(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The rows ``keep`` ``[B, Hg, m]`` of ``t`` ``[B, Hg, L, d]``, in order (contiguous)."""
    return torch.gather(t, 2, keep.unsqueeze(-1).expand(-1, -1, -1, t.shape[-1]))


class BudgetedHistory:
    """A :class:`~diffcache.kv.history.History` that keeps, per layer and head group, the rows its
        selection chooses.

        Bytes are the store's own measurement: :meth:`nbytes` (held now), :meth:`history_nbytes`
        (rows held for later scales), :meth:`peak_nbytes` (the most held at once, counting the layer
        group being processed at its transient history + new rows) and :attr:`scale_history`, the
        history bytes held when each scale's first call arrived (the papers' "KV cache" is the entry
        of the last scale, research/var.md §2.1.8) and :attr:`pairs`, the (query, key) row pairs its
    attention computed. The selection gets each row's position in ``ScaleCall.positions`` (the store
    owns them). One store serves one generation."""

    def __init__(self, selection: Selection) -> None:
        if selection.when not in ("pre", "post"):
            raise ValueError(f"selection.when must be 'pre' or 'post', got {selection.when!r}")
        self.selection = selection
        self.groups: dict[int, list[list[int]]] = {}
        self.k: dict[int, list[torch.Tensor | None]] = {}
        self.v: dict[int, list[torch.Tensor | None]] = {}
        self.pos: dict[int, list[torch.Tensor | None]] = {}
        self.scale_history: dict[int, int] = {}
        self.pairs = 0  # (query row, key row) pairs attended, summed over batch rows and heads
        self._held = 0
        self._peak = 0

    def _layer_groups(self, layer: int, heads: int) -> list[list[int]]:
        if layer not in self.groups:
            groups = [list(g) for g in self.selection.groups(layer, heads)]
            if sorted(h for g in groups for h in g) != list(range(heads)) or not all(groups):
                raise ValueError(
                    f"selection groups of layer {layer} must partition its {heads} heads, "
                    f"got {groups}"
                )
            self.groups[layer] = groups
            self.k[layer] = [None] * len(groups)
            self.v[layer] = [None] * len(groups)
            self.pos[layer] = [None] * len(groups)
        return self.groups[layer]

    def attend(
        self, call: ScaleCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        self.scale_history.setdefault(call.si, self.history_nbytes())
        heads = q.shape[1]
        groups = self._layer_groups(call.layer, heads)
        whole = len(groups) == 1 and groups[0] == list(range(heads))
        outs = []
        for g, ids in enumerate(groups):
            idx = torch.tensor(ids, device=q.device)
            qg, kg, vg = (q, k, v) if whole else (t.index_select(1, idx) for t in (q, k, v))
            outs.append(self._attend_group(call, g, qg, kg, vg))
        if whole:
            return outs[0]
        out = torch.empty_like(q)
        for ids, og in zip(groups, outs, strict=True):
            out[:, ids] = og
        return out

    def _attend_group(
        self, call: ScaleCall, g: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        layer, start = call.layer, call.schedule.start(call.si)
        pos = torch.arange(start, start + k.shape[2], device=k.device).expand(*k.shape[:3])
        old_k, old_v, old_pos = self.k[layer][g], self.v[layer][g], self.pos[layer][g]
        if old_k is not None and old_v is not None and old_pos is not None:
            self._held -= _nbytes(old_k, old_v)
            k, v = torch.cat((old_k, k), dim=2), torch.cat((old_v, v), dim=2)
            pos = torch.cat((old_pos, pos), dim=2)
        self._peak = max(self._peak, self._held + _nbytes(k, v))
        call = dataclasses.replace(call, positions=pos)
        if self.selection.when == "pre":
            k, v, pos = self._compact(call, g, q, k, v, pos)
        self.pairs += q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
        out = attention(q, k, v, call.scale)
        if self.selection.when == "post":
            k, v, pos = self._compact(call, g, q, k, v, pos)
        self.k[layer][g], self.v[layer][g], self.pos[layer][g] = k, v, pos
        self._held += _nbytes(k, v)
        return out

    def _compact(
        self,
        call: ScaleCall,
        g: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pos: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keep = self.selection.keep(call, g, q, k, v)
        if keep is None:
            return k, v, pos
        budget_of = getattr(self.selection, "budget", None)
        budget = budget_of(call, g, k.shape[2]) if budget_of is not None else None
        check_keep(keep, (k.shape[0], k.shape[1], k.shape[2]), budget)
        merge = getattr(self.selection, "merge", None)
        if merge is not None:
            k2, v2 = merge(call, g, k, v, keep)
            want = (*keep.shape, k.shape[-1])
            if tuple(k2.shape) != want or tuple(v2.shape) != want:
                raise ValueError(f"merge must return K and V of shape {list(want)}")
            return k2, v2, pos.gather(2, keep)
        return gather_rows(k, keep), gather_rows(v, keep), pos.gather(2, keep)

    def positions(self, layer: int, group: int) -> torch.Tensor:
        """The generation positions of the rows ``group`` of ``layer`` holds, ``[B, Hg, L]``
        (the schedule maps them to a scale and ``(y, x)``); bookkeeping, not in the bytes."""
        pos = self.pos[layer][group]
        assert pos is not None, f"layer {layer} group {group} holds no rows yet"
        return pos

    def nbytes(self) -> int:
        return self._held

    def history_nbytes(self) -> int:
        return self._held

    def peak_nbytes(self) -> int:
        return self._peak
