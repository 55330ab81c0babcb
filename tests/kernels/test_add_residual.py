"""add_residual: the torch reference, and the Triton kernel under the interpreter on cpu."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
import torch

from diffcache.kernels import (
    KernelUnavailableError,
    add_residual,
    add_residual_ref,
)
from diffcache.testing.kernels import needs_interpreter

# The package attribute `add_residual` is the function; the module lives in sys.modules.
add_mod = importlib.import_module("diffcache.kernels.add_residual")


X_DTYPES = [pytest.param(torch.float32, id="x_fp32"), pytest.param(torch.float16, id="x_fp16")]
R_DTYPES = [pytest.param(torch.float32, id="r_fp32"), pytest.param(torch.float16, id="r_fp16")]
SIZES = [pytest.param(n, id=f"n{n}") for n in (1, 17, 1000, 4097)]


def _pair(
    n: int, x_dtype: torch.dtype, r_dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g).to(x_dtype), torch.randn(n, generator=g).to(r_dtype)


def test_ref_hand_computed() -> None:
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16)
    r = torch.tensor([0.25, 2.0, -0.5])
    out = add_residual_ref(x, r)
    assert out.dtype == torch.bfloat16
    assert out.tolist() == [1.25, 0.0, 0.0]
    out32 = add_residual_ref(x, r, out_dtype=torch.float32)
    assert out32.dtype == torch.float32 and out32.tolist() == [1.25, 0.0, 0.0]


def test_ref_adds_in_float32() -> None:
    """fp16 + fp16 in fp16 would round twice; the reference rounds once, at the end."""
    x = torch.tensor([2048.0], dtype=torch.float16)
    r = torch.tensor([1.0], dtype=torch.float16)
    assert add_residual_ref(x, r, out_dtype=torch.float32).item() == 2049.0


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_shape_mismatch_raises_value_error(backend: str) -> None:
    with pytest.raises(ValueError, match=r"same shape.*\(2, 3\).*\(3, 2\)"):
        add_residual(torch.zeros(2, 3), torch.zeros(3, 2), backend=backend)


@needs_interpreter
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("r_dtype", R_DTYPES)
@pytest.mark.parametrize("x_dtype", X_DTYPES)
def test_triton_matches_ref(n: int, x_dtype: torch.dtype, r_dtype: torch.dtype) -> None:
    x, r = _pair(n, x_dtype, r_dtype)
    record: dict[str, str] = {}
    got = add_residual(x, r, backend="triton", record=record)
    assert record == {"add_residual": "triton"}
    assert got.dtype == x_dtype and got.shape == x.shape
    torch.testing.assert_close(got, add_residual_ref(x, r), rtol=0, atol=0)


@needs_interpreter
@pytest.mark.parametrize(
    "out_dtype",
    [pytest.param(torch.float32, id="out_fp32"), pytest.param(torch.float16, id="out_fp16")],
)
def test_triton_out_dtype(out_dtype: torch.dtype) -> None:
    x, r = _pair(1000, torch.float16, torch.float32, seed=1)
    got = add_residual(x, r, out_dtype=out_dtype, backend="triton")
    assert got.dtype == out_dtype
    torch.testing.assert_close(got, add_residual_ref(x, r, out_dtype), rtol=0, atol=0)


@needs_interpreter
def test_triton_non_contiguous() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(33, 40, generator=g).half().t()
    r = torch.randn(80, 33, generator=g)[::2]
    assert not x.is_contiguous() and not r.is_contiguous()
    got = add_residual(x, r, backend="triton")
    assert got.shape == x.shape
    torch.testing.assert_close(got, add_residual_ref(x, r), rtol=0, atol=0)


@needs_interpreter
def test_triton_empty() -> None:
    x = torch.empty(0, 3, dtype=torch.float16)
    out = add_residual(x, torch.empty(0, 3), backend="triton")
    assert out.shape == (0, 3) and out.dtype == torch.float16


def test_auto_on_cpu_uses_torch() -> None:
    x, r = _pair(17, torch.float16, torch.float32)
    record: dict[str, str] = {}
    out = add_residual(x, r, record=record)
    assert record == {"add_residual": "torch"}
    # the sum in float64, rounded once to x's dtype (fp16 + fp32 is exact in float64)
    assert out.dtype == torch.float16
    assert torch.equal(out, (x.double() + r.double()).half())


def test_bf16_cpu_explicit_triton_names_bf16() -> None:
    x, r = _pair(17, torch.bfloat16, torch.float32)
    with pytest.raises(KernelUnavailableError, match="bfloat16"):
        add_residual(x, r, backend="triton")


def test_bf16_out_dtype_cpu_explicit_triton_raises() -> None:
    x, r = _pair(17, torch.float32, torch.float32)
    with pytest.raises(KernelUnavailableError, match="out_dtype bfloat16"):
        add_residual(x, r, out_dtype=torch.bfloat16, backend="triton")


def test_unsupported_out_dtype_falls_back_on_auto() -> None:
    x, r = _pair(17, torch.float32, torch.float32)
    with pytest.raises(KernelUnavailableError, match="out_dtype float64"):
        add_residual(x, r, out_dtype=torch.float64, backend="triton")
    record: dict[str, str] = {}
    out = add_residual(x, r, out_dtype=torch.float64, record=record)
    assert out.dtype == torch.float64 and record == {"add_residual": "torch"}


@needs_interpreter
@pytest.mark.parametrize("broadcast", [0, 1], ids=["x", "r"])
def test_triton_zero_stride_input(broadcast: int) -> None:
    """An input that reshape leaves non-contiguous (a broadcast scalar) is copied first."""
    pair = [torch.randn(20, 50), torch.randn(20, 50)]
    pair[broadcast] = torch.tensor([[0.5]]).expand(20, 50)
    assert not pair[broadcast].reshape(-1).is_contiguous()
    got = add_residual(*pair, backend="triton")
    torch.testing.assert_close(got, pair[0] + pair[1])


@needs_interpreter
@pytest.mark.parametrize("backend,kernel_calls", [("triton", 1), ("torch", 0), ("auto", 0)])
def test_backend_runs_its_implementation(
    spy_kernel: Callable, backend: str, kernel_calls: int
) -> None:
    """The chosen backend is the one that runs (on CPU, auto is torch)."""
    calls = spy_kernel(add_mod, "_add_residual_triton")
    add_residual(*_pair(17, torch.float32, torch.float32), backend=backend)
    assert len(calls) == kernel_calls


@pytest.mark.parametrize("bf16_input", [0, 1], ids=["x", "r"])
def test_explicit_triton_checks_both_inputs(bf16_input: int) -> None:
    pair = list(_pair(17, torch.float32, torch.float32))
    pair[bf16_input] = pair[bf16_input].bfloat16()
    with pytest.raises(KernelUnavailableError, match="bfloat16"):
        add_residual(*pair, out_dtype=torch.float32, backend="triton")
