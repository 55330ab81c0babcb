"""rectified_residual: the torch reference by hand, and the Triton kernel under the interpreter
on cpu against it (every channel position, odd sizes, fp16)."""

from __future__ import annotations

import pytest
import torch

from diffcache.kernels import (
    _dispatch,
    add_residual_ref,
    last_backend,
    rectified_residual,
    rectified_residual_ref,
)

needs_interpreter = pytest.mark.skipif(
    _dispatch.triton_status() != [] or not _dispatch._interpret_enabled(),
    reason="needs triton importable and TRITON_INTERPRET=1 at import (tests/conftest.py sets it)",
)


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
    got = rectified_residual(x, r, scale, shift, dim, backend="triton")
    assert last_backend["rectified_residual"] == "triton" and got.dtype == dtype
    want = rectified_residual_ref(x, r, scale, shift, dim)
    tol = 1e-6 if dtype is torch.float32 else 1e-3  # a GPU may fuse the multiply-add
    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
