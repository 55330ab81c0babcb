"""Fused per-dimension forecast: ``x + sum_j w[j, d] * history[j, ..., d]``.

HyCa forecasts a block's residual on skipped steps, each hidden dimension ``d`` (the last axis)
with the solver of its cluster: a fixed set of weights over the cached residual history. The
kernel reads the input and every history entry once and writes ``x`` plus the forecast in the
output dtype, with no float32 temporaries.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch

from ._dispatch import FLOATS, Backend, OpSpec, _record, pick, register_op, tl, triton

SPEC = register_op(
    OpSpec(
        name="forecast",
        description="x + per-dimension weighted sum of cached residual history (HyCa)",
        dtypes=FLOATS,
    )
)

_BLOCK = 1024
MAX_HISTORY = 4


def _check(x: torch.Tensor, history: torch.Tensor, weights: torch.Tensor) -> None:
    if history.dim() != x.dim() + 1 or history.shape[1:] != x.shape:
        raise ValueError(
            f"forecast: history must be (H, *x.shape), got {tuple(history.shape)} for x "
            f"{tuple(x.shape)}"
        )
    h, d = history.shape[0], x.shape[-1]
    if weights.shape != (h, d) or not 1 <= h <= MAX_HISTORY:
        raise ValueError(
            f"forecast: weights must be (H, D) = ({h}, {d}) with 1 <= H <= {MAX_HISTORY}, got "
            f"{tuple(weights.shape)}"
        )


def forecast_ref(
    x: torch.Tensor,
    history: torch.Tensor,
    weights: torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Torch reference: ``x + (weights[:, None..., :] * history).sum(0)`` in float32."""
    _check(x, history, weights)
    return _forecast_torch(x, history, weights, out_dtype or x.dtype)


def _float(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype is torch.float32 else t.float()


def _forecast_torch(
    x: torch.Tensor, history: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """:func:`forecast_ref`'s arithmetic on checked inputs, casting only what is not float32
    already (the per-call cost of a forecast on small blocks is mostly these calls)."""
    w = _float(weights).view(weights.shape[0], *([1] * (x.dim() - 1)), x.shape[-1])
    out = _float(x) + (w * _float(history)).sum(0)
    return out if out.dtype is out_dtype else out.to(out_dtype)


if triton is not None:

    @triton.jit
    def _forecast_kernel(x_ptr, h_ptr, w_ptr, out_ptr, n, d, H: tl.constexpr, BLOCK: tl.constexpr):
        """One tile per program; dimension of flat index i is i % d; H history entries."""
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dim = offs % d
        acc = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        for j in tl.static_range(H):
            w = tl.load(w_ptr + j * d + dim, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(h_ptr + j * n + offs, mask=mask, other=0.0).to(tl.float32)
            acc += w * v
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _forecast_triton(
    x: torch.Tensor, history: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    n = x.numel()
    if n == 0:
        return out
    x, history = x.contiguous(), history.contiguous()
    weights = weights.float().contiguous()
    h = history.shape[0]
    grid = (triton.cdiv(n, _BLOCK),)
    _forecast_kernel[grid](x, history, weights, out, n, x.shape[-1], H=h, BLOCK=_BLOCK)
    return out


def forecast(
    x: torch.Tensor,
    history: torch.Tensor,
    weights: torch.Tensor,
    out_dtype: torch.dtype | None = None,
    backend: str | Backend = "auto",
    record: MutableMapping[str, str] | None = None,
) -> torch.Tensor:
    """Return ``x + sum_j weights[j, d] * history[j, ..., d]`` (``d`` the last axis), summed in
    float32 and cast to ``out_dtype`` (default ``x.dtype``).

    Args:
        x: Block input (float32, float16 or bfloat16 for the Triton kernel).
        history: Cached residuals, ``(H, *x.shape)``, H <= 4.
        weights: ``(H, D)``: each dimension's weights over the history.
        out_dtype: Result dtype; defaults to ``x.dtype``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``; see :mod:`diffcache.kernels`.
        record: Where to write ``record[op] = "torch" | "triton"``, the backend that ran.

    Raises:
        ValueError: Shapes do not fit.
        KernelUnavailableError: ``backend="triton"`` cannot run on these inputs.
    """
    _check(x, history, weights)
    dtype = out_dtype or x.dtype
    extra = SPEC.out_dtype_reasons(dtype, x.device)
    chosen = pick(SPEC, backend, x, history, weights, extra_reasons=extra)
    if chosen is Backend.TRITON:
        out = _forecast_triton(x, history, weights, dtype)
    else:
        out = _forecast_torch(x, history, weights, dtype)
    _record(SPEC, chosen, record)
    return out
