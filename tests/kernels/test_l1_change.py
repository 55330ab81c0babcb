"""l1_change: the torch reference, and the Triton kernel under the interpreter on cpu."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import pytest
import torch

from diffcache.kernels import (
    KernelUnavailableError,
    l1_change,
    l1_change_ref,
)
from diffcache.testing.kernels import needs_interpreter

# The package attribute `l1_change` is the function; the module lives in sys.modules.
l1_mod = importlib.import_module("diffcache.kernels.l1_change")


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
SIZES = [pytest.param(n, id=f"n{n}") for n in (1, 17, 1000, 4097)]


def _pair(n: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g).to(dtype)
    b = (a.float() + 0.1 * torch.randn(n, generator=g)).to(dtype)
    return a, b


def _means(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(mean|a - b|, mean|a|, mean|b|) in float64, written out."""
    a, b = a.double(), b.double()
    return torch.stack([(a - b).abs().mean(), a.abs().mean(), b.abs().mean()])


def test_ref_hand_computed() -> None:
    a = torch.tensor([1.0, -2.0])
    b = torch.tensor([0.0, 2.0])
    out = l1_change_ref(a, b)
    assert out.dtype == torch.float32 and out.shape == (3,)
    assert out.tolist() == [2.5, 1.5, 1.0]


@pytest.mark.parametrize(
    "dtype",
    [
        pytest.param(torch.float16, id="fp16"),
        pytest.param(torch.bfloat16, id="bf16"),
        pytest.param(torch.float64, id="fp64"),
    ],
)
def test_ref_returns_float32_for_any_float(dtype: torch.dtype) -> None:
    a = torch.tensor([[1.0, -2.0]], dtype=dtype)
    b = torch.tensor([[0.0, 2.0]], dtype=dtype)
    out = l1_change_ref(a, b)
    assert out.dtype == torch.float32
    assert out.tolist() == [2.5, 1.5, 1.0]


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_shape_mismatch_raises_value_error(backend: str) -> None:
    with pytest.raises(ValueError, match=r"same shape.*\(2,\).*\(3,\)"):
        l1_change(torch.zeros(2), torch.zeros(3), backend=backend)
    with pytest.raises(ValueError, match="same shape"):
        l1_change_ref(torch.zeros(2, 3), torch.zeros(3, 2))


@needs_interpreter
def test_shape_mismatch_raises_value_error_triton() -> None:
    with pytest.raises(ValueError, match="same shape"):
        l1_change(torch.zeros(2), torch.zeros(3), backend="triton")


@needs_interpreter
def test_triton_hand_computed() -> None:
    record: dict[str, str] = {}
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([0.0, 2.0])
    out = l1_change(a, b, backend="triton", record=record)
    assert out.dtype == torch.float32 and out.shape == (3,)
    assert out.tolist() == [2.5, 1.5, 1.0]
    assert record == {"l1_change": "triton"}


@needs_interpreter
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_ref(n: int, dtype: torch.dtype) -> None:
    a, b = _pair(n, dtype)
    got = l1_change(a, b, backend="triton")
    torch.testing.assert_close(got, l1_change_ref(a, b), rtol=1e-5, atol=1e-7)


@needs_interpreter
@pytest.mark.parametrize(
    "layout",
    [pytest.param("transposed", id="transposed"), pytest.param("strided", id="strided")],
)
def test_triton_non_contiguous(layout: str) -> None:
    g = torch.Generator().manual_seed(1)
    if layout == "transposed":
        a = torch.randn(33, 40, generator=g).t()
        b = torch.randn(33, 40, generator=g).t()
    else:
        a = torch.randn(30, 64, generator=g)[:, ::2]
        b = torch.randn(30, 32, generator=g)
    assert not a.is_contiguous()
    got = l1_change(a, b, backend="triton")
    torch.testing.assert_close(got, l1_change_ref(a, b), rtol=1e-5, atol=1e-7)


@needs_interpreter
def test_triton_expanded_input() -> None:
    a = torch.randn(1, 50).expand(20, 50)
    b = torch.randn(20, 50)
    torch.testing.assert_close(
        l1_change(a, b, backend="triton"), l1_change_ref(a, b), rtol=1e-5, atol=1e-7
    )


@needs_interpreter
def test_triton_mixed_dtypes() -> None:
    a, b = _pair(300, torch.float32)
    a16 = a.half()
    torch.testing.assert_close(
        l1_change(a16, b, backend="triton"), l1_change_ref(a16, b), rtol=1e-5, atol=1e-7
    )


@needs_interpreter
@pytest.mark.parametrize("programs", [1, 2, 3], ids=lambda p: f"max{p}")
def test_triton_multi_tile_programs(monkeypatch: pytest.MonkeyPatch, programs: int) -> None:
    """Cap the program count so each program loops over several tiles and a ragged tail."""
    monkeypatch.setattr(l1_mod, "_MAX_PROGRAMS", programs)
    a, b = _pair(4097, torch.float32, seed=2)
    got = l1_change(a, b, backend="triton")
    torch.testing.assert_close(got, l1_change_ref(a, b), rtol=1e-5, atol=1e-7)


@needs_interpreter
def test_triton_deterministic() -> None:
    a, b = _pair(4097, torch.float16, seed=3)
    first = l1_change(a, b, backend="triton")
    assert torch.equal(first, l1_change(a, b, backend="triton"))


@needs_interpreter
def test_triton_empty_is_nan_like_ref() -> None:
    e = torch.empty(0, 4)
    assert all(math.isnan(v) for v in l1_change(e, e, backend="triton").tolist())
    assert all(math.isnan(v) for v in l1_change_ref(e, e).tolist())


def test_auto_on_cpu_uses_torch() -> None:
    a, b = _pair(17, torch.float32)
    record: dict[str, str] = {}
    out = l1_change(a, b, record=record)
    assert record == {"l1_change": "torch"}
    torch.testing.assert_close(out.double(), _means(a, b), rtol=1e-6, atol=1e-7)


def test_bf16_cpu_explicit_triton_names_bf16() -> None:
    a, b = _pair(17, torch.bfloat16)
    with pytest.raises(KernelUnavailableError, match="bfloat16"):
        l1_change(a, b, backend="triton")
    # auto falls back to the reference.
    record: dict[str, str] = {}
    out = l1_change(a, b, record=record)
    assert record == {"l1_change": "torch"}
    torch.testing.assert_close(out.double(), _means(a, b), rtol=1e-6, atol=1e-7)


@needs_interpreter
@pytest.mark.parametrize("n", [0, 17], ids=["empty", "n17"])
def test_triton_float32_under_float64_default(n: int) -> None:
    """The result is float32 of shape (3,) whatever torch's default dtype is."""
    a, b = _pair(n, torch.float32)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out = l1_change(a, b, backend="triton")
    finally:
        torch.set_default_dtype(previous)
    assert out.dtype == torch.float32 and out.shape == (3,)


@needs_interpreter
@pytest.mark.parametrize("broadcast", [0, 1], ids=["a", "b"])
def test_triton_zero_stride_input(broadcast: int) -> None:
    """An input that reshape leaves non-contiguous (a broadcast scalar) is copied first."""
    pair = [torch.randn(20, 50), torch.randn(20, 50)]
    pair[broadcast] = torch.tensor([[0.5]]).expand(20, 50)
    assert not pair[broadcast].reshape(-1).is_contiguous()
    got = l1_change(*pair, backend="triton")
    torch.testing.assert_close(got.double(), _means(*pair), rtol=1e-5, atol=1e-7)


@needs_interpreter
@pytest.mark.parametrize("backend,kernel_calls", [("triton", 1), ("torch", 0), ("auto", 0)])
def test_backend_runs_its_implementation(
    spy_kernel: Callable, backend: str, kernel_calls: int
) -> None:
    """The chosen backend is the one that runs (on CPU, auto is torch)."""
    calls = spy_kernel(l1_mod, "_l1_change_triton")
    l1_change(*_pair(17, torch.float32), backend=backend)
    assert len(calls) == kernel_calls


@pytest.mark.parametrize("bf16_input", [0, 1], ids=["a", "b"])
def test_explicit_triton_checks_both_inputs(bf16_input: int) -> None:
    pair = list(_pair(17, torch.float32))
    pair[bf16_input] = pair[bf16_input].bfloat16()
    with pytest.raises(KernelUnavailableError, match="bfloat16"):
        l1_change(*pair, backend="triton")
