"""Compact a layer's K/V history: the kept rows of history + the new map, contiguous.

A budgeted next-scale store (``diffcache.kv.budget``) keeps, per layer and head group, history
K/V ``[B, H, L_old, d]``; a scale adds the new map's K/V ``[B, H, n, d]`` and a selection rule
keeps some rows of their concatenation, ``keep [B, H, m]`` (int64 indices into
``[0, L_old + n)``, sorted ascending so that the original order survives). The naive path
``torch.cat`` + ``torch.gather`` copies the whole cache twice per layer and scale
(research/var.md §4.6, P1). The kernel reads each kept row once, from the history or from the
new map, and writes K and V ``[B, H, m, d]`` in the same launch; K and V may have different
dtypes (cosine attention caches K in float32 beside 16-bit V).

Inputs may have any strides (a head group's view of the layer's new K/V). Indices must lie in
``[0, L_old + n)``: the torch reference raises on one outside, the kernel writes a zero row
for it rather than read outside the inputs (it does not check: no host synchronisation). The
kernel does not need ``keep`` sorted; the store's rows stay in order only if it is.
"""

from __future__ import annotations

import functools
from collections.abc import MutableMapping

import torch

from ._dispatch import FLOATS, Backend, OpSpec, _record, pick, register_op, tl, triton

SPEC = register_op(
    OpSpec(
        name="kv_compact",
        description="kept rows of cat(history, new) K and V -> [B, H, m, d] each, one pass",
        dtypes=FLOATS,
        input_dtypes={4: (torch.int64,)},
    )
)

_BLOCK_M = 16  # kept rows per program
_MAX_BLOCK_D = 128  # head-dim lanes per inner step; wider heads loop


def _check(
    hist_k: torch.Tensor,
    hist_v: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    keep: torch.Tensor,
) -> None:
    """Raise ValueError naming the first input that does not fit."""
    if hist_k.dim() != 4:
        raise ValueError(
            f"kv_compact: hist_k must be [B, H, L_old, d], got shape {tuple(hist_k.shape)}"
        )
    b, h, _, d = hist_k.shape
    if new_k.dim() != 4 or (new_k.shape[0], new_k.shape[1], new_k.shape[3]) != (b, h, d):
        raise ValueError(
            f"kv_compact: new_k must be [B, H, n, d] with B, H, d = {b}, {h}, {d} (hist_k's), "
            f"got shape {tuple(new_k.shape)}"
        )
    for name, v, k in (("hist_v", hist_v, hist_k), ("new_v", new_v, new_k)):
        kname = name.replace("_v", "_k")
        if v.shape != k.shape:
            raise ValueError(
                f"kv_compact: {name} must have {kname}'s shape {tuple(k.shape)}, got "
                f"{tuple(v.shape)}"
            )
    if new_k.dtype != hist_k.dtype or new_v.dtype != hist_v.dtype:
        raise ValueError(
            f"kv_compact: the new rows' dtypes (K {new_k.dtype}, V {new_v.dtype}) differ from "
            f"the history's (K {hist_k.dtype}, V {hist_v.dtype}); cast them to the store's"
        )
    if keep.dim() != 3 or tuple(keep.shape[:2]) != (b, h):
        raise ValueError(
            f"kv_compact: keep must be [B, H, m] with B, H = {b}, {h}, got shape "
            f"{tuple(keep.shape)}"
        )
    if keep.dtype != torch.int64:
        raise ValueError(f"kv_compact: keep must be int64 indices, got {keep.dtype}")


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` ``[B, H, m]`` of ``x`` ``[B, H, L, d]`` per (batch row, head), ``[B, H, m,
    d]``: ``x.gather(2, index broadcast over d)`` copying whole rows, which the gather reads
    element by element (several times slower on a CPU). Where ``x``'s rows are d-wide runs of
    one table (contiguous rows, batch and head strides whole rows: a store's buffers and their
    ``narrow`` views) one ``index_select`` over that table; else one advanced index."""
    b, h, m = index.shape
    d = x.shape[3]
    sb, sh, sl, sd = x.stride()
    if sd != 1 or sl != d or sb % d or sh % d:
        heads = torch.arange(h, device=index.device)[:, None]
        return x[torch.arange(b, device=index.device)[:, None, None], heads, index]
    span = (b - 1) * (sb // d) + (h - 1) * (sh // d) + x.shape[2]
    table = x.as_strided((span, d), (d, 1))
    first = _first_rows(b, h, sb // d, sh // d, index.device)
    return table.index_select(0, (index + first).view(-1)).view(b, h, m, d)


@functools.lru_cache(maxsize=64)
def _first_rows(b: int, h: int, batch: int, head: int, device: torch.device) -> torch.Tensor:
    """``[B, H, 1]``: the table row where each (batch row, head) starts, ``batch`` and ``head``
    rows apart; made once per layout (never written to)."""
    rows = torch.arange(b, device=device)[:, None, None] * batch
    return rows + torch.arange(h, device=device)[:, None] * head


def _gather(old: torch.Tensor, new: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    both = torch.cat((old, new), dim=2) if new.shape[2] else old  # a store's rows in one buffer
    return take_rows(both, keep)


def kv_compact_ref(
    hist_k: torch.Tensor,
    hist_v: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    keep: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: ``torch.cat`` of history and new rows, then :func:`take_rows` (K and V).

    Raises:
        ValueError: Shapes or dtypes do not fit.
    """
    _check(hist_k, hist_v, new_k, new_v, keep)
    return _gather(hist_k, new_k, keep), _gather(hist_v, new_v, keep)


if triton is not None:

    @triton.jit
    def _copy_rows(
        old_ptr,
        new_ptr,
        out_ptr,
        o_l,
        o_d,
        n_l,
        n_d,
        out_l,
        out_d,
        src,
        j,
        from_old,
        from_new,
        jmask,
        d,
        BLOCK_D: tl.constexpr,
    ):
        """Rows of one (b, h): out[j] = old[src] where from_old, new[src] where from_new, else 0
        (``*_l``, ``*_d``: row and head-dim strides)."""
        for d0 in range(0, d, BLOCK_D):
            dd = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
            dm = (dd < d)[None, :]
            x_old = tl.load(
                old_ptr + src[:, None] * o_l + dd[None, :] * o_d,
                mask=from_old[:, None] & dm,
                other=0.0,
            )
            x_new = tl.load(
                new_ptr + src[:, None] * n_l + dd[None, :] * n_d,
                mask=from_new[:, None] & dm,
                other=0.0,
            )
            x = tl.where(from_old[:, None], x_old, x_new)
            tl.store(
                out_ptr + j[:, None] * out_l + dd[None, :] * out_d, x, mask=jmask[:, None] & dm
            )

    @triton.jit
    def _kv_compact_kernel(
        hk_ptr,
        hv_ptr,
        nk_ptr,
        nv_ptr,
        keep_ptr,
        ok_ptr,
        ov_ptr,
        H,
        L_old,
        n,
        m,
        d,
        hk_b,
        hk_h,
        hk_l,
        hk_d,
        hv_b,
        hv_h,
        hv_l,
        hv_d,
        nk_b,
        nk_h,
        nk_l,
        nk_d,
        nv_b,
        nv_h,
        nv_l,
        nv_d,
        kp_b,
        kp_h,
        kp_m,
        ok_b,
        ok_h,
        ok_m,
        ok_d,
        ov_b,
        ov_h,
        ov_m,
        ov_d,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Program (b*H + h, row block): BLOCK_M kept rows of K, then the same rows of V."""
        bh = tl.program_id(0).to(tl.int64)
        b = bh // H
        h = bh % H
        j = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        jmask = j < m
        idx = tl.load(keep_ptr + b * kp_b + h * kp_h + j * kp_m, mask=jmask, other=-1)
        from_old = jmask & (idx >= 0) & (idx < L_old)
        from_new = jmask & (idx >= L_old) & (idx < L_old + n)
        src = tl.where(from_old, idx, idx - L_old)
        _copy_rows(
            hk_ptr + b * hk_b + h * hk_h,
            nk_ptr + b * nk_b + h * nk_h,
            ok_ptr + b * ok_b + h * ok_h,
            hk_l,
            hk_d,
            nk_l,
            nk_d,
            ok_m,
            ok_d,
            src,
            j,
            from_old,
            from_new,
            jmask,
            d,
            BLOCK_D,
        )
        _copy_rows(
            hv_ptr + b * hv_b + h * hv_h,
            nv_ptr + b * nv_b + h * nv_h,
            ov_ptr + b * ov_b + h * ov_h,
            hv_l,
            hv_d,
            nv_l,
            nv_d,
            ov_m,
            ov_d,
            src,
            j,
            from_old,
            from_new,
            jmask,
            d,
            BLOCK_D,
        )


def kv_compact(
    hist_k: torch.Tensor,
    hist_v: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    keep: torch.Tensor,
    backend: str | Backend = "auto",
    record: MutableMapping[str, str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the kept rows of ``cat(hist, new)`` for K and V, each a new contiguous tensor.

    Args:
        hist_k: ``[B, H, L_old, d]`` history keys (``L_old`` may be 0), any strides.
        hist_v: ``[B, H, L_old, d]`` history values; may differ from K in dtype.
        new_k: ``[B, H, n, d]`` the new map's keys, ``hist_k``'s dtype.
        new_v: ``[B, H, n, d]`` the new map's values, ``hist_v``'s dtype.
        keep: ``[B, H, m]`` int64 indices into ``[0, L_old + n)`` (history first), sorted
            ascending for a store that keeps positions in order.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``; see :mod:`diffcache.kernels`.
        record: Where to write ``record[op] = "torch" | "triton"``, the backend that ran.

    Returns:
        ``(k, v)``: ``[B, H, m, d]`` each, in K's and V's dtypes.

    Raises:
        ValueError: Shapes or dtypes do not fit.
        KernelUnavailableError: ``backend="triton"`` cannot run on these inputs.
    """
    _check(hist_k, hist_v, new_k, new_v, keep)
    chosen = pick(SPEC, backend, hist_k, hist_v, new_k, new_v, keep)
    if chosen is Backend.TRITON:
        b, h, length, d = hist_k.shape
        m = keep.shape[2]
        out_k = torch.empty((b, h, m, d), dtype=hist_k.dtype, device=hist_k.device)
        out_v = torch.empty((b, h, m, d), dtype=hist_v.dtype, device=hist_v.device)
        if out_k.numel():
            # an empty side is never read; pass the other so that no pointer is null
            hk, hv = (hist_k, hist_v) if length else (new_k, new_v)
            nk, nv = (new_k, new_v) if new_k.shape[2] else (hist_k, hist_v)
            grid = (b * h, triton.cdiv(m, _BLOCK_M))
            _kv_compact_kernel[grid](
                hk,
                hv,
                nk,
                nv,
                keep,
                out_k,
                out_v,
                h,
                length,
                new_k.shape[2],
                m,
                d,
                *hk.stride(),
                *hv.stride(),
                *nk.stride(),
                *nv.stride(),
                *keep.stride(),
                *out_k.stride(),
                *out_v.stride(),
                BLOCK_M=_BLOCK_M,
                BLOCK_D=min(triton.next_power_of_2(d), _MAX_BLOCK_D),
            )
    else:
        out_k, out_v = kv_compact_ref(hist_k, hist_v, new_k, new_v, keep)
    _record(SPEC, chosen, record)
    return out_k, out_v
