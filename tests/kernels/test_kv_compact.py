"""kv_compact: the torch reference against a row-by-row loop, and the Triton kernel under the
interpreter on cpu against it (mixed K/V dtypes, strided inputs, edge sizes); native CUDA checks
at Infinity-2B geometry are marked ``gpu``."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from diffcache.kernels import KernelUnavailableError, _dispatch, kv_compact, kv_compact_ref
from diffcache.testing.kernels import native, needs_interpreter

kc_mod = importlib.import_module("diffcache.kernels.kv_compact")


Case = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _keep(b: int, h: int, total: int, m: int, g: torch.Generator, device: str) -> torch.Tensor:
    """Per (b, h) a different sorted subset of ``m`` of ``range(total)``."""
    rows = [
        torch.randperm(total, generator=g, device=device)[:m].sort().values for _ in range(b * h)
    ]
    return torch.stack(rows).reshape(b, h, m)


def _case(
    shape: tuple[int, int, int, int, int, int],
    dtypes: tuple[torch.dtype, torch.dtype],
    seed: int,
    device: str = "cpu",
) -> Case:
    b, h, old, n, d, m = shape
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(rows: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(b, h, rows, d, generator=g, device=device).to(dtype)

    k_dt, v_dt = dtypes
    hk, hv, nk, nv = randn(old, k_dt), randn(old, v_dt), randn(n, k_dt), randn(n, v_dt)
    return hk, hv, nk, nv, _keep(b, h, old + n, m, g, device)


def _loop(old: torch.Tensor, new: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Row by row: index i < L_old reads the history, else the new map at i - L_old."""
    b, h, m = keep.shape
    out = torch.empty(b, h, m, old.shape[3], dtype=old.dtype)
    for i in range(b):
        for j in range(h):
            for r in range(m):
                idx = int(keep[i, j, r])
                src = old[i, j, idx] if idx < old.shape[2] else new[i, j, idx - old.shape[2]]
                out[i, j, r] = src
    return out


SHAPES = [  # (B, H, L_old, n, d, m)
    pytest.param((1, 1, 3, 2, 4, 3), id="tiny"),
    pytest.param((2, 3, 21, 16, 20, 9), id="d20"),
    pytest.param((2, 2, 37, 13, 80, 50), id="m=all"),
    pytest.param((3, 2, 30, 9, 24, 1), id="m=1"),
    pytest.param((2, 2, 0, 11, 16, 5), id="no-history"),
    pytest.param((2, 1, 12, 0, 16, 7), id="no-new"),
    pytest.param((1, 2, 40, 33, 160, 41), id="d160"),
]
DTYPES = [
    pytest.param((torch.float32, torch.float32), id="fp32"),
    pytest.param((torch.float16, torch.float16), id="fp16"),
    pytest.param((torch.float32, torch.float16), id="k32-v16"),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_ref_matches_row_loop(shape: tuple[int, ...]) -> None:
    hk, hv, nk, nv, keep = _case(shape, (torch.float32, torch.float16), seed=sum(shape))
    k, v = kv_compact_ref(hk, hv, nk, nv, keep)
    assert k.dtype == torch.float32 and v.dtype == torch.float16
    assert torch.equal(k, _loop(hk, nk, keep)) and torch.equal(v, _loop(hv, nv, keep))


def test_ref_hand_computed() -> None:
    hist = torch.tensor([10.0, 11.0, 12.0]).reshape(1, 1, 3, 1)
    new = torch.tensor([20.0, 21.0]).reshape(1, 1, 2, 1)
    keep = torch.tensor([[[0, 2, 4]]])
    k, v = kv_compact(hist, -hist, new, -new, keep)
    assert k.flatten().tolist() == [10.0, 12.0, 21.0]
    assert v.flatten().tolist() == [-10.0, -12.0, -21.0]


@needs_interpreter
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtypes", DTYPES)
def test_triton_matches_ref(shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> None:
    hk, hv, nk, nv, keep = _case(shape, dtypes, seed=len(shape) + shape[4])
    record: dict[str, str] = {}
    k, v = kv_compact(hk, hv, nk, nv, keep, backend="triton", record=record)
    assert record == {"kv_compact": "triton"}
    want_k, want_v = kv_compact_ref(hk, hv, nk, nv, keep)
    assert (k.dtype, v.dtype) == dtypes and k.is_contiguous() and v.is_contiguous()
    assert torch.equal(k, want_k) and torch.equal(v, want_v)  # a copy: bit-exact


@needs_interpreter
def test_attention_over_the_kept_rows_is_masked_attention() -> None:
    """research/var.md §3.2 item 3: attending to the compacted rows equals attending to history
    + new map with every evicted position at -inf."""
    hk, hv, nk, nv, keep = _case((2, 3, 21, 16, 20, 9), (torch.float32,) * 2, seed=11)
    q = torch.randn(2, 3, 5, 20, generator=torch.Generator().manual_seed(12))
    k, v = kv_compact(hk, hv, nk, nv, keep, backend="triton")
    mask = torch.full((2, 3, 1, 37), float("-inf")).scatter(3, keep[:, :, None], 0.0)
    want = F.scaled_dot_product_attention(
        q, torch.cat((hk, nk), dim=2), torch.cat((hv, nv), dim=2), attn_mask=mask
    )
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v), want)


@needs_interpreter
def test_triton_strided_inputs_and_wide_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A head group's view of [B, L, H, d] buffers, a transposed keep, several head-dim tiles."""
    monkeypatch.setattr(kc_mod, "_MAX_BLOCK_D", 16)
    g = torch.Generator().manual_seed(3)
    b, h, old, n, d, m = 2, 4, 19, 10, 40, 12
    hk = torch.randn(b, old, h, d, generator=g).transpose(1, 2)[:, 1:3]
    hv = torch.randn(b, old, h, d, generator=g).half().transpose(1, 2)[:, 1:3]
    nk = torch.randn(b, n, h, d, generator=g).transpose(1, 2)[:, 1:3]
    nv = torch.randn(b, n, h, d, generator=g).half().transpose(1, 2)[:, 1:3]
    keep = _keep(b, 2, old + n, m, g, "cpu").transpose(0, 1).contiguous().transpose(0, 1)
    assert not (hk.is_contiguous() or nv.is_contiguous() or keep.is_contiguous())
    k, v = kv_compact(hk, hv, nk, nv, keep, backend="triton")
    assert torch.equal(k, _loop(hk, nk, keep)) and torch.equal(v, _loop(hv, nv, keep))


@needs_interpreter
def test_triton_empty_keep_and_out_of_range() -> None:
    """m = 0 launches nothing; an index outside [0, L_old + n) gives a zero row (documented)."""
    hk, hv, nk, nv, _ = _case((1, 1, 3, 2, 4, 1), (torch.float32, torch.float32), seed=0)
    k, v = kv_compact(hk, hv, nk, nv, torch.zeros(1, 1, 0, dtype=torch.long), backend="triton")
    assert k.shape == v.shape == (1, 1, 0, 4)
    k, v = kv_compact(hk, hv, nk, nv, torch.tensor([[[-1, 4, 5]]]), backend="triton")
    assert torch.equal(k[0, 0, 1], nk[0, 0, 1]) and torch.equal(v[0, 0, 1], nv[0, 0, 1])
    assert not k[0, 0, 0].any() and not k[0, 0, 2].any() and not v[0, 0, 2].any()


def test_auto_on_cpu_uses_torch() -> None:
    record: dict[str, str] = {}
    kv_compact(*_case((1, 2, 4, 3, 8, 5), (torch.float32,) * 2, seed=1), record=record)
    assert record == {"kv_compact": "torch"}


@needs_interpreter
def test_bf16_cpu_explicit_triton_names_bf16() -> None:
    case = _case((1, 1, 4, 2, 8, 3), (torch.float32, torch.bfloat16), seed=0)
    with pytest.raises(KernelUnavailableError, match="input 1 has dtype bfloat16"):
        kv_compact(*case, backend="triton")


def test_registered_for_info() -> None:
    assert "kv_compact" in [op["name"] for op in _dispatch.describe()]


@pytest.mark.parametrize("backend", ["torch", "triton", None], ids=["torch", "triton", "ref"])
def test_bad_inputs_name_what_was_given(backend: str | None) -> None:
    fn = kv_compact_ref if backend is None else kv_compact
    kw = {} if backend is None else {"backend": backend}
    hk, hv, nk, nv, keep = _case((2, 3, 4, 2, 8, 3), (torch.float32, torch.float16), seed=0)
    with pytest.raises(ValueError, match=r"^kv_compact: hist_k must be \[B, H, L_old, d\]"):
        fn(hk[0], hv, nk, nv, keep, **kw)
    with pytest.raises(
        ValueError, match=r"B, H, d = 2, 3, 8 \(hist_k's\), got shape \(2, 3, 2, 4\)"
    ):
        fn(hk, hv, nk[..., :4], nv, keep, **kw)
    with pytest.raises(ValueError, match=r"^kv_compact: new_v must have new_k's shape"):
        fn(hk, hv, nk, nv[:, :1], keep, **kw)
    with pytest.raises(ValueError, match="V torch.float32.*V torch.float16.*cast them"):
        fn(hk, hv, nk, nv.float(), keep, **kw)
    with pytest.raises(ValueError, match=r"keep must be \[B, H, m\] with B, H = 2, 3, got"):
        fn(hk, hv, nk, nv, keep[0], **kw)
    with pytest.raises(ValueError, match="keep must be int64 indices, got torch.int32"):
        fn(hk, hv, nk, nv, keep.int(), **kw)


@native
@pytest.mark.parametrize("m", [1, 1052, 10521], ids=["m=1", "10%", "all"])
@pytest.mark.parametrize(
    "dtypes",
    [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)],
    ids=["k32-v16", "bf16"],
)
def test_native_infinity_geometry(m: int, dtypes: tuple[torch.dtype, ...]) -> None:
    """Infinity-2B: 16 heads of 128, CFG batch 2, 6,425 history rows + the 64x64 map."""
    case = _case((2, 16, 6425, 4096, 128, m), dtypes, seed=m, device="cuda")
    record: dict[str, str] = {}
    k, v = kv_compact(*case, record=record)  # auto picks triton on CUDA
    assert record == {"kv_compact": "triton"}
    want_k, want_v = kv_compact_ref(*case)
    assert torch.equal(k, want_k) and torch.equal(v, want_v)


@pytest.mark.parametrize("layout", ["contiguous", "narrow", "transposed"])
def test_take_rows_equals_gather_on_every_layout(layout: str) -> None:
    """``take_rows`` reads a store buffer's rows through one table (contiguous rows and
    ``narrow`` views of a longer buffer) and other layouts by advanced indexing: each equals
    ``gather`` over the rows, bit for bit."""
    from diffcache.kernels import take_rows

    g = torch.Generator().manual_seed(0)
    buffer = torch.randn(2, 3, 12, 4, generator=g)
    x = {
        "contiguous": buffer,
        "narrow": buffer.narrow(2, 0, 7),  # a store's held rows: a view of its buffer
        "transposed": buffer.transpose(1, 2).contiguous().transpose(1, 2),  # heads innermost
    }[layout]
    index = _keep(2, 3, x.shape[2], 5, g, "cpu")
    want = x.gather(2, index[..., None].expand(2, 3, 5, 4))
    assert torch.equal(take_rows(x, index), want)
