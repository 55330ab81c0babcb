"""forecast: the torch reference by hand, and the Triton kernel under the interpreter on cpu
against it (1-4 history entries, odd sizes, fp16)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
import torch

from diffcache.kernels import (
    KernelUnavailableError,
    forecast,
    forecast_ref,
)
from diffcache.testing.kernels import needs_interpreter


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
    record: dict[str, str] = {}
    got = forecast(x, history, weights, backend="triton", record=record)
    assert record == {"forecast": "triton"} and got.dtype == dtype
    want = forecast_ref(x, history, weights)
    tol = 1e-5 if dtype is torch.float32 else 2e-3
    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)


forecast_mod = importlib.import_module("diffcache.kernels.forecast")
BACKENDS = ["torch", "auto", pytest.param("triton", marks=needs_interpreter)]


def _hand_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[float]]]:
    """x + sum_j w[j, d] * history[j, ..., d], written out: [1 + 1 + 1, 2 + 0.5 - 1]."""
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float16)
    history = torch.tensor([[[1.0, 1.0]], [[2.0, 4.0]]], dtype=torch.float16)
    weights = torch.tensor([[1.0, 0.5], [0.5, -0.25]])
    return x, history, weights, [[3.0, 1.5]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_hand_computed(backend: str) -> None:
    x, history, weights, want = _hand_case()
    out = forecast(x, history, weights, out_dtype=torch.float32, backend=backend)
    assert out.dtype == torch.float32 and out.tolist() == want
    out = forecast(x, history, weights, backend=backend)
    assert out.dtype == torch.float16 and out.tolist() == want


def test_ref_out_dtype() -> None:
    x, history, weights, want = _hand_case()
    assert forecast_ref(x, history, weights).dtype == torch.float16
    out = forecast_ref(x, history, weights, out_dtype=torch.float32)
    assert out.dtype == torch.float32 and out.tolist() == want


@needs_interpreter
def test_triton_single_element() -> None:
    out = forecast(
        torch.ones(1, 1), torch.full((1, 1, 1), 2.0), torch.full((1, 1), 3.0), backend="triton"
    )
    assert out.tolist() == [[7.0]]


@needs_interpreter
@pytest.mark.parametrize("backend,kernel_calls", [("triton", 1), ("torch", 0), ("auto", 0)])
def test_backend_runs_its_implementation(
    spy_kernel: Callable, backend: str, kernel_calls: int
) -> None:
    calls = spy_kernel(forecast_mod, "_forecast_triton")
    forecast(*_hand_case()[:3], backend=backend)
    assert len(calls) == kernel_calls


@pytest.mark.parametrize("bf16_input", [0, 1, 2], ids=["x", "history", "weights"])
def test_explicit_triton_checks_every_input(bf16_input: int) -> None:
    inputs = [t.float() for t in _hand_case()[:3]]
    inputs[bf16_input] = inputs[bf16_input].bfloat16()
    with pytest.raises(KernelUnavailableError, match="bfloat16"):
        forecast(*inputs, out_dtype=torch.float32, backend="triton")


def test_default_backend_is_auto() -> None:
    x, history, weights, want = _hand_case()
    record: dict[str, str] = {}
    assert forecast(x, history, weights, record=record).tolist() == want
    assert record == {"forecast": "torch"}


def test_explicit_triton_checks_the_out_dtype() -> None:
    with pytest.raises(KernelUnavailableError, match="out_dtype bfloat16"):
        forecast(*_hand_case()[:3], out_dtype=torch.bfloat16, backend="triton")
