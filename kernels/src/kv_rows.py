"""K/V rows of a position-indexed store: scatter fresh rows in, gather rows out.

A text diffusion LM keeps, per layer, one post-RoPE key and one value row per absolute position:
``store [B, H, L, hd]``. A step recomputes only the rows its policy chose, ``rows [B, n]``
(int64 positions, ragged sets padded by repeating a valid position with the same values), and
writes them in place; attention side-outputs read some rows back (research/dlm.md §6.1).

The Triton kernels run one program per (batch, head, block of rows) and copy whole
``hd``-vectors, any strides of ``store``, ``values`` and ``rows``: no ``contiguous()`` copies and
no host synchronisation. Positions must lie in ``[0, L)``: the torch reference raises on an
out-of-range position, the kernels skip it (scatter writes nothing, gather reads zeros) rather
than touch memory outside the store — they do not check, to stay free of host syncs.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch

from ._dispatch import FLOATS, Backend, OpSpec, _record, pick, register_op, tl, triton

SCATTER_SPEC = register_op(
    OpSpec(
        name="kv_scatter",
        description="store[b, :, rows[b, j], :] = values[b, :, j, :], in place (KV by position)",
        dtypes=FLOATS,
        input_dtypes={1: (torch.int64,)},
    )
)
GATHER_SPEC = register_op(
    OpSpec(
        name="kv_gather",
        description="store[b, :, rows[b, j], :] -> [B, H, n, hd] (KV rows by position)",
        dtypes=FLOATS,
        input_dtypes={1: (torch.int64,)},
    )
)

_BLOCK_N = 16  # rows per program
_MAX_BLOCK_D = 256  # head-dim lanes per inner step; wider heads loop


def _check(
    op: str, store: torch.Tensor, rows: torch.Tensor, values: torch.Tensor | None = None
) -> None:
    if store.dim() != 4:
        raise ValueError(f"{op}: store must be [B, H, L, hd], got shape {tuple(store.shape)}")
    if rows.dim() != 2 or rows.shape[0] != store.shape[0]:
        raise ValueError(
            f"{op}: rows must be [B, n] with B = {store.shape[0]} (the store's batch), got "
            f"shape {tuple(rows.shape)}"
        )
    if rows.dtype != torch.int64:
        raise ValueError(f"{op}: rows must be int64 positions, got {rows.dtype}")
    if values is None:
        return
    b, h, _, hd = store.shape
    want = (b, h, rows.shape[1], hd)
    if tuple(values.shape) != want:
        raise ValueError(
            f"{op}: values must be [B, H, n, hd] = {want}, got shape {tuple(values.shape)}"
        )
    if values.dtype != store.dtype:
        raise ValueError(
            f"{op}: values dtype {values.dtype} differs from the store's {store.dtype}; cast "
            "the fresh rows to the store dtype"
        )


def _index(store: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Broadcast ``rows [B, n]`` to a gather/scatter index over ``store``'s dim 2 (a view)."""
    b, h, _, hd = store.shape
    return rows[:, None, :, None].expand(b, h, rows.shape[1], hd)


def kv_scatter_ref(store: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """Torch reference: ``store.scatter_(2, rows broadcast, values)``, in place.

    Args:
        store: ``[B, H, L, hd]``, any float dtype and strides.
        rows: ``[B, n]`` int64 positions in ``[0, L)``; a position may repeat only with identical
            values (ragged sets padded by repetition).
        values: ``[B, H, n, hd]``, the store's dtype.

    Raises:
        ValueError: Shapes or dtypes do not fit.
    """
    _check("kv_scatter", store, rows, values)
    if rows.numel():
        store.scatter_(2, _index(store, rows), values)


def kv_gather_ref(store: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Torch reference: ``store.gather(2, rows broadcast)``, a new ``[B, H, n, hd]`` tensor.

    Raises:
        ValueError: Shapes or dtypes do not fit.
    """
    _check("kv_gather", store, rows)
    return store.gather(2, _index(store, rows))


if triton is not None:

    @triton.jit
    def _kv_rows_kernel(
        store_ptr,
        rows_ptr,
        vals_ptr,
        H,
        L,
        n,
        hd,
        s_b,
        s_h,
        s_l,
        s_d,
        r_b,
        r_n,
        v_b,
        v_h,
        v_n,
        v_d,
        SCATTER: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Program (b*H + h, j-block): copy BLOCK_N hd-vectors between store rows and values."""
        bh = tl.program_id(0).to(tl.int64)
        b = bh // H
        h = bh % H
        j = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        jmask = j < n
        pos = tl.load(rows_ptr + b * r_b + j * r_n, mask=jmask, other=0)
        ok = jmask & (pos >= 0) & (pos < L)  # out-of-range positions are skipped, never touched
        s_row = store_ptr + b * s_b + h * s_h + pos * s_l  # [BLOCK_N] pointers
        v_row = vals_ptr + b * v_b + h * v_h + j * v_n
        for d0 in range(0, hd, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            m = ok[:, None] & (d < hd)[None, :]
            s_ptrs = s_row[:, None] + d[None, :].to(tl.int64) * s_d
            v_ptrs = v_row[:, None] + d[None, :].to(tl.int64) * v_d
            if SCATTER:
                x = tl.load(v_ptrs, mask=m)
                tl.store(s_ptrs, x, mask=m)
            else:
                x = tl.load(s_ptrs, mask=m, other=0.0)
                # rows past n are not stored; in-range j with a bad position stores zeros
                tl.store(v_ptrs, x, mask=jmask[:, None] & (d < hd)[None, :])


def _launch(store: torch.Tensor, rows: torch.Tensor, vals: torch.Tensor, scatter: bool) -> None:
    b, h, length, hd = store.shape
    n = rows.shape[1]
    if b * h * n * hd == 0:
        return
    block_d = min(triton.next_power_of_2(hd), _MAX_BLOCK_D)
    grid = (b * h, triton.cdiv(n, _BLOCK_N))
    _kv_rows_kernel[grid](
        store,
        rows,
        vals,
        h,
        length,
        n,
        hd,
        *store.stride(),
        *rows.stride(),
        *vals.stride(),
        SCATTER=scatter,
        BLOCK_N=_BLOCK_N,
        BLOCK_D=block_d,
    )


def kv_scatter(
    store: torch.Tensor,
    rows: torch.Tensor,
    values: torch.Tensor,
    backend: str | Backend = "auto",
    record: MutableMapping[str, str] | None = None,
) -> None:
    """Write ``store[b, :, rows[b, j], :] = values[b, :, j, :]`` in place.

    Args:
        store: ``[B, H, L, hd]`` post-RoPE keys or values (float32, float16 or bfloat16 for the
            Triton kernel; any strides).
        rows: ``[B, n]`` int64 positions in ``[0, L)``. Within a batch row positions are distinct,
            except that a ragged set may be padded by repeating one of its positions together
            with that position's values (identical writes; safe on both backends).
        values: ``[B, H, n, hd]`` fresh rows, the store's dtype, any strides.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``; see :mod:`diffcache.kernels`.
        record: Where to write ``record[op] = "torch" | "triton"``, the backend that ran.

    Raises:
        ValueError: Shapes or dtypes do not fit.
        KernelUnavailableError: ``backend="triton"`` cannot run on these inputs.
    """
    _check("kv_scatter", store, rows, values)
    chosen = pick(SCATTER_SPEC, backend, store, rows, values)
    if chosen is Backend.TRITON:
        _launch(store, rows, values, scatter=True)
    else:
        kv_scatter_ref(store, rows, values)
    _record(SCATTER_SPEC, chosen, record)


def kv_gather(
    store: torch.Tensor,
    rows: torch.Tensor,
    backend: str | Backend = "auto",
    record: MutableMapping[str, str] | None = None,
) -> torch.Tensor:
    """Return ``out[b, :, j, :] = store[b, :, rows[b, j], :]``, a new contiguous tensor.

    Args:
        store: ``[B, H, L, hd]`` (float32, float16 or bfloat16 for the Triton kernel; any
            strides).
        rows: ``[B, n]`` int64 positions in ``[0, L)`` (repeats allowed).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``; see :mod:`diffcache.kernels`.
        record: Where to write ``record[op] = "torch" | "triton"``, the backend that ran.

    Returns:
        ``[B, H, n, hd]`` in the store's dtype, on its device.

    Raises:
        ValueError: Shapes or dtypes do not fit.
        KernelUnavailableError: ``backend="triton"`` cannot run on these inputs.
    """
    _check("kv_gather", store, rows)
    chosen = pick(GATHER_SPEC, backend, store, rows)
    if chosen is Backend.TRITON:
        b, h, _, hd = store.shape
        out = torch.empty((b, h, rows.shape[1], hd), dtype=store.dtype, device=store.device)
        _launch(store, rows, out, scatter=False)
    else:
        out = kv_gather_ref(store, rows)
    _record(GATHER_SPEC, chosen, record)
    return out
