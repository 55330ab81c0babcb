"""Native Triton kernels on a CUDA device: all dtypes, large shapes, auto dispatch.

Run on a GPU machine with the interpreter off, e.g.
``TRITON_INTERPRET=0 python -m pytest tests/kernels/test_gpu.py -m gpu``.
"""

from __future__ import annotations

import pytest
import torch

from diffcache.kernels import (
    _dispatch,
    add_residual,
    add_residual_ref,
    forecast,
    forecast_ref,
    l1_change,
    l1_change_ref,
    rectified_residual,
    rectified_residual_ref,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        _dispatch.triton_status() != [], reason="triton cannot run here (see triton_status())"
    ),
    pytest.mark.skipif(
        _dispatch._interpret_enabled(),
        reason="TRITON_INTERPRET=1 at import; set TRITON_INTERPRET=0 to test native kernels",
    ),
]

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]
SHAPES = [
    pytest.param((1,), id="1"),
    pytest.param((4097,), id="4097"),
    pytest.param((3, 1_000_003), id="3x1000003"),
    pytest.param((2, 4096, 3072), id="2x4096x3072"),
]


def _pair(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(shape, generator=g, device="cuda").to(dtype)
    b = (a.float() + 0.05 * torch.randn(shape, generator=g, device="cuda")).to(dtype)
    return a, b


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_l1_change_native(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    a, b = _pair(shape, dtype)
    record: dict[str, str] = {}
    got = l1_change(a, b, record=record)  # auto picks triton on CUDA
    assert record == {"l1_change": "triton"}
    assert got.device == a.device and got.dtype == torch.float32
    rtol = 1e-5 if a.numel() < 100_000 else 1e-4
    torch.testing.assert_close(got, l1_change_ref(a, b), rtol=rtol, atol=1e-6)
    assert torch.equal(got, l1_change(a, b, backend="triton"))  # deterministic


@pytest.mark.parametrize("dtype", DTYPES)
def test_l1_change_non_contiguous(dtype: torch.dtype) -> None:
    a = _pair((512, 1030), dtype)[0].t()
    b = _pair((512, 2060), dtype)[1][:, ::2].t()
    assert a.shape == b.shape and not a.is_contiguous() and not b.is_contiguous()
    got = l1_change(a, b, backend="triton")
    torch.testing.assert_close(got, l1_change_ref(a, b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_residual_native(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x, _ = _pair(shape, dtype)
    r = torch.randn(shape, device="cuda")
    record: dict[str, str] = {}
    got = add_residual(x, r, record=record)
    assert record == {"add_residual": "triton"}
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, add_residual_ref(x, r), rtol=0, atol=0)


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_add_residual_out_dtype(out_dtype: torch.dtype) -> None:
    x, _ = _pair((4, 1000), torch.bfloat16)
    r = torch.randn(4, 1000, device="cuda")
    got = add_residual(x.t(), r.t(), out_dtype=out_dtype, backend="triton")
    assert got.dtype == out_dtype
    torch.testing.assert_close(got, add_residual_ref(x.t(), r.t(), out_dtype), rtol=0, atol=0)


@pytest.mark.parametrize("h", [1, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forecast_native(h: int, dtype: torch.dtype) -> None:
    """HyCa's per-dimension forecast at Wan2.1-1.3B's hidden width, float32 history."""
    g = torch.Generator(device="cuda").manual_seed(h)
    x = torch.randn(2, 4097, 1536, generator=g, device="cuda").to(dtype)
    history = torch.randn(h, 2, 4097, 1536, generator=g, device="cuda")
    weights = torch.randn(h, 1536, generator=g, device="cuda")
    record: dict[str, str] = {}
    got = forecast(x, history, weights, record=record)
    assert record == {"forecast": "triton"} and got.dtype == dtype
    want = forecast_ref(x, history, weights)
    tol = 1e-5 if dtype is torch.float32 else 1e-2  # the GPU may fuse multiply-adds
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dim", [1, -1])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rectified_residual_native(dim: int, dtype: torch.dtype) -> None:
    """ERTACache's rectified residual on Wan latents (channels on dim 1) and channel-last."""
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, 16, 21, 60, 104) if dim == 1 else (2, 4097, 1536)
    x = torch.randn(shape, generator=g, device="cuda").to(dtype)
    r = torch.randn(shape, generator=g, device="cuda")
    c = shape[dim]
    scale = torch.rand(c, generator=g, device="cuda") + 0.5
    shift = torch.randn(c, generator=g, device="cuda")
    record: dict[str, str] = {}
    got = rectified_residual(x, r, scale, shift, dim, record=record)
    assert record == {"rectified_residual": "triton"} and got.dtype == dtype
    want = rectified_residual_ref(x, r, scale, shift, dim)
    tol = 1e-5 if dtype is torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_auto_falls_back_for_cpu_and_grad() -> None:
    x = torch.randn(8, device="cuda", requires_grad=True)
    record: dict[str, str] = {}
    add_residual(x, torch.zeros(8, device="cuda"), record=record)
    assert record == {"add_residual": "torch"}
    l1_change(torch.ones(8), torch.zeros(8), record=record)
    assert record == {"add_residual": "torch", "l1_change": "torch"}


@pytest.mark.parametrize("dtype", DTYPES)
def test_sampler_fused_confidence_on_cuda(dtype: torch.dtype) -> None:
    """LLaDA's sampler with ``backend="auto"`` on CUDA takes the fused statistics over the real
    126,464-token vocabulary: the float64 path's tokens, confidences to float32 accuracy."""
    from diffcache.pipelines.sampling import llada

    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (6 * torch.randn(4, 32, 126464, device="cuda", generator=gen)).to(dtype)
    kw = dict(eos_id=126081, eot_id=126348, confidence_eos_eot_inf=True)
    want_t, want_c = llada.llada_candidates(logits, 0.0, "low_confidence", **kw)
    record: dict[str, str] = {}
    got_t, got_c = llada.llada_candidates(
        logits, 0.0, "low_confidence", backend="auto", record=record, **kw
    )
    assert record == {"token_confidence": "triton"}
    assert torch.equal(got_t, want_t)
    torch.testing.assert_close(got_c, want_c, rtol=1e-5, atol=1e-8)
