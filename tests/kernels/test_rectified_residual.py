"""rectified_residual: the torch reference by hand, and the Triton kernel under the interpreter
on cpu against it (every channel position, odd sizes, fp16)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
import torch

from diffcache.kernels import (
    KernelUnavailableError,
    add_residual_ref,
    rectified_residual,
    rectified_residual_ref,
)
from diffcache.testing.kernels import needs_interpreter


def test_ref_hand_computed() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # channels on dim 0
    r = torch.tensor([[0.5, 0.5], [-1.0, 0.0]])
    out = rectified_residual_ref(x, r, torch.tensor([2.0, 0.5]), torch.tensor([0.0, 1.0]), 0)
    assert out.tolist() == [[3.0, 5.0], [2.0, 3.0]]


def test_unit_scale_and_zero_shift_is_the_plain_residual_add() -> None:
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(2, 4, 3, 5, generator=g), torch.randn(2, 4, 3, 5, generator=g)
    out = rectified_residual(x, r, torch.ones(4), torch.zeros(4), 1, backend="torch")
    assert torch.equal(out, add_residual_ref(x, r))


def test_bad_shapes_are_refused() -> None:
    x = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="one value per channel"):
        rectified_residual(x, x, torch.ones(4), torch.zeros(4), 1)
    with pytest.raises(ValueError, match="same shape"):
        rectified_residual(x, x[:1], torch.ones(3), torch.zeros(3), 1)


@needs_interpreter
@pytest.mark.parametrize("dim", [0, 1, 2, -1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_the_reference(dim: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    shape = (3, 5, 7, 11)
    x = torch.randn(shape, generator=g).to(dtype)
    r = torch.randn(shape, generator=g)
    c = shape[dim]
    scale, shift = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    record: dict[str, str] = {}
    got = rectified_residual(x, r, scale, shift, dim, backend="triton", record=record)
    assert record == {"rectified_residual": "triton"} and got.dtype == dtype
    want = rectified_residual_ref(x, r, scale, shift, dim)
    tol = 1e-6 if dtype is torch.float32 else 1e-3  # a GPU may fuse the multiply-add
    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)


rr_mod = importlib.import_module("diffcache.kernels.rectified_residual")
BACKENDS = ["torch", "auto", pytest.param("triton", marks=needs_interpreter)]


def _hand_case() -> tuple[torch.Tensor, ...]:
    """x [1, 2, 3] with channels on dim 1 (the default): (x + r) * scale[c] + shift[c]."""
    x = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]], dtype=torch.float16)
    r = torch.ones(1, 2, 3, dtype=torch.float16)
    return x, r, torch.tensor([2.0, -1.0]), torch.tensor([0.5, 10.0])


WANT = [[[4.5, 6.5, 8.5], [5.0, 4.0, 3.0]]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_hand_computed_default_channel_dim(backend: str) -> None:
    out = rectified_residual(*_hand_case(), out_dtype=torch.float32, backend=backend)
    assert out.dtype == torch.float32 and out.tolist() == WANT
    out = rectified_residual(*_hand_case(), backend=backend)
    assert out.dtype == torch.float16 and out.tolist() == WANT


def test_ref_default_channel_dim_and_out_dtype() -> None:
    assert rectified_residual_ref(*_hand_case()).dtype == torch.float16
    out = rectified_residual_ref(*_hand_case(), out_dtype=torch.float32)
    assert out.dtype == torch.float32 and out.tolist() == WANT
    # the first axis counted from the end is the same axis
    assert rectified_residual_ref(*_hand_case(), channel_dim=-2).tolist() == WANT


def test_channel_dim_range() -> None:
    x, r, scale, shift = _hand_case()
    with pytest.raises(
        ValueError, match="^rectified_residual: channel_dim 3 is out of range for 3-D x$"
    ):
        rectified_residual(x, r, scale, shift, channel_dim=3)
    x0 = x[0, 0]  # 1-D: -1 is its only channel axis, -1 = -x.dim()
    out = rectified_residual(x0, r[0, 0], torch.full((3,), 2.0), torch.zeros(3), channel_dim=-1)
    assert out.tolist() == [4.0, 6.0, 8.0]


@pytest.mark.parametrize("bad", ["scale", "shift"])
def test_either_per_channel_vector_is_checked(bad: str) -> None:
    x, r, scale, shift = _hand_case()
    if bad == "scale":
        scale = torch.ones(3)
    else:
        shift = torch.ones(3)
    with pytest.raises(ValueError, match="one value per channel"):
        rectified_residual(x, r, scale, shift)


@needs_interpreter
def test_triton_single_element() -> None:
    one = torch.ones(1, 1)
    out = rectified_residual(one, one, torch.full((1,), 3.0), torch.ones(1), backend="triton")
    assert out.tolist() == [[7.0]]


@needs_interpreter
@pytest.mark.parametrize("backend,kernel_calls", [("triton", 1), ("torch", 0), ("auto", 0)])
def test_backend_runs_its_implementation(
    spy_kernel: Callable, backend: str, kernel_calls: int
) -> None:
    calls = spy_kernel(rr_mod, "_rectified_triton")
    rectified_residual(*_hand_case(), backend=backend)
    assert len(calls) == kernel_calls


@pytest.mark.parametrize("bf16_input", [0, 1, 2, 3], ids=["x", "r", "scale", "shift"])
def test_explicit_triton_checks_every_input(bf16_input: int) -> None:
    inputs = [t.float() for t in _hand_case()]
    inputs[bf16_input] = inputs[bf16_input].bfloat16()
    with pytest.raises(KernelUnavailableError, match="bfloat16"):
        rectified_residual(*inputs, out_dtype=torch.float32, backend="triton")


def test_default_backend_is_auto() -> None:
    record: dict[str, str] = {}
    assert rectified_residual(*_hand_case(), record=record).tolist() == WANT
    assert record == {"rectified_residual": "torch"}


def test_explicit_triton_checks_the_out_dtype() -> None:
    with pytest.raises(KernelUnavailableError, match="out_dtype bfloat16"):
        rectified_residual(*_hand_case(), out_dtype=torch.bfloat16, backend="triton")
