"""The budgeted history store of next-scale models: "grouped rectangular" (research/var.md §4.2).

Each layer's heads are split into the groups its :class:`~diffcache.kv.history.Selection` names;
a group is a dense ``[B, Hg, L, d]`` K and V (one row count for the whole group), so attention is
one plain SDPA call per group. At every scale the new map's rows are written after the group's
history and the selection is asked which rows to keep:

- ``when="post"`` (ScaleKV): attend over history + new rows, then compact to the kept rows, which
  are what the next scale sees;
- ``when="pre"`` (HACK as reconstructed): compact first, then attend over the kept rows.

A selection may also offer ``merge(call, group, k, v, keep) -> (k, v) | None`` (LOOK-M style:
evicted rows folded into kept ones); the store then uses what it returns instead of the plain
compaction, which it runs where ``merge`` returns None (nothing merged at this call). A
selection may offer ``budget(call, group, length) -> int | None``: the store then checks it
never keeps more, sizes the group's buffers by it, and does not ask ``keep`` while the group's
rows fit within it (nothing to select: no op, no copy). Every selection's kept indices are
checked for dtype, shape and budget; those of a selection diffcache does not define also for
being sorted, unique and in range (one host synchronisation per compaction; diffcache's own
keep them so by construction and are not read back).

Storage: per layer and head group, K and V buffers (and the rows' positions) preallocated at the
group's first call for the most rows it will hold at once (its budget plus the current map, by
walking ``budget`` over the schedule; the whole schedule without ``budget``); the new map's rows
are written after the history and the kept rows compacted to the front with
:func:`diffcache.kernels.kv_compact` (the plan's ``kernels:`` backend: its torch reference on a
CPU, the Triton kernel on CUDA), so no scale concatenates the whole history. K and V keep the
dtypes the model hands over (cosine attention: K fp32 next to 16-bit V). Bytes count the rows
held, not the buffers' spare room. With one group of all heads in order and nothing evicted it is
bit-exact with :class:`~diffcache.kv.history.FullHistory`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from diffcache.kernels import kv_compact
from diffcache.kv.history import ScaleCall, Selection, attention


def check_keep(
    keep: torch.Tensor, shape: tuple[int, int, int], budget: int | None, values: bool = True
) -> None:
    """Raise ValueError unless ``keep`` is ``[B, Hg, m]`` int64 and ``m`` is within ``budget``
    (``shape`` = ``(B, Hg, L)``), and with ``values`` unless it is strictly increasing and in
    ``[0, L)``: one host synchronisation (the rest reads shapes only)."""
    b, hg, length = shape
    if keep.dtype != torch.int64 or keep.dim() != 3 or tuple(keep.shape[:2]) != (b, hg):
        raise ValueError(
            f"kept indices must be int64 [B={b}, Hg={hg}, m], got {keep.dtype} {list(keep.shape)}"
        )
    m = keep.shape[-1]
    if budget is not None and m > budget:
        raise ValueError(f"the selection kept {m} rows, more than its budget of {budget}")
    if not values or not m:
        return
    # sorted, unique and in range <=> every step of -1, keep..., length is positive
    steps = F.pad(F.pad(keep, (1, 0), value=-1), (0, 1), value=length).diff(dim=-1)
    if not bool((steps > 0).all()):
        if int(keep.min()) < 0 or int(keep.max()) >= length:
            raise ValueError(
                f"kept indices must lie in [0, {length}), got [{keep.min()}, {keep.max()}]"
            )
        raise ValueError("kept indices must be sorted ascending and unique per (row, head)")


def ours(selection: Selection) -> bool:
    """Whether diffcache defines ``selection``'s class: its kept indices are sorted, unique and
    in range by construction (its tests pin them), so the store does not read them back."""
    return type(selection).__module__.split(".")[0] == "diffcache"


def capacity(selection: Selection, call: ScaleCall, group: int) -> int:
    """The most rows ``group`` of ``call.layer`` holds at once over ``call.schedule``: its
    history plus the current map at each scale, the history cut to the selection's ``budget``
    where it offers one (the whole schedule where it does not)."""
    budget_of = getattr(selection, "budget", None)
    schedule = call.schedule
    if budget_of is None:
        return schedule.total
    held = most = 0
    for si in range(len(schedule)):
        total = held + schedule.tokens(si)
        most = max(most, total)
        budget = budget_of(dataclasses.replace(call, si=si), group, total)
        held = total if budget is None else min(budget, total)
    return most


class _Rows:
    """One head group's rows of one layer: K, V ``[B, Hg, capacity, d]`` and their generation
    positions ``[B, Hg, capacity]``; the first :attr:`length` rows are held, in cache order.
    Every access is a ``narrow`` view (one op, no copy)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, rows: int) -> None:
        b, hg, _, d = k.shape
        self.k = k.new_empty(b, hg, rows, d)
        self.v = v.new_empty(b, hg, rows, d)
        self.pos = torch.empty(b, hg, rows, dtype=torch.int64, device=k.device)
        self.length = 0
        self.row_bytes = b * hg * d * (k.element_size() + v.element_size())

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Write the new map's rows (generation positions ``pos`` ``[n]``) after the history,
        growing the buffers if a selection keeps more than it said."""
        old, n = self.length, k.shape[2]
        if old + n > self.k.shape[2]:
            grown = _Rows(self.k, self.v, old + n)
            for mine, theirs in ((grown.k, self.k), (grown.v, self.v), (grown.pos, self.pos)):
                mine.narrow(2, 0, old).copy_(theirs.narrow(2, 0, old))
            self.k, self.v, self.pos = grown.k, grown.v, grown.pos
        self.k.narrow(2, old, n).copy_(k)
        self.v.narrow(2, old, n).copy_(v)
        self.pos.narrow(2, old, n).copy_(pos)
        self.length = old + n

    def held(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of the held K, V and positions."""
        n = self.length
        return self.k.narrow(2, 0, n), self.v.narrow(2, 0, n), self.pos.narrow(2, 0, n)

    def keep_rows(
        self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor
    ) -> None:
        """Hold K/V rows ``k``/``v`` ``[B, Hg, m, d]`` at the positions ``pos`` of ``keep``."""
        m = keep.shape[-1]
        kept_pos = pos.gather(2, keep)  # before the copies below overwrite ``pos``'s rows
        self.k.narrow(2, 0, m).copy_(k)
        self.v.narrow(2, 0, m).copy_(v)
        self.pos.narrow(2, 0, m).copy_(kept_pos)
        self.length = m


class BudgetedHistory:
    """A :class:`~diffcache.kv.history.History` that keeps, per layer and head group, the rows its
    selection chooses.

    Bytes are the store's own measurement: :meth:`nbytes` (held now), :meth:`history_nbytes`
    (rows held for later scales), :meth:`peak_nbytes` (the most held at once, counting the layer
    group being processed at its transient history + new rows) and :attr:`scale_history`, the
    history bytes held when each scale's first call arrived (the papers' "KV cache" is the entry
    of the last scale, research/var.md §2.1.8) and :attr:`pairs`, the (query, key) row pairs its
    attention computed (:attr:`scale_pairs`: per scale). The selection gets each row's position
    in ``ScaleCall.positions`` (the store owns them) and the plan's kernel backend in
    ``ScaleCall.kernels``; ``kernels`` runs the compaction (:attr:`kernel_record` names the
    backend each op used). One store serves one generation."""

    def __init__(self, selection: Selection, kernels: str = "auto") -> None:
        if selection.when not in ("pre", "post"):
            raise ValueError(f"selection.when must be 'pre' or 'post', got {selection.when!r}")
        self.selection = selection
        self.check_values = not ours(selection)  # a third party's: read its indices back
        self.kernels = kernels
        self.kernel_record: dict[str, str] = {}
        self.groups: dict[int, list[list[int]]] = {}
        self.slices: dict[int, list[slice | torch.Tensor]] = {}
        self.rows: dict[int, list[_Rows | None]] = {}
        self.scale_history: dict[int, int] = {}
        self.pairs = 0  # (query row, key row) pairs attended, summed over batch rows and heads
        self.scale_pairs: dict[int, int] = {}  # the same per scale
        self._held = 0
        self._peak = 0
        self._arange = torch.arange(0)

    def _layer_groups(self, layer: int, heads: int, device: torch.device) -> list[list[int]]:
        if layer not in self.groups:
            groups = [list(g) for g in self.selection.groups(layer, heads)]
            if sorted(h for g in groups for h in g) != list(range(heads)) or not all(groups):
                raise ValueError(
                    f"selection groups of layer {layer} must partition its {heads} heads, "
                    f"got {groups}"
                )
            self.groups[layer] = groups
            self.slices[layer] = [_heads(ids, device) for ids in groups]
            self.rows[layer] = [None] * len(groups)
        return self.groups[layer]

    def attend(
        self, call: ScaleCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        self.scale_history.setdefault(call.si, self.history_nbytes())
        groups = self._layer_groups(call.layer, q.shape[1], q.device)
        if self.slices[call.layer] == [slice(0, q.shape[1])]:
            return self._attend_group(call, 0, q, k, v)
        outs = []
        for g, heads in enumerate(self.slices[call.layer]):
            qg, kg, vg = (_select(t, heads) for t in (q, k, v))
            outs.append(self._attend_group(call, g, qg, kg, vg))
        if [h for ids in groups for h in ids] == list(range(q.shape[1])):
            return torch.cat(outs, dim=1)  # the groups hold the heads in order
        out = torch.empty_like(q)
        for heads, og in zip(self.slices[call.layer], outs, strict=True):
            _place(out, heads, og)
        return out

    def _attend_group(
        self, call: ScaleCall, g: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        rows = self.rows[call.layer][g]
        if rows is None:
            rows = _Rows(k, v, capacity(self.selection, call, g))
            self.rows[call.layer][g] = rows
        start, n = call.schedule.start(call.si), k.shape[2]
        rows.append(k, v, self._positions(call.schedule.total, k.device).narrow(0, start, n))
        self._held += k.shape[2] * rows.row_bytes
        self._peak = max(self._peak, self._held)
        self._held -= rows.length * rows.row_bytes
        held = rows.held()
        if self.selection.when == "pre" and self._compact(call, g, q, rows, held):
            held = rows.held()
        hk, hv, _ = held
        pairs = q.shape[0] * q.shape[1] * q.shape[2] * hk.shape[2]
        self.pairs += pairs
        self.scale_pairs[call.si] = self.scale_pairs.get(call.si, 0) + pairs
        out = attention(q, hk, hv, call.scale)
        if self.selection.when == "post":
            self._compact(call, g, q, rows, held)
        self._held += rows.length * rows.row_bytes
        return out

    def _positions(self, total: int, device: torch.device) -> torch.Tensor:
        """``arange(total)`` on ``device``, made once per store (rows' positions are its views)."""
        if self._arange.device != device or self._arange.shape[0] < total:
            self._arange = torch.arange(total, device=device)
        return self._arange

    def _compact(
        self,
        call: ScaleCall,
        g: int,
        q: torch.Tensor,
        rows: _Rows,
        held: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> bool:
        """Ask the selection what to keep of the ``held`` rows and compact to it; whether it
        did. A group within its budget is left as it is, without asking (no op, no copy)."""
        k, v, pos = held
        budget_of = getattr(self.selection, "budget", None)
        budget = budget_of(call, g, k.shape[2]) if budget_of is not None else None
        if budget is not None and k.shape[2] <= budget:
            return False
        call = dataclasses.replace(
            call, positions=pos, kernels=self.kernels, record=self.kernel_record
        )
        keep = self.selection.keep(call, g, q, k, v)
        if keep is None:
            return False
        check_keep(keep, (k.shape[0], k.shape[1], k.shape[2]), budget, self.check_values)
        merge = getattr(self.selection, "merge", None)
        merged = None if merge is None else merge(call, g, k, v, keep)
        if merged is not None:
            k2, v2 = merged
            want = (*keep.shape, k.shape[-1])
            if tuple(k2.shape) != want or tuple(v2.shape) != want:
                raise ValueError(f"merge must return K and V of shape {list(want)}")
        else:
            empty = k[:, :, :0]
            k2, v2 = kv_compact(
                k, v, empty, v[:, :, :0], keep, backend=self.kernels, record=self.kernel_record
            )
        rows.keep_rows(k2, v2, pos, keep)
        return True

    def held(self, layer: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The K and V rows ``group`` of ``layer`` holds, ``[B, Hg, L, d]`` (views)."""
        rows = self.rows[layer][group]
        assert rows is not None, f"layer {layer} group {group} holds no rows yet"
        k, v, _ = rows.held()
        return k, v

    def positions(self, layer: int, group: int) -> torch.Tensor:
        """The generation positions of the rows ``group`` of ``layer`` holds, ``[B, Hg, L]``
        (the schedule maps them to a scale and ``(y, x)``); bookkeeping, not in the bytes."""
        rows = self.rows[layer][group]
        assert rows is not None, f"layer {layer} group {group} holds no rows yet"
        return rows.held()[2]

    def nbytes(self) -> int:
        return self._held

    def history_nbytes(self) -> int:
        return self._held

    def peak_nbytes(self) -> int:
        return self._peak


def _heads(ids: list[int], device: torch.device) -> slice | torch.Tensor:
    """A group's heads as a slice where they are consecutive (a view), else an index tensor."""
    if ids == list(range(ids[0], ids[0] + len(ids))):
        return slice(ids[0], ids[0] + len(ids))
    return torch.tensor(ids, device=device)


def _select(t: torch.Tensor, heads: slice | torch.Tensor) -> torch.Tensor:
    return t[:, heads] if isinstance(heads, slice) else t.index_select(1, heads)


def _place(t: torch.Tensor, heads: slice | torch.Tensor, x: torch.Tensor) -> None:
    """Write ``x`` into the heads of ``t`` that :func:`_select` read."""
    if isinstance(heads, slice):
        t[:, heads] = x
    else:
        t.index_copy_(1, heads, x)
