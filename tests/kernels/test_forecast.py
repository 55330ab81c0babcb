"""forecast: the torch reference by hand, and the Triton kernel under the interpreter on cpu
against it (1-4 history entries, odd sizes, fp16)."""

from __future__ import annotations

import pytest
import torch

from diffcache.kernels import _dispatch, forecast, forecast_ref, last_backend

needs_interpreter = pytest.mark.skipif(
    _dispatch.triton_status() != [] or not _dispatch._interpret_enabled(),
    reason="needs triton importable and TRITON_INTERPRET=1 at import (tests/conftest.py sets it)",
)


def test_ref_hand_computed() -> None:
    x = torch.tensor([[1.0, 2.0]])
    history = torch.tensor([[[1.0, 1.0]], [[3.0, 5.0]]])  # (H=2, 1, D=2)
    weights = torch.tensor([[-1.0, 0.0], [2.0, 1.0]])  # dim 0: linear, dim 1: reuse
    assert forecast_ref(x, history, weights).tolist() == [[1.0 + 5.0, 2.0 + 5.0]]


def test_bad_shapes_are_refused() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="history must be"):
        forecast(x, torch.zeros(2, 3, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="weights must be"):
        forecast(x, torch.zeros(2, 2, 3), torch.zeros(2, 4))


@needs_interpreter
@pytest.mark.parametrize("h", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_the_reference(h: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(h)
    x = torch.randn(2, 37, 19, generator=g).to(dtype)
    history = torch.randn(h, 2, 37, 19, generator=g)
    weights = torch.randn(h, 19, generator=g)
    got = forecast(x, history, weights, backend="triton")
    assert last_backend["forecast"] == "triton" and got.dtype == dtype
    want = forecast_ref(x, history, weights)
    tol = 1e-5 if dtype is torch.float32 else 2e-3
    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
