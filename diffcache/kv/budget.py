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
rows fit within it (nothing to select: no op, no copy), nor, for diffcache's own selections,
where it is None (:func:`ours`). Every selection's kept indices are checked for dtype, shape
and budget; those of a selection diffcache does not define also for being sorted, unique and
in range (one host synchronisation per compaction; diffcache's own keep them so by
construction and are not read back).

Storage: per layer and head group, K and V buffers (and the rows' positions) preallocated at the
group's first call for the most rows it will hold at once (its budget plus the current map, by
walking ``budget`` over the schedule; the whole schedule without ``budget``); the new map's rows
are written after the history and the kept rows compacted to the front: where the plan's
``kernels:`` backend runs Triton (CUDA) by :func:`diffcache.kernels.kv_compact`, else by one
``index_select`` per buffer over its rows (the same rows as kv_compact's torch reference,
without its new tensors), so no scale concatenates the whole history. The rows' positions are
written when read (a selection is asked, or :meth:`BudgetedHistory.positions`). K and V keep the
dtypes the model hands over (cosine attention: K fp32 next to 16-bit V). Bytes count the rows
held, not the buffers' spare room. With one group of all heads in order and nothing evicted it is
bit-exact with :class:`~diffcache.kv.history.FullHistory`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from diffcache.kernels import Backend, kv_compact, pick
from diffcache.kernels.kv_compact import SPEC as KV_COMPACT
from diffcache.kv.history import ScaleCall, Schedule, Selection, attention


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
    in range by construction, and where its ``budget`` is None (no compression at this call)
    its ``keep`` keeps everything (its tests pin both), so the store does not read the indices
    back, nor ask it where its budget is None."""
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
    Every access is a ``narrow`` view (one op, no copy).

    The positions of the rows appended since the last compaction are consecutive (``tail``,
    ``tail + 1``, ...: a map follows the one before it), so they are written into ``pos`` only
    when read (:meth:`positions`: a selection asks, or a caller) rather than at every append;
    the first :attr:`written` rows' positions are in ``pos``."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, rows: int) -> None:
        b, hg, _, d = k.shape
        self.k = k.new_empty(b, hg, rows, d)
        self.v = v.new_empty(b, hg, rows, d)
        self.pos = torch.empty(b, hg, rows, dtype=torch.int64, device=k.device)
        self.length = self.written = self.tail = 0
        self.row_bytes = b * hg * d * (k.element_size() + v.element_size())
        # the buffers as tables of rows (row r of (batch row i, head j): i·Hg·capacity +
        # j·capacity + r), where a compaction moves its kept rows; made once
        self.tables = (self.k.view(-1, d), self.v.view(-1, d), self.pos.view(-1))
        self.first = torch.arange(0, b * hg * rows, rows, device=k.device).view(b, hg, 1)

    def grown(self, rows: int, arange: torch.Tensor) -> _Rows:
        """The same held rows in buffers of ``rows`` rows (a selection kept more than it said);
        ``arange`` as for :meth:`positions`."""
        grown = _Rows(self.k, self.v, rows)
        self.positions(arange)
        old = grown.length = grown.written = self.length
        for mine, theirs in ((grown.k, self.k), (grown.v, self.v), (grown.pos, self.pos)):
            mine.narrow(2, 0, old).copy_(theirs.narrow(2, 0, old))
        return grown

    def append(self, k: torch.Tensor, v: torch.Tensor, start: int, arange: torch.Tensor) -> None:
        """Write the new map's rows (generation positions ``start``, ``start + 1``, ...) after
        the history (the buffers have room: :meth:`grown`); ``arange`` as for
        :meth:`positions`."""
        old, n = self.length, k.shape[2]
        if self.written < old and self.tail + old - self.written != start:
            self.positions(arange)  # not the next map: the pending run is written first
        if self.written == old:
            self.tail = start
        self.k.narrow(2, old, n).copy_(k)
        self.v.narrow(2, old, n).copy_(v)
        self.length = old + n

    def held(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the held K and V."""
        n = self.length
        return self.k.narrow(2, 0, n), self.v.narrow(2, 0, n)

    def positions(self, arange: torch.Tensor) -> torch.Tensor:
        """A view of the held rows' positions ``[B, Hg, length]``, the pending ones written
        from ``arange`` (every generation position, in order)."""
        pending = self.length - self.written
        if pending:
            self.pos.narrow(2, self.written, pending).copy_(arange.narrow(0, self.tail, pending))
            self.written = self.length
        return self.pos.narrow(2, 0, self.length)

    def keep_rows(
        self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor
    ) -> None:
        """Hold K/V rows ``k``/``v`` ``[B, Hg, m, d]`` at the positions ``pos`` (the held rows',
        :meth:`positions`) of ``keep``."""
        m = keep.shape[-1]
        kept_pos = pos.gather(2, keep)  # before the copies below overwrite ``pos``'s rows
        self.k.narrow(2, 0, m).copy_(k)
        self.v.narrow(2, 0, m).copy_(v)
        self.pos.narrow(2, 0, m).copy_(kept_pos)
        self.length = self.written = m

    def compact(self, keep: torch.Tensor) -> None:
        """Hold only the rows ``keep`` ``[B, Hg, m]`` (indices into the held rows, whose
        positions are written: :meth:`positions`), moved to the front: per buffer one
        ``index_select`` of the kept rows from its row table (a copy: nothing is read after it
        is written), copied into the first ``m`` rows."""
        m = keep.shape[-1]
        kept = (keep + self.first).view(-1)
        for buffer, table in zip((self.k, self.v, self.pos), self.tables, strict=True):
            rows = table.index_select(0, kept)
            buffer.narrow(2, 0, m).copy_(rows.view(*keep.shape, *buffer.shape[3:]))
        self.length = self.written = m


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

    def __init__(
        self,
        selection: Selection,
        kernels: str = "auto",
        sizes: dict[tuple[int, int, Schedule], int] | None = None,
    ) -> None:
        if selection.when not in ("pre", "post"):
            raise ValueError(f"selection.when must be 'pre' or 'post', got {selection.when!r}")
        self.selection = selection
        self.ours = ours(selection)  # else a third party's: read its indices back
        self.budget_of = getattr(selection, "budget", None)
        self.merge = getattr(selection, "merge", None)
        self.kernels = kernels
        self.kernel_record: dict[str, str] = {}
        # buffer rows per (layer, group, schedule): :func:`capacity`, walked once per
        # selection (a session's generations may share this mapping)
        self.sizes = {} if sizes is None else sizes
        self.groups: dict[int, list[list[int]]] = {}
        self.slices: dict[int, list[slice | torch.Tensor]] = {}
        self.whole: dict[int, bool] = {}  # the layer's heads are one group, in order
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
            self.whole[layer] = groups == [list(range(heads))]
            self.rows[layer] = [None] * len(groups)
        return self.groups[layer]

    def attend(
        self, call: ScaleCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        self.scale_history.setdefault(call.si, self._held)
        groups = self._layer_groups(call.layer, q.shape[1], q.device)
        if self.whole[call.layer]:
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
        n = k.shape[2]
        rows = self.rows[call.layer][g]
        if rows is None:
            rows = self.rows[call.layer][g] = _Rows(k, v, self._capacity(call, g))
        arange = self._positions(call.schedule.total, k.device)
        if rows.length + n > rows.k.shape[2]:  # a selection kept more than it said
            rows = self.rows[call.layer][g] = rows.grown(rows.length + n, arange)
        rows.append(k, v, call.schedule.start(call.si), arange)
        self._held += n * rows.row_bytes
        self._peak = max(self._peak, self._held)
        self._held -= rows.length * rows.row_bytes
        held = rows.held()
        if self.selection.when == "pre" and self._compact(call, g, q, rows, held):
            held = rows.held()
        hk, hv = held
        pairs = q.shape[0] * q.shape[1] * q.shape[2] * hk.shape[2]
        self.pairs += pairs
        self.scale_pairs[call.si] = self.scale_pairs.get(call.si, 0) + pairs
        out = attention(q, hk, hv, call.scale)
        if self.selection.when == "post":
            self._compact(call, g, q, rows, held)
        self._held += rows.length * rows.row_bytes
        return out

    def _capacity(self, call: ScaleCall, g: int) -> int:
        key = (call.layer, g, call.schedule)
        if key not in self.sizes:
            self.sizes[key] = capacity(self.selection, call, g)
        return self.sizes[key]

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
        held: tuple[torch.Tensor, torch.Tensor],
    ) -> bool:
        """Ask the selection what to keep of the ``held`` rows and compact to it; whether it
        did. A group within its budget, or one of diffcache's own selections where it sets no
        budget, is left as it is, without asking (no op, no copy)."""
        k, v = held
        length = k.shape[2]
        budget = None if self.budget_of is None else self.budget_of(call, g, length)
        if budget is None:
            if self.ours:  # one of ours sets no budget where it does not compress
                return False
        elif length <= budget:
            return False
        pos = rows.positions(self._arange)
        call = dataclasses.replace(
            call, positions=pos, kernels=self.kernels, record=self.kernel_record
        )
        keep = self.selection.keep(call, g, q, k, v)
        if keep is None:
            return False
        check_keep(keep, (k.shape[0], k.shape[1], length), budget, not self.ours)
        merged = None if self.merge is None else self.merge(call, g, k, v, keep)
        if merged is not None:
            k2, v2 = merged
            want = (*keep.shape, k.shape[-1])
            if tuple(k2.shape) != want or tuple(v2.shape) != want:
                raise ValueError(f"merge must return K and V of shape {list(want)}")
            rows.keep_rows(k2, v2, pos, keep)
        elif pick(KV_COMPACT, self.kernels, k, v, k, v, keep) is Backend.TRITON:
            empty = k[:, :, :0]
            k2, v2 = kv_compact(
                k, v, empty, v[:, :, :0], keep, backend=self.kernels, record=self.kernel_record
            )
            rows.keep_rows(k2, v2, pos, keep)
        else:  # the torch path: the kept rows moved within the buffers, no new tensor
            rows.compact(keep)
            self.kernel_record[KV_COMPACT.name] = Backend.TORCH.value
        return True

    def held(self, layer: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The K and V rows ``group`` of ``layer`` holds, ``[B, Hg, L, d]`` (views)."""
        rows = self.rows[layer][group]
        assert rows is not None, f"layer {layer} group {group} holds no rows yet"
        return rows.held()

    def positions(self, layer: int, group: int) -> torch.Tensor:
        """The generation positions of the rows ``group`` of ``layer`` holds, ``[B, Hg, L]``
        (the schedule maps them to a scale and ``(y, x)``); bookkeeping, not in the bytes."""
        rows = self.rows[layer][group]
        assert rows is not None, f"layer {layer} group {group} holds no rows yet"
        return rows.positions(self._arange)

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
