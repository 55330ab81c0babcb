"""Fused gated module-output apply: ``x + g_1 * v_1 + g_2 * v_2 + ...`` in one pass.

A DiT block adds each module's output to its input through an AdaLN gate (``x + gate * attn``,
then ``+ gate * ff``; Wan's cross-attention is added ungated). When every module of a block
reuses its cached output, the block's result is exactly that sum, so the block can be skipped:
the kernel reads the input, each cached output and each gate once and writes the result, instead
of the block's layer norms, modulations and separate multiply-adds.

The terms are added in the order given, each product and sum in float32, and the result is cast
to the output dtype once. For float32 blocks that is the block's own arithmetic, bit for bit
(the Triton kernel is compiled without multiply-add fusion); a half-precision block rounds after
each residual add, so there the fused result is the same sum with fewer roundings.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence

import torch

from ._dispatch import FLOATS, Backend, OpSpec, _record, pick, register_op, tl, triton

SPEC = register_op(
    OpSpec(
        name="gated_apply",
        description="x + gate_1 * cached_1 + gate_2 * cached_2 + ... (AdaLN block skip), fused",
        dtypes=FLOATS,
    )
)

_BLOCK = 1024
MAX_TERMS = 4


def _check(
    x: torch.Tensor, values: Sequence[torch.Tensor], gates: Sequence[torch.Tensor | None]
) -> None:
    if len(values) != len(gates) or not 1 <= len(values) <= MAX_TERMS:
        raise ValueError(
            f"gated_apply: 1 to {MAX_TERMS} terms with one gate (or None) each, got "
            f"{len(values)} values and {len(gates)} gates"
        )
    for i, (v, g) in enumerate(zip(values, gates, strict=True)):
        if v.shape != x.shape:
            raise ValueError(
                f"gated_apply: value {i} has shape {tuple(v.shape)}, x has {tuple(x.shape)}"
            )
        if g is not None:
            try:
                fits = torch.broadcast_shapes(g.shape, x.shape) == x.shape
            except RuntimeError:
                fits = False
            if not fits:
                raise ValueError(
                    f"gated_apply: gate {i} of shape {tuple(g.shape)} does not broadcast to x "
                    f"{tuple(x.shape)}"
                )


def gated_apply_ref(
    x: torch.Tensor,
    values: Sequence[torch.Tensor],
    gates: Sequence[torch.Tensor | None],
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Torch reference: ``acc = x``, then ``acc = acc + gate * value`` (``+ value`` where the gate
    is None) term by term, in float32, cast to ``out_dtype`` (default ``x.dtype``)."""
    _check(x, values, gates)
    acc = x.float()
    for v, g in zip(values, gates, strict=True):
        acc = acc + (v.float() if g is None else v.float() * g.float())
    return acc.to(out_dtype or x.dtype)


if triton is not None:

    @triton.jit
    def _offset(strides_ptr, which: tl.constexpr, b, n, d):
        """Element offset of (b, n, d) in operand ``which`` (row ``which`` of the stride table)."""
        sb = tl.load(strides_ptr + 3 * which)
        sn = tl.load(strides_ptr + 3 * which + 1)
        sd = tl.load(strides_ptr + 3 * which + 2)
        return b * sb + n * sn + d * sd

    @triton.jit
    def _term(acc, v_ptr, g_ptr, strides_ptr, i: tl.constexpr, gated: tl.constexpr, b, n, d, mask):
        v = tl.load(v_ptr + _offset(strides_ptr, 1 + i, b, n, d), mask=mask, other=0.0)
        v = v.to(tl.float32)
        if gated:
            g = tl.load(g_ptr + _offset(strides_ptr, 5 + i, b, n, d), mask=mask, other=0.0)
            v = v * g.to(tl.float32)
        return acc + v

    @triton.jit
    def _gated_apply_kernel(
        out_ptr, x_ptr, v0, v1, v2, v3, g0, g1, g2, g3, strides_ptr, total, rows, dims,
        TERMS: tl.constexpr, GATED: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """One tile of the (B, N, D) output per program; operand strides from the table (x,
        values 0-3, gates 0-3; a broadcast gate has stride 0); bit i of GATED: term i is gated."""
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        d = offs % dims
        n = (offs // dims) % rows
        b = offs // (dims * rows)
        acc = tl.load(x_ptr + _offset(strides_ptr, 0, b, n, d), mask=mask, other=0.0)
        acc = acc.to(tl.float32)
        acc = _term(acc, v0, g0, strides_ptr, 0, GATED & 1, b, n, d, mask)
        if TERMS > 1:
            acc = _term(acc, v1, g1, strides_ptr, 1, GATED & 2, b, n, d, mask)
        if TERMS > 2:
            acc = _term(acc, v2, g2, strides_ptr, 2, GATED & 4, b, n, d, mask)
        if TERMS > 3:
            acc = _term(acc, v3, g3, strides_ptr, 3, GATED & 8, b, n, d, mask)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _as3d(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``t`` broadcast to ``shape`` (at most 3 dims) as a (B, N, D) view, no copy."""
    t = t.expand(shape)
    while t.dim() < 3:
        t = t.unsqueeze(0)
    return t


def _gated_apply_triton(
    x: torch.Tensor,
    values: Sequence[torch.Tensor],
    gates: Sequence[torch.Tensor | None],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    total = x.numel()
    if total == 0:
        return out
    shape = x.shape
    ops = [_as3d(x, shape), *(_as3d(v, shape) for v in values)]
    gated = [_as3d(g, shape) if g is not None else None for g in gates]
    table = torch.zeros(9, 3, dtype=torch.int64)
    for row, t in enumerate(ops):
        table[row] = torch.tensor(t.stride())
    for i, g in enumerate(gated):
        if g is not None:
            table[5 + i] = torch.tensor(g.stride())
    table = table.to(x.device)
    b, rows, dims = ops[0].shape
    vals = [*ops[1:], *[x] * (MAX_TERMS - len(values))]  # unused pointers: any valid tensor
    gs = [g if g is not None else x for g in gated] + [x] * (MAX_TERMS - len(gates))
    mask = sum(1 << i for i, g in enumerate(gated) if g is not None)
    grid = (triton.cdiv(total, _BLOCK),)
    _gated_apply_kernel[grid](
        out, ops[0], *vals, *gs, table, total, rows, dims,
        TERMS=len(values), GATED=mask, BLOCK=_BLOCK, enable_fp_fusion=False,
    )  # fmt: skip
    return out


def gated_apply(
    x: torch.Tensor,
    values: Sequence[torch.Tensor],
    gates: Sequence[torch.Tensor | None],
    out_dtype: torch.dtype | None = None,
    backend: str | Backend = "auto",
    record: MutableMapping[str, str] | None = None,
) -> torch.Tensor:
    """Return ``x + gates[0] * values[0] + gates[1] * values[1] + ...`` (a None gate adds its
    value as is), added term by term in float32 and cast to ``out_dtype`` (default ``x.dtype``).

    Args:
        x: The block input (float32, float16 or bfloat16 for the Triton kernel; at most 3
            dims there, e.g. ``(B, N, D)``).
        values: Cached module outputs, each of ``x``'s shape (views with any strides, such as a
            slice of a shared output, are read in place).
        gates: One per value: a tensor broadcasting to ``x`` (``(B, 1, D)``, ``(B, N, D)``), or
            None for an ungated term.
        out_dtype: Result dtype; defaults to ``x.dtype``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``; see :mod:`diffcache.kernels`.
        record: Where to write ``record[op] = "torch" | "triton"``, the backend that ran.

    Raises:
        ValueError: Shapes do not fit, or not 1 to 4 terms.
        KernelUnavailableError: ``backend="triton"`` cannot run on these inputs.
    """
    _check(x, values, gates)
    dtype = out_dtype or x.dtype
    extra = SPEC.out_dtype_reasons(dtype, x.device)
    if x.dim() > 3:
        extra = [*extra, f"x has {x.dim()} dims; the kernel takes at most 3 (B, N, D)"]
    tensors = [x, *values, *(g for g in gates if g is not None)]
    chosen = pick(SPEC, backend, *tensors, extra_reasons=extra)
    if chosen is Backend.TRITON:
        out = _gated_apply_triton(x, values, gates, dtype)
    else:
        out = gated_apply_ref(x, values, gates, dtype)
    _record(SPEC, chosen, record)
    return out
