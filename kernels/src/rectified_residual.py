"""Fused rectified residual apply: ``(x + r) * scale[c] + shift[c]``.

ERTACache answers a reused step with the cached model residual ``r`` added to the current input
and rectified by a per-channel affine correction (``scale = 1 - a``, ``shift = -b`` of the fitted
error ``a * (x + r) + b``). The kernel reads ``x`` and ``r`` once, looks the channel's two
coefficients up and writes the output dtype, with no float32 temporaries.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping

import torch

from ._dispatch import FLOATS, Backend, OpSpec, _record, pick, register_op, tl, triton

SPEC = register_op(
    OpSpec(
        name="rectified_residual",
        description="(x + cached residual) * scale[channel] + shift[channel], fused",
        dtypes=FLOATS,
    )
)

_BLOCK = 1024


def _check(x: torch.Tensor, r: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dim: int):
    if x.shape != r.shape:
        raise ValueError(
            f"rectified_residual: x and r must have the same shape, got {tuple(x.shape)} and "
            f"{tuple(r.shape)}"
        )
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"rectified_residual: channel_dim {dim} is out of range for {x.dim()}-D x")
    c = x.shape[dim]
    if scale.shape != (c,) or shift.shape != (c,):
        raise ValueError(
            f"rectified_residual: scale and shift must have one value per channel ({c},), got "
            f"{tuple(scale.shape)} and {tuple(shift.shape)}"
        )


def rectified_residual_ref(
    x: torch.Tensor,
    r: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    channel_dim: int = 1,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Torch reference: ``(x + r) * scale + shift`` in float32, ``scale`` and ``shift`` broadcast
    along ``channel_dim``, cast to ``out_dtype`` (default ``x.dtype``)."""
    _check(x, r, scale, shift, channel_dim)
    return _rectified_torch(x, r, scale, shift, channel_dim, out_dtype or x.dtype)


def _rectified_torch(
    x: torch.Tensor,
    r: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    channel_dim: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """:func:`rectified_residual_ref`'s arithmetic on checked inputs (the op checks them once)."""
    view = [1] * x.dim()
    view[channel_dim] = -1
    y = (x.float() + r.float()) * scale.float().view(view) + shift.float().view(view)
    return y.to(out_dtype)


if triton is not None:

    @triton.jit
    def _rectified_kernel(
        x_ptr, r_ptr, scale_ptr, shift_ptr, out_ptr, n, inner, channels, BLOCK: tl.constexpr
    ):
        """One tile per program; the channel of flat index i is (i // inner) % channels."""
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        c = (offs // inner) % channels
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(scale_ptr + c, mask=mask, other=1.0).to(tl.float32)
        b = tl.load(shift_ptr + c, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, ((x + r) * a + b).to(out_ptr.dtype.element_ty), mask=mask)


def _rectified_triton(
    x: torch.Tensor,
    r: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    channel_dim: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    n = x.numel()
    if n == 0:
        return out
    dim = channel_dim % x.dim()
    inner = math.prod(x.shape[dim + 1 :])
    x, r = x.contiguous(), r.contiguous()
    scale, shift = scale.float().contiguous(), shift.float().contiguous()
    grid = (triton.cdiv(n, _BLOCK),)
    _rectified_kernel[grid](x, r, scale, shift, out, n, inner, x.shape[dim], BLOCK=_BLOCK)
    return out


def rectified_residual(
    x: torch.Tensor,
    r: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    channel_dim: int = 1,
    out_dtype: torch.dtype | None = None,
    backend: str | Backend = "auto",
    record: MutableMapping[str, str] | None = None,
) -> torch.Tensor:
    """Return ``(x + r) * scale + shift`` (per channel along ``channel_dim``) computed in
    float32 and cast to ``out_dtype`` (default ``x.dtype``).

    Args:
        x: Current input (float32, float16 or bfloat16 for the Triton kernel).
        r: Cached residual, same shape and device as ``x``.
        scale: One multiplier per channel, shape ``(x.shape[channel_dim],)``.
        shift: One offset per channel, same shape as ``scale``.
        channel_dim: The channel axis of ``x``.
        out_dtype: Result dtype; defaults to ``x.dtype``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``; see :mod:`diffcache.kernels`.
        record: Where to write ``record[op] = "torch" | "triton"``, the backend that ran.

    Raises:
        ValueError: Shapes do not fit.
        KernelUnavailableError: ``backend="triton"`` cannot run on these inputs.
    """
    _check(x, r, scale, shift, channel_dim)
    dtype = out_dtype or x.dtype
    extra = SPEC.out_dtype_reasons(dtype, x.device)
    chosen = pick(SPEC, backend, x, r, scale, shift, extra_reasons=extra)
    if chosen is Backend.TRITON:
        out = _rectified_triton(x, r, scale, shift, channel_dim, dtype)
    else:
        out = _rectified_torch(x, r, scale, shift, channel_dim, dtype)
    _record(SPEC, chosen, record)
    return out
