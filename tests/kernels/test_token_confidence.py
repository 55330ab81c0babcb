"""token_confidence: the float64 reference against a plain softmax / sort (and Dream's formulas),
ties and -inf logits, and the Triton kernel under the interpreter on cpu against it (several
vocab tiles, fp32/fp16); native CUDA checks at real vocab sizes are marked ``gpu``."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
import torch

from diffcache.kernels import (
    KernelUnavailableError,
    _dispatch,
    token_confidence,
    token_confidence_ref,
)
from diffcache.testing.kernels import native, needs_interpreter

# The package attribute `token_confidence` is the function; the module lives in sys.modules.
tc_mod = importlib.import_module("diffcache.kernels.token_confidence")


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


def _logits(n: int, v: int, dtype: torch.dtype, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, v, generator=g, dtype=torch.float64)).to(dtype)


def _plain(logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What the upstream samplers compute: a float64 softmax, a sort, Dream's entropy."""
    p = torch.softmax(logits.double(), dim=-1)
    top1 = logits.argmax(dim=-1)
    srt = p.sort(dim=-1, descending=True).values
    log_p = torch.log(p)
    ent = torch.where(p > 0, p * log_p, 0.0).sum(-1)
    return top1, srt[:, 0], srt[:, 1], ent


def _assert_close(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...], tol: float):
    top1, p1, p2, ent = got
    assert top1.dtype == torch.int64 and top1.shape == p1.shape
    assert p1.dtype == p2.dtype == ent.dtype == torch.float32
    assert torch.equal(top1, want[0].to(top1.device))
    for a, b in zip((p1, p2, ent), want[1:], strict=True):
        torch.testing.assert_close(a.double(), b.double().to(a.device), rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "shape", [(1, 1), (1, 2), (3, 7), (8, 1000), (5, 3001)], ids=lambda s: f"{s[0]}x{s[1]}"
)
@pytest.mark.parametrize(
    "dtype",
    [*DTYPES, pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float64, id="fp64")],
)
def test_ref_matches_plain_softmax(shape: tuple[int, int], dtype: torch.dtype) -> None:
    logits = _logits(*shape, dtype, seed=shape[1])
    got = token_confidence_ref(logits)
    if shape[1] == 1:  # no second entry: p2 = 0
        assert got[2].tolist() == [0.0] and got[1].tolist() == [1.0] and got[3].tolist() == [0.0]
        return
    _assert_close(got, _plain(logits), tol=1e-6)


def test_ref_hand_computed() -> None:
    logits = torch.tensor([[0.0, 0.0, -float("inf"), 0.0], [1.0, 3.0, 3.0, 0.0]])
    top1, p1, p2, ent = token_confidence_ref(logits)
    assert top1.tolist() == [0, 1]  # ties: lowest index, as torch.argmax
    assert p1[0].item() == pytest.approx(1 / 3) and p2[0].item() == pytest.approx(1 / 3)
    assert ent[0].item() == pytest.approx(-torch.log(torch.tensor(3.0)).item())  # -inf adds 0
    assert p1[1].item() == p2[1].item()  # a tied max: margin 0


def test_argmax_ties_pick_lowest_index_in_torch() -> None:
    """The convention the kernel follows is torch.argmax's (documented: first maximal value)."""
    x = torch.zeros(3, 5000)
    x[0, [7, 4000]] = 1.0
    x[1, [4095, 4096]] = 2.0
    assert x.argmax(-1).tolist() == [7, 4095, 0]
    assert token_confidence_ref(x)[0].tolist() == [7, 4095, 0]


def test_ref_chunks_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = _logits(7, 50, torch.float32, seed=1)
    whole = token_confidence_ref(logits)
    monkeypatch.setattr(tc_mod, "_REF_CHUNK", 120)  # 2 rows per chunk
    for a, b in zip(token_confidence_ref(logits), whole, strict=True):
        assert torch.equal(a, b)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        token_confidence(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="V >= 1"):
        token_confidence(torch.zeros(2, 0))
    with pytest.raises(ValueError, match="floating point"):
        token_confidence(torch.zeros(2, 3, dtype=torch.long))


def test_auto_on_cpu_uses_torch() -> None:
    logits = _logits(4, 100, torch.float32, seed=0)
    record: dict[str, str] = {}
    got = token_confidence(logits, record=record)
    assert record == {"token_confidence": "torch"}
    _assert_close(got, _plain(logits), tol=1e-6)


def test_triton_on_cpu_without_interpreter_lists_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_dispatch, "_interpret_enabled", lambda: False)
    monkeypatch.setattr(_dispatch, "_cuda_available", lambda: False)
    monkeypatch.setattr(_dispatch, "_triton_import_error", lambda: None)
    with pytest.raises(KernelUnavailableError) as info:
        token_confidence(torch.zeros(2, 8), backend="triton")
    msg = str(info.value)
    assert "'token_confidence'" in msg and "TRITON_INTERPRET is not 1" in msg
    assert "input 0 is on cpu" in msg


def test_registered_for_info() -> None:
    assert "token_confidence" in [op["name"] for op in _dispatch.describe()]


@needs_interpreter
def test_bf16_cpu_explicit_triton_names_bf16() -> None:
    with pytest.raises(KernelUnavailableError, match="bfloat16"):
        token_confidence(torch.zeros(2, 8, dtype=torch.bfloat16), backend="triton")


@needs_interpreter
@pytest.mark.parametrize(
    "shape", [(1, 1), (2, 2), (3, 7), (8, 1000), (5, 3001)], ids=lambda s: f"{s[0]}x{s[1]}"
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_ref(shape: tuple[int, int], dtype: torch.dtype) -> None:
    logits = _logits(*shape, dtype, seed=shape[0] + shape[1])
    record: dict[str, str] = {}
    got = token_confidence(logits, backend="triton", record=record)
    assert record == {"token_confidence": "triton"}
    _assert_close(got, token_confidence_ref(logits), tol=2e-6)


@needs_interpreter
@pytest.mark.parametrize("block", [16, 128], ids=lambda b: f"block{b}")
def test_triton_many_tiles(monkeypatch: pytest.MonkeyPatch, block: int) -> None:
    """Small vocab tiles: the online rescaling, the top-2 merge and ties across tiles."""
    monkeypatch.setattr(tc_mod, "_MAX_BLOCK_V", block)
    logits = _logits(6, 1000, torch.float32, seed=3, scale=8.0)
    logits[1, [5, 700]] = 40.0  # tied max in different tiles: lowest index, p2 == p1
    logits[2, [100, 101]] = 40.0  # tied max in one tile
    logits[3, :] = logits[3].sort().values  # increasing: the max moves every tile
    logits[4, :] = logits[4].sort(descending=True).values  # the max is in the first tile
    logits[5, ::3] = -float("inf")  # -inf logits (LLaDA's logits_eos_inf) add nothing
    got = token_confidence(logits, backend="triton")
    want = token_confidence_ref(logits)
    _assert_close(got, want, tol=2e-6)
    assert got[0][1].item() == 5 and got[0][2].item() == 100
    assert got[1][1].item() == got[2][1].item() and got[1][2].item() == got[2][2].item()


@needs_interpreter
def test_triton_strided_rows_and_vocab() -> None:
    base = _logits(4, 600, torch.float16, seed=9)
    rows = base[::2, :300]  # row stride 1200, unit vocab stride
    cols = base[:, ::2]  # vocab stride 2: copied
    for x in (rows, cols):
        _assert_close(token_confidence(x, backend="triton"), token_confidence_ref(x), tol=2e-6)


@needs_interpreter
def test_triton_peaked_and_flat_rows() -> None:
    """Extreme confidences: one dominant logit (p1 ~ 1, entropy ~ 0) and a flat row."""
    logits = torch.zeros(2, 2000)
    logits[0, 1234] = 60.0
    top1, p1, p2, ent = token_confidence(logits, backend="triton")
    assert top1.tolist() == [1234, 0]
    assert p1[0].item() == pytest.approx(1.0) and p2[0].item() < 1e-25
    assert abs(ent[0].item()) < 1e-20
    assert p1[1].item() == pytest.approx(1 / 2000) and p2[1].item() == pytest.approx(1 / 2000)
    assert ent[1].item() == pytest.approx(-torch.log(torch.tensor(2000.0)).item(), rel=1e-6)


@needs_interpreter
def test_triton_empty() -> None:
    out = token_confidence(torch.zeros(0, 10), backend="triton")
    assert [t.shape for t in out] == [(0,)] * 4


@native
@pytest.mark.parametrize(
    "dtype",
    [*DTYPES, pytest.param(torch.bfloat16, id="bf16")],
)
@pytest.mark.parametrize(
    "shape", [(32, 126464), (3, 152064), (300, 4097)], ids=lambda s: f"{s[0]}x{s[1]}"
)
def test_native_matches_ref(shape: tuple[int, int], dtype: torch.dtype) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (4.0 * torch.randn(*shape, generator=g, device="cuda")).to(dtype)
    logits[0, 126080] = -float("inf")
    record: dict[str, str] = {}
    got = token_confidence(logits, record=record)  # auto picks triton on CUDA
    assert record == {"token_confidence": "triton"}
    _assert_close(got, token_confidence_ref(logits), tol=1e-5)
    again = token_confidence(logits)
    assert all(torch.equal(a, b) for a, b in zip(got, again, strict=True))  # deterministic


@needs_interpreter
@pytest.mark.parametrize("n", [0, 3], ids=["empty", "n3"])
def test_triton_float32_under_float64_default(n: int) -> None:
    """The probabilities are float32 whatever torch's default dtype is."""
    logits = _logits(n, 40, torch.float32, seed=4)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        top1, *probs = token_confidence(logits, backend="triton")
    finally:
        torch.set_default_dtype(previous)
    assert top1.dtype == torch.int64
    assert [p.dtype for p in probs] == [torch.float32] * 3


@needs_interpreter
@pytest.mark.parametrize("backend,kernel_calls", [("triton", 1), ("torch", 0), ("auto", 0)])
def test_backend_runs_its_implementation(
    spy_kernel: Callable, backend: str, kernel_calls: int
) -> None:
    """The chosen backend is the one that runs (on CPU, auto is torch)."""
    calls = spy_kernel(tc_mod, "_token_confidence_triton")
    token_confidence(_logits(3, 40, torch.float32, seed=5), backend=backend)
    assert len(calls) == kernel_calls
