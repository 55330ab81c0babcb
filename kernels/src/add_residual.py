"""Fused "input + cached residual" apply.

Block-caching methods store ``residual = block(x) - x`` (usually float32) and on a skipped step
return ``x + residual`` in the activation dtype. The kernel reads both once, adds in float32
and writes the result in the output dtype, with no float32 temporaries.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch

from ._dispatch import FLOATS, Backend, OpSpec, _record, pick, register_op, tl, triton

SPEC = register_op(
    OpSpec(
        name="add_residual",
        description="x + cached residual, float32 add, cast to the output dtype",
        dtypes=FLOATS,
    )
)

_BLOCK = 1024


def _check_shapes(x: torch.Tensor, r: torch.Tensor) -> None:
    if x.shape != r.shape:
        raise ValueError(
            f"add_residual: x and r must have the same shape, got {tuple(x.shape)} and "
            f"{tuple(r.shape)}; the cached residual must come from the same block and call"
        )


def add_residual_ref(
    x: torch.Tensor, r: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Torch reference: ``x + r`` computed in float32, cast to ``out_dtype``.

    Args:
        x: Block input (any float dtype).
        r: Cached residual, same shape as ``x`` (usually float32).
        out_dtype: Result dtype; defaults to ``x.dtype``.

    Returns:
        A new tensor of ``x``'s shape.

    Raises:
        ValueError: The shapes differ.
    """
    _check_shapes(x, r)
    return (x.float() + r.float()).to(out_dtype or x.dtype)


if triton is not None:

    @triton.jit
    def _add_residual_kernel(x_ptr, r_ptr, out_ptr, n, BLOCK: tl.constexpr):
        """out = cast(float(x) + float(r)) over one tile per program."""
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = x + r
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _add_residual_triton(
    x: torch.Tensor, r: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Run the Triton kernel; the result is contiguous with ``x``'s shape."""
    _check_shapes(x, r)
    out = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    n = x.numel()
    if n == 0:
        return out
    x_flat = x.reshape(-1)
    r_flat = r.reshape(-1)
    if not x_flat.is_contiguous():  # reshape of a 0-stride view can stay non-contiguous
        x_flat = x_flat.contiguous()
    if not r_flat.is_contiguous():
        r_flat = r_flat.contiguous()
    _add_residual_kernel[(triton.cdiv(n, _BLOCK),)](x_flat, r_flat, out, n, BLOCK=_BLOCK)
    return out


def add_residual(
    x: torch.Tensor,
    r: torch.Tensor,
    out_dtype: torch.dtype | None = None,
    backend: str | Backend = "auto",
    record: MutableMapping[str, str] | None = None,
) -> torch.Tensor:
    """Return ``x + r`` added in float32 and cast to ``out_dtype`` (default ``x.dtype``).

    Args:
        x: Block input (float32, float16 or bfloat16 for the Triton kernel).
        r: Cached residual, same shape and device as ``x``.
        out_dtype: Result dtype; defaults to ``x.dtype``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``; see :mod:`diffcache.kernels`.
        record: Where to write ``record[op] = "torch" | "triton"``, the backend that ran.

    Returns:
        A new tensor of ``x``'s shape.

    Raises:
        ValueError: The shapes differ.
        KernelUnavailableError: ``backend="triton"`` cannot run on these inputs.
    """
    _check_shapes(x, r)
    dtype = out_dtype or x.dtype
    extra = SPEC.out_dtype_reasons(dtype, x.device)
    chosen = pick(SPEC, backend, x, r, extra_reasons=extra)
    if chosen is Backend.TRITON:
        out = _add_residual_triton(x, r, dtype)
    else:
        out = add_residual_ref(x, r, dtype)
    _record(SPEC, chosen, record)
    return out
