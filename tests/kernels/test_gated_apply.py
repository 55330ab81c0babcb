"""gated_apply: the torch reference by hand and against a DiT block's own arithmetic, and the
Triton kernel under the interpreter on cpu against it (1-4 terms, broadcast and per-token
gates, ungated terms, strided views, fp16)."""

from __future__ import annotations

import pytest
import torch

from diffcache.kernels import (
    KernelUnavailableError,
    _dispatch,
    gated_apply,
    gated_apply_ref,
)
from diffcache.testing.kernels import needs_interpreter


def test_ref_hand_computed() -> None:
    x = torch.tensor([[[1.0, 2.0]]])  # (B=1, N=1, D=2)
    a, c = torch.tensor([[[3.0, 4.0]]]), torch.tensor([[[0.5, 0.5]]])
    gate = torch.tensor([[[2.0, -1.0]]])
    out = gated_apply_ref(x, [a, c], [gate, None])
    assert out.tolist() == [[[1.0 + 6.0 + 0.5, 2.0 - 4.0 + 0.5]]]


def test_ref_is_the_blocks_own_arithmetic_bit_for_bit() -> None:
    """Wan's block: ``(h + a * g1) + c``, then ``+ f * g2``, each step in float32."""
    g = torch.Generator().manual_seed(0)
    h, a, c, f = (torch.randn(2, 7, 16, generator=g) for _ in range(4))
    g1, g2 = torch.randn(2, 1, 16, generator=g), torch.randn(2, 1, 16, generator=g)
    block = ((h.float() + a * g1) + c).float() + f.float() * g2
    for backend in ("torch", "auto"):
        assert torch.equal(gated_apply(h, [a, c, f], [g1, None, g2], backend=backend), block)


def test_bad_inputs_are_refused() -> None:
    x = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="value 0 has shape"):
        gated_apply(x, [torch.zeros(2, 3)], [None])
    with pytest.raises(ValueError, match="does not broadcast"):
        gated_apply(x, [x], [torch.zeros(3, 1, 4)])
    with pytest.raises(ValueError, match="1 to 4 terms"):
        gated_apply(x, [x] * 5, [None] * 5)
    with pytest.raises(ValueError, match="1 to 4 terms"):
        gated_apply(x, [x], [None, None])


def _case(terms: int, per_token: bool, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 37, 19, generator=g).to(dtype)
    shared = torch.randn(2, 37 + 5, 19, generator=g).to(dtype)  # a shared output, sliced
    values = [torch.randn(2, 37, 19, generator=g).to(dtype) for _ in range(terms - 1)]
    values.append(shared[:, 5:])
    gate_shape = (2, 37, 19) if per_token else (2, 1, 19)
    gates = [torch.randn(gate_shape, generator=g) for _ in range(terms)]
    gates[terms // 2] = None  # one ungated term
    if terms > 1:
        gates[0] = gates[0].to(dtype)  # gates in the model dtype, as FLUX's are
    return x, values, gates


@needs_interpreter
@pytest.mark.parametrize("terms", [1, 2, 3, 4])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_the_reference(terms: int, per_token: bool, dtype: torch.dtype) -> None:
    x, values, gates = _case(terms, per_token, dtype, terms)
    assert not values[-1].is_contiguous()
    record: dict[str, str] = {}
    got = gated_apply(x, values, gates, backend="triton", record=record)
    assert record == {"gated_apply": "triton"} and got.dtype == dtype
    want = gated_apply_ref(x, values, gates)
    if dtype is torch.float32:  # the same float32 operations in the same order
        assert torch.equal(got, want)
    else:
        assert torch.allclose(got.float(), want.float(), atol=2e-3, rtol=2e-3)


@needs_interpreter
def test_triton_low_rank_inputs_and_out_dtype() -> None:
    x = torch.arange(6.0)
    v, gate = torch.ones(6), torch.tensor(2.0)
    got = gated_apply(x, [v], [gate], out_dtype=torch.float16, backend="triton")
    assert got.dtype == torch.float16 and got.tolist() == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]


def test_auto_uses_torch_on_cpu_and_more_than_3_dims() -> None:
    x = torch.zeros(2, 2, 2, 2)
    record: dict[str, str] = {}
    gated_apply(x, [x], [None], record=record)
    assert record == {"gated_apply": "torch"}
    if _dispatch.triton_status() == [] and _dispatch._interpret_enabled():
        with pytest.raises(_dispatch.KernelUnavailableError, match="at most 3"):
            gated_apply(x, [x], [None], backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or _dispatch.triton_status() != [],
    reason="needs a CUDA device and triton",
)
@pytest.mark.skipif(_dispatch._interpret_enabled(), reason="set TRITON_INTERPRET=0")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_native_kernel_on_cuda(dtype: torch.dtype) -> None:
    """auto picks the kernel on CUDA; float32 is bit-exact (no multiply-add fusion)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (2, 4096, 1536)
    x, a, c = (torch.randn(shape, generator=g, device="cuda").to(dtype) for _ in range(3))
    shared = torch.randn(2, 4096 + 7, 1536, generator=g, device="cuda").to(dtype)
    g1, g2 = (torch.randn(2, 1, 1536, generator=g, device="cuda") for _ in range(2))
    values, gates = [a, c, shared[:, 7:]], [g1, None, g2]
    record: dict[str, str] = {}
    got = gated_apply(x, values, gates, record=record)
    assert record == {"gated_apply": "triton"} and got.dtype == dtype
    want = gated_apply_ref(x, values, gates)
    if dtype is torch.float32:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


def _hand_case() -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor | None]]:
    """x + g0 * v0 + v1 (ungated), in fp16: [1 + 2*3 + 0.5, 2 + (-1)*4 + 0.5]."""
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float16)
    values = [torch.tensor([[3.0, 4.0]], dtype=torch.float16), torch.full((1, 2), 0.5).half()]
    return x, values, [torch.tensor([2.0, -1.0]), None]


WANT = [[7.5, -1.5]]


@pytest.mark.parametrize(
    "backend", ["torch", "auto", pytest.param("triton", marks=needs_interpreter)]
)
def test_public_hand_computed(backend: str) -> None:
    out = gated_apply(*_hand_case(), out_dtype=torch.float32, backend=backend)
    assert out.dtype == torch.float32 and out.tolist() == WANT
    out = gated_apply(*_hand_case(), backend=backend)
    assert out.dtype == torch.float16 and out.tolist() == WANT


def test_ref_out_dtype() -> None:
    assert gated_apply_ref(*_hand_case()).dtype == torch.float16
    out = gated_apply_ref(*_hand_case(), out_dtype=torch.float32)
    assert out.dtype == torch.float32 and out.tolist() == WANT


@needs_interpreter
def test_triton_single_element() -> None:
    one = torch.ones(1)
    out = gated_apply(one, [torch.full((1,), 2.0)], [torch.full((1,), 3.0)], backend="triton")
    assert out.tolist() == [7.0]


@pytest.mark.parametrize("bf16_input", ["x", "value", "gate"])
def test_explicit_triton_checks_every_input(bf16_input: str) -> None:
    x, values, gates = _hand_case()
    x, values, gates = x.float(), [v.float() for v in values], [gates[0], None]
    if bf16_input == "x":
        x = x.bfloat16()
    elif bf16_input == "value":
        values[1] = values[1].bfloat16()
    else:
        gates[0] = gates[0].bfloat16()
    with pytest.raises(KernelUnavailableError, match="bfloat16"):
        gated_apply(x, values, gates, out_dtype=torch.float32, backend="triton")
