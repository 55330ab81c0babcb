"""Fused relative-L1 / change-rate reduction.

Step-caching methods (EasyCache and kin) decide whether to reuse a cached step from
``mean|x_i - x_{i-1}|`` and ``mean|x|``. This op reads both tensors once and returns the three
means together, accumulated in float32.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping

import torch

from ._dispatch import FLOATS, Backend, OpSpec, _record, pick, register_op, tl, triton

SPEC = register_op(
    OpSpec(
        name="l1_change",
        description="(mean|a-b|, mean|a|, mean|b|) in one pass, float32 accumulation",
        dtypes=FLOATS,
    )
)

_BLOCK = 1024
# Fixed cap on programs, independent of the GPU, so the summation order (and the result)
# depends only on the input size.
_MAX_PROGRAMS = 1024


def _check_shapes(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"l1_change: a and b must have the same shape, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}; pass the current and previous tensors of one step"
        )


def l1_change_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Torch reference: the three means of the change between ``a`` and ``b``.

    Args:
        a: Current tensor, any float dtype.
        b: Previous tensor, same shape as ``a``.

    Returns:
        Float32 tensor of shape (3,): ``(mean|a-b|, mean|a|, mean|b|)``, on ``a``'s device.

    Raises:
        ValueError: The shapes differ.
    """
    _check_shapes(a, b)
    a32 = a.float()
    b32 = b.float()
    # one stacked |.| and one mean: few ops, which is what counts for the small tensors on CPU
    return torch.stack((a32 - b32, a32, b32)).abs_().view(3, a32.numel()).mean(1)


if triton is not None:

    @triton.jit
    def _l1_change_kernel(
        a_ptr,
        b_ptr,
        partials_ptr,
        n,
        tiles_per_program,
        BLOCK: tl.constexpr,
    ):
        """Each program sums |a-b|, |a|, |b| over its contiguous run of tiles."""
        pid = tl.program_id(0).to(tl.int64)
        lanes = tl.arange(0, BLOCK)
        acc_d = tl.zeros([BLOCK], dtype=tl.float32)
        acc_a = tl.zeros([BLOCK], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK], dtype=tl.float32)
        first = pid * tiles_per_program * BLOCK
        for i in range(0, tiles_per_program):
            offs = first + i * BLOCK + lanes
            mask = offs < n
            a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            acc_d += tl.abs(a - b)
            acc_a += tl.abs(a)
            acc_b += tl.abs(b)
        out = partials_ptr + pid * 3
        tl.store(out, tl.sum(acc_d, axis=0))
        tl.store(out + 1, tl.sum(acc_a, axis=0))
        tl.store(out + 2, tl.sum(acc_b, axis=0))


def _l1_change_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Run the Triton kernel: per-program partial sums, then a fixed-order torch sum."""
    _check_shapes(a, b)
    n = a.numel()
    if n == 0:
        return torch.full((3,), math.nan, dtype=torch.float32, device=a.device)
    a_flat = a.reshape(-1)
    b_flat = b.reshape(-1)
    if not a_flat.is_contiguous():  # reshape of a 0-stride view can stay non-contiguous
        a_flat = a_flat.contiguous()
    if not b_flat.is_contiguous():
        b_flat = b_flat.contiguous()
    tiles = triton.cdiv(n, _BLOCK)
    programs = min(tiles, _MAX_PROGRAMS)
    tiles_per_program = triton.cdiv(tiles, programs)
    programs = triton.cdiv(tiles, tiles_per_program)
    partials = torch.empty((programs, 3), dtype=torch.float32, device=a.device)
    _l1_change_kernel[(programs,)](a_flat, b_flat, partials, n, tiles_per_program, BLOCK=_BLOCK)
    return partials.sum(dim=0) / n


def l1_change(
    a: torch.Tensor,
    b: torch.Tensor,
    backend: str | Backend = "auto",
    record: MutableMapping[str, str] | None = None,
) -> torch.Tensor:
    """Return ``(mean|a-b|, mean|a|, mean|b|)`` as a float32 tensor of shape (3,).

    Args:
        a: Current tensor (float32, float16 or bfloat16 for the Triton kernel).
        b: Previous tensor, same shape, dtype and device as ``a``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``; see :mod:`diffcache.kernels`.
        record: Where to write ``record[op] = "torch" | "triton"``, the backend that ran.

    Returns:
        Float32 tensor of shape (3,) on ``a``'s device.

    Raises:
        ValueError: The shapes differ.
        KernelUnavailableError: ``backend="triton"`` cannot run on these inputs.
    """
    _check_shapes(a, b)
    chosen = pick(SPEC, backend, a, b)
    out = _l1_change_triton(a, b) if chosen is Backend.TRITON else l1_change_ref(a, b)
    _record(SPEC, chosen, record)
    return out
