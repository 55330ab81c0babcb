"""kv_scatter / kv_gather: the torch references against plain indexing (ragged-by-repetition rows
included), and the Triton kernel under the interpreter on cpu against them; native CUDA checks
are marked ``gpu``."""

from __future__ import annotations

import importlib

import pytest
import torch

from diffcache.kernels import (
    KernelUnavailableError,
    _dispatch,
    kv_gather,
    kv_gather_ref,
    kv_scatter,
    kv_scatter_ref,
)
from diffcache.testing.kernels import native, needs_interpreter

# The package attribute `kv_gather` is the function; the module lives in sys.modules.
kv_mod = importlib.import_module("diffcache.kernels.kv_rows")


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
NATIVE_DTYPES = [*DTYPES, pytest.param(torch.bfloat16, id="bf16")]


def _rows(b: int, length: int, n: int, g: torch.Generator, ragged: bool) -> torch.Tensor:
    """Distinct positions per batch row; with ``ragged``, row i keeps n - i of them and pads by
    repeating its first position (as a ragged query set is padded)."""
    rows = torch.stack([torch.randperm(length, generator=g)[:n] for _ in range(b)])
    if ragged:
        for i in range(1, b):
            keep = max(1, n - 2 * i)
            rows[i, keep:] = rows[i, 0]
    return rows


def _values(store: torch.Tensor, rows: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Fresh rows; a repeated position gets the values of its first occurrence."""
    b, h, _, hd = store.shape
    vals = torch.randn(b, h, rows.shape[1], hd, generator=g).to(store.dtype)
    for i in range(b):
        for j in range(rows.shape[1]):
            first = int((rows[i] == rows[i, j]).nonzero()[0])
            vals[i, :, j] = vals[i, :, first]
    return vals


def _loop_scatter(store: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    want = store.clone()
    for i in range(rows.shape[0]):
        for j in range(rows.shape[1]):
            want[i, :, rows[i, j], :] = values[i, :, j, :]
    return want


def _case(
    b: int, h: int, length: int, hd: int, n: int, dtype: torch.dtype, seed: int, ragged: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    store = torch.randn(b, h, length, hd, generator=g).to(dtype)
    rows = _rows(b, length, n, g, ragged)
    return store, rows, _values(store, rows, g)


SHAPES = [  # (B, H, L, hd, n)
    pytest.param((1, 1, 8, 4, 3), id="tiny"),
    pytest.param((2, 3, 40, 16, 17), id="odd-n"),
    pytest.param((3, 2, 64, 80, 33), id="hd80"),
    pytest.param((2, 2, 64, 64, 64), id="all-rows"),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ragged", [False, True], ids=["distinct", "ragged"])
def test_refs_match_plain_indexing(shape: tuple[int, ...], ragged: bool) -> None:
    b, h, length, hd, n = shape
    store, rows, vals = _case(b, h, length, hd, n, torch.float32, seed=n, ragged=ragged)
    want = _loop_scatter(store, rows, vals)
    got = store.clone()
    kv_scatter_ref(got, rows, vals)
    assert torch.equal(got, want)
    gathered = kv_gather_ref(got, rows)
    assert gathered.shape == (b, h, n, hd)
    assert torch.equal(gathered, vals)  # repeats read back the identical padded values
    loop = torch.stack([got[i][:, rows[i]] for i in range(b)])
    assert torch.equal(gathered, loop)


def test_ref_hand_computed() -> None:
    store = torch.zeros(1, 1, 4, 2)
    kv_scatter(
        store, torch.tensor([[2, 0, 2]]), torch.tensor([[[[1.0, 2.0], [3.0, 4.0], [1.0, 2.0]]]])
    )
    assert store[0, 0].tolist() == [[3.0, 4.0], [0.0, 0.0], [1.0, 2.0], [0.0, 0.0]]
    assert kv_gather(store, torch.tensor([[2, 3]]))[0, 0].tolist() == [[1.0, 2.0], [0.0, 0.0]]


def test_bad_inputs_are_refused() -> None:
    store = torch.zeros(2, 1, 4, 2)
    rows = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"store must be \[B, H, L, hd\]"):
        kv_gather(store[0], rows)
    with pytest.raises(ValueError, match="rows must be"):
        kv_gather(store, rows[:1])
    with pytest.raises(ValueError, match="int64"):
        kv_gather(store, rows.int())
    with pytest.raises(ValueError, match="values must be"):
        kv_scatter(store, rows, torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match="dtype"):
        kv_scatter(store, rows, torch.zeros(2, 1, 3, 2, dtype=torch.float16))


def test_auto_on_cpu_uses_torch() -> None:
    store, rows, vals = _case(2, 2, 16, 8, 5, torch.float32, seed=1, ragged=False)
    record: dict[str, str] = {}
    kv_scatter(store, rows, vals, record=record)
    assert record == {"kv_scatter": "torch"}
    kv_gather(store, rows, record=record)
    assert record == {"kv_scatter": "torch", "kv_gather": "torch"}


def test_triton_on_cpu_without_interpreter_lists_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_dispatch, "_interpret_enabled", lambda: False)
    monkeypatch.setattr(_dispatch, "_cuda_available", lambda: False)
    monkeypatch.setattr(_dispatch, "_triton_import_error", lambda: None)
    store, rows, vals = _case(1, 1, 8, 4, 2, torch.float32, seed=0, ragged=False)
    with pytest.raises(KernelUnavailableError) as info:
        kv_scatter(store, rows, vals, backend="triton")
    msg = str(info.value)
    assert "'kv_scatter'" in msg and "TRITON_INTERPRET is not 1" in msg
    assert "input 0 is on cpu" in msg and "input 2 is on cpu" in msg
    with pytest.raises(KernelUnavailableError, match="'kv_gather'"):
        kv_gather(store, rows, backend="triton")


def test_registered_for_info() -> None:
    names = [op["name"] for op in _dispatch.describe()]
    assert "kv_scatter" in names and "kv_gather" in names


@needs_interpreter
def test_bf16_cpu_explicit_triton_names_bf16() -> None:
    store, rows, vals = _case(1, 1, 8, 4, 2, torch.bfloat16, seed=0, ragged=False)
    with pytest.raises(KernelUnavailableError, match="bfloat16"):
        kv_scatter(store, rows, vals, backend="triton")
    with pytest.raises(KernelUnavailableError, match="bfloat16"):
        kv_gather(store, rows, backend="triton")


@needs_interpreter
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ragged", [False, True], ids=["distinct", "ragged"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_ref(shape: tuple[int, ...], ragged: bool, dtype: torch.dtype) -> None:
    b, h, length, hd, n = shape
    store, rows, vals = _case(b, h, length, hd, n, dtype, seed=hd + n, ragged=ragged)
    want = store.clone()
    kv_scatter_ref(want, rows, vals)
    got = store.clone()
    record: dict[str, str] = {}
    kv_scatter(got, rows, vals, backend="triton", record=record)
    assert record == {"kv_scatter": "triton"}
    assert torch.equal(got, want)  # a copy: bit-exact
    out = kv_gather(got, rows, backend="triton", record=record)
    assert record == {"kv_scatter": "triton", "kv_gather": "triton"}
    assert out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, kv_gather_ref(want, rows))


@needs_interpreter
def test_triton_strided_store_values_and_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """A [B, L, H, hd] buffer viewed as [B, H, L, hd], transposed values, strided rows; a wide
    head dim loops over several head-dim tiles."""
    monkeypatch.setattr(kv_mod, "_MAX_BLOCK_D", 16)
    g = torch.Generator().manual_seed(5)
    b, h, length, hd, n = 2, 3, 32, 40, 9
    base = torch.randn(b, length, h, hd, generator=g)
    store = base.transpose(1, 2)
    assert not store.is_contiguous()
    rows = torch.stack([torch.randperm(length, generator=g)[:n] for _ in range(b)])
    strided_rows = torch.stack((rows, torch.zeros_like(rows)), dim=2)[..., 0]
    assert torch.equal(strided_rows, rows) and not strided_rows.is_contiguous()
    vals = torch.randn(b, n, h, hd, generator=g).transpose(1, 2)
    want = store.clone()
    kv_scatter_ref(want, rows, vals)
    kv_scatter(store, strided_rows, vals, backend="triton")
    assert torch.equal(store, want)
    assert torch.equal(base.transpose(1, 2), want)  # written through the view
    assert torch.equal(kv_gather(store, strided_rows, backend="triton"), vals)


@needs_interpreter
def test_triton_empty_rows() -> None:
    store = torch.randn(2, 2, 8, 4)
    before = store.clone()
    rows = torch.zeros(2, 0, dtype=torch.long)
    kv_scatter(store, rows, torch.zeros(2, 2, 0, 4), backend="triton")
    assert torch.equal(store, before)
    assert kv_gather(store, rows, backend="triton").shape == (2, 2, 0, 4)


@needs_interpreter
def test_triton_out_of_range_rows_are_skipped() -> None:
    """Documented: the kernel never touches memory outside the store for a bad position."""
    store = torch.zeros(1, 1, 4, 2)
    rows = torch.tensor([[1, 4, -1]])
    kv_scatter(store, rows, torch.ones(1, 1, 3, 2), backend="triton")
    assert store[0, 0].tolist() == [[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    assert kv_gather(store, rows, backend="triton")[0, 0].tolist() == [[1.0, 1.0], [0, 0], [0, 0]]


@native
@pytest.mark.parametrize("dtype", NATIVE_DTYPES)
@pytest.mark.parametrize("ragged", [False, True], ids=["distinct", "ragged"])
@pytest.mark.parametrize(
    "shape",
    [(1, 32, 2048, 128, 32), (4, 8, 1024, 128, 300), (2, 4, 512, 256, 512)],
    ids=["llada-mha", "gqa-n300", "hd256-all"],
)
def test_native_matches_ref(shape: tuple[int, ...], ragged: bool, dtype: torch.dtype) -> None:
    b, h, length, hd, n = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    store = torch.randn(b, h, length, hd, generator=g, device="cuda").to(dtype)
    rows = torch.stack([torch.randperm(length, generator=g, device="cuda")[:n] for _ in range(b)])
    vals = torch.randn(b, h, n, hd, generator=g, device="cuda").to(dtype)
    if ragged:
        rows[:, n // 2 :] = rows[:, :1]
        vals[:, :, n // 2 :] = vals[:, :, :1]
    want = store.clone()
    kv_scatter_ref(want, rows, vals)
    record: dict[str, str] = {}
    kv_scatter(store, rows, vals, record=record)  # auto picks triton on CUDA
    assert record == {"kv_scatter": "triton"}
    assert torch.equal(store, want)
    got = kv_gather(store, rows, record=record)
    assert record == {"kv_scatter": "triton", "kv_gather": "triton"}
    assert torch.equal(got, kv_gather_ref(want, rows))


@native
def test_native_strided() -> None:
    g = torch.Generator(device="cuda").manual_seed(1)
    base = torch.randn(2, 256, 8, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    store = base.transpose(1, 2)  # [B, H, L, hd] view of a [B, L, H, hd] buffer
    rows = torch.stack([torch.randperm(256, generator=g, device="cuda")[:40] for _ in range(2)])
    vals = torch.randn(2, 40, 8, 128, generator=g, device="cuda").bfloat16().transpose(1, 2)
    want = store.clone()
    kv_scatter_ref(want, rows, vals)
    kv_scatter(store, rows, vals, backend="triton")
    assert torch.equal(store, want)
    assert torch.equal(kv_gather(store, rows, backend="triton"), vals)


def _bad_batch_message(op: str) -> str:
    return rf"^{op}: rows must be \[B, n\] with B = 2 \(the store's batch\), got shape \(3, 1\)$"


@pytest.mark.parametrize("backend", ["torch", "triton", None], ids=["torch", "triton", "ref"])
def test_errors_name_the_op(backend: str | None) -> None:
    """Each entry point (and each reference on its own) names itself and what it was given."""
    store = torch.zeros(2, 3, 4, 2)  # B=2 differs from H=3
    rows = torch.zeros(3, 1, dtype=torch.long)
    values = torch.zeros(2, 3, 1, 2)
    gather, scatter = (
        (kv_gather_ref, kv_scatter_ref) if backend is None else (kv_gather, kv_scatter)
    )
    kw = {} if backend is None else {"backend": backend}
    with pytest.raises(ValueError, match=_bad_batch_message("kv_gather")):
        gather(store, rows, **kw)
    with pytest.raises(ValueError, match=_bad_batch_message("kv_scatter")):
        scatter(store, rows, values, **kw)
    with pytest.raises(ValueError, match="^kv_scatter: values dtype torch.float16 differs from "):
        scatter(store, rows[:2], values.half(), **kw)
    with pytest.raises(ValueError, match="cast the fresh rows to the store dtype$"):
        scatter(store, rows[:2], values.half(), **kw)
    with pytest.raises(ValueError, match=r"^kv_scatter: values must be \[B, H, n, hd\]"):
        scatter(store, rows[:2], values[:, :2], **kw)


@needs_interpreter
@pytest.mark.parametrize("shape", [(1, 1, 4, 0), (1, 0, 4, 2)], ids=["hd0", "h0"])
def test_triton_empty_heads(shape: tuple[int, ...]) -> None:
    """No heads or a zero head size: nothing to move, no launch."""
    store = torch.zeros(shape)
    rows = torch.tensor([[1]])
    values = torch.zeros(shape[0], shape[1], 1, shape[3])
    kv_scatter(store, rows, values, backend="triton")
    assert kv_gather(store, rows, backend="triton").shape == values.shape


@needs_interpreter
def test_triton_single_element() -> None:
    store = torch.zeros(1, 1, 3, 1)
    kv_scatter(store, torch.tensor([[2]]), torch.tensor([[[[5.0]]]]), backend="triton")
    assert store.flatten().tolist() == [0.0, 0.0, 5.0]
    assert kv_gather(store, torch.tensor([[2]]), backend="triton").flatten().tolist() == [5.0]


@needs_interpreter
def test_explicit_triton_checks_the_rows_device() -> None:
    store = torch.zeros(1, 1, 4, 2)
    rows = torch.zeros(1, 1, dtype=torch.long, device="meta")
    with pytest.raises(KernelUnavailableError, match="different devices"):
        kv_gather(store, rows, backend="triton")
    with pytest.raises(KernelUnavailableError, match="different devices"):
        kv_scatter(store, rows, torch.zeros(1, 1, 1, 2), backend="triton")
