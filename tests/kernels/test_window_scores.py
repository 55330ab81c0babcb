"""window_scores: the torch reference against a float64 loop written from the definition, by
hand on a tiny case and against the scorers of ``diffcache.kv.select`` (the selections' parts),
and the Triton kernel under the interpreter on cpu against the reference (raw logits and
softmax, max and avg pooling, odd sizes, long windows, mixed dtypes, strided keys); native CUDA
checks at Infinity-2B geometry are marked ``gpu``."""

from __future__ import annotations

import importlib
import itertools
import math

import pytest
import torch

from diffcache.kernels import KernelUnavailableError, _dispatch, window_scores, window_scores_ref
from diffcache.kv.select import pool1d, topk_with_mandatory, window_logits, window_softmax
from diffcache.testing.kernels import native, needs_interpreter

ws_mod = importlib.import_module("diffcache.kernels.window_scores")
INF = float("inf")


def _case(
    b: int, h: int, w: int, length: int, d: int, seed: int, shared: bool, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random k and the queries of its last ``length // 2 + 1`` rows (the current map); window
    positions anywhere in k (some without a query), distinct per (b, h) (or one set for all)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, h, length // 2 + 1, d, generator=g, device=device)
    k = torch.randn(b, h, length, d, generator=g, device=device)
    sets = 1 if shared else b * h
    win = torch.rand(sets, length, generator=g, device=device).argsort(dim=1)[:, :w]
    return q, k, win[0] if shared else win.reshape(b, h, w)


def _loop(
    q: torch.Tensor,
    k: torch.Tensor,
    window: torch.Tensor,
    scale: float,
    softmax: bool,
    pool: str,
    size: int,
) -> torch.Tensor:
    """The definition, position by position in float64: the window positions of the current
    map (the last ``n`` keys) vote with their queries; the window's keys get -inf (logits) or
    no probability (softmax over every key)."""
    b, h, n, _ = q.shape
    length = k.shape[2]
    out = torch.empty(b, h, length, dtype=torch.float64)
    for i, j in itertools.product(range(b), range(h)):
        positions = window.expand(b, h, window.shape[-1])[i, j].tolist()
        win = set(positions)
        voters = [q[i, j, p - (length - n)].double() for p in positions if p >= length - n]
        logits = [[float(qr @ k[i, j, c].double()) * scale for c in range(length)] for qr in voters]
        for row in logits:
            total = sum(math.exp(x) for x in row)
            row[:] = [
                (0.0 if softmax else -INF) if c in win else math.exp(x) / total if softmax else x
                for c, x in enumerate(row)
            ]
        s = [sum(row[c] for row in logits) for c in range(length)]
        for c in range(length):
            near = [s[n] for n in range(c - size // 2, c + size // 2 + 1) if 0 <= n < length]
            pooled = max(near) if pool == "max" else sum(near) / size  # padding counts as 0
            out[i, j, c] = -INF if c in win else pooled
    return out


@pytest.mark.parametrize(("softmax", "pool"), [(False, "max"), (True, "avg"), (True, "max")])
@pytest.mark.parametrize("size", [1, 3, 5])
def test_ref_matches_the_definition(softmax: bool, pool: str, size: int) -> None:
    q, k, win = _case(2, 2, 3, 13, 6, seed=size, shared=False)
    got = window_scores_ref(q, k, win, 0.4, softmax, pool, size)
    assert got.dtype == torch.float32
    want = _loop(q, k, win, 0.4, softmax, pool, size)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)  # float32 vs 64


def test_hand_computed_raw_logits_and_softmax() -> None:
    """Keys 1, 3, 2, 5 along one axis, the window at key 3 (the current map's one query),
    kernel 3."""
    q = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    k = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [5.0, 0.0]]).reshape(1, 1, 4, 2)
    win = torch.tensor([3])
    got = window_scores(q, k, win, 1.0, pool="max", kernel_size=3)
    assert got.flatten().tolist() == [3.0, 3.0, 3.0, -INF]
    # average pooling counts the padding and spreads the window's -inf to its neighbour
    got = window_scores(q, k, win, 1.0, pool="avg", kernel_size=3)
    torch.testing.assert_close(got.flatten(), torch.tensor([4 / 3, 2.0, -INF, -INF]))
    p = torch.tensor([1.0, 3.0, 2.0, 5.0]).softmax(0).tolist()  # over every key; 3 gets no vote
    got = window_scores(q, k, win, 1.0, softmax=True, pool="avg", kernel_size=3)
    want = [(p[0] + p[1]) / 3, (p[0] + p[1] + p[2]) / 3, (p[1] + p[2]) / 3, -INF]
    torch.testing.assert_close(got.flatten(), torch.tensor(want))


@pytest.mark.parametrize(
    ("softmax", "pool", "size"), [(False, "max", 5), (True, "avg", 5), (True, "max", 3)]
)
def test_ref_ranks_as_the_selections_scorers(softmax: bool, pool: str, size: int) -> None:
    """The selections' parts (select.py's scorer, pool1d, top-k with the window kept) give the
    reference's scores, the window at -inf, and so the same kept rows."""
    q, k, _ = _case(2, 3, 1, 40, 8, seed=size, shared=True)  # the map: the last 21 keys
    win = torch.tensor([5, 22, 30, 39])  # one position before the map: no query, no vote
    scorer = window_softmax if softmax else window_logits
    want = pool1d(scorer(q, k, win, 0.3), pool, size)
    want[..., win] = -INF
    got = window_scores_ref(q, k, win, 0.3, softmax, pool, size)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(topk_with_mandatory(got, win, 12), topk_with_mandatory(want, win, 12))


SHAPES = [  # (B, H, w, L, d)
    pytest.param((1, 1, 1, 7, 4), id="w1"),
    pytest.param((2, 3, 5, 37, 20), id="odd"),
    pytest.param((1, 2, 16, 300, 64), id="centroids"),
    pytest.param((2, 1, 40, 1300, 24), id="long-window-2-chunks"),
]
VARIANTS = [
    pytest.param((False, "max", 5), id="released"),
    pytest.param((True, "avg", 5), id="paper"),
    pytest.param((True, "max", 7), id="softmax-max7"),
    pytest.param((False, "avg", 3), id="logits-avg3"),
    pytest.param((False, "max", 1), id="no-pool"),
]


@needs_interpreter
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-head"])
def test_triton_matches_ref(shape: tuple[int, ...], variant: tuple, shared: bool) -> None:
    q, k, win = _case(*shape, seed=sum(shape), shared=shared)
    softmax, pool, size = variant
    scale = shape[4] ** -0.5
    record: dict[str, str] = {}
    got = window_scores(q, k, win, scale, softmax, pool, size, backend="triton", record=record)
    assert record == {"window_scores": "triton"}
    want = window_scores_ref(q, k, win, scale, softmax, pool, size)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got.isinf(), want.isinf())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("softmax", [False, True], ids=["logits", "softmax"])
def test_triton_mixed_dtypes_strided_keys_and_loops(
    monkeypatch: pytest.MonkeyPatch, softmax: bool
) -> None:
    """fp16 queries over fp32 keys viewed from a [B, L, H, d] buffer; small tiles so that the
    head dim, the window and the statistics each take several steps."""
    monkeypatch.setattr(ws_mod, "_MAX_BLOCK_D", 16)
    monkeypatch.setattr(ws_mod, "_MAX_BLOCK_W", 16)
    monkeypatch.setattr(ws_mod, "_STATS_CHUNK", 128)
    g = torch.Generator().manual_seed(7)
    b, h, w, length, d = 2, 3, 20, 333, 40
    q = torch.randn(b, w, h, d, generator=g).half().transpose(1, 2)
    k = torch.randn(b, length, h, d, generator=g).transpose(1, 2)
    win = torch.arange(length - w, length)  # SnapKV: the last w positions
    assert not (q.is_contiguous() or k.is_contiguous())
    got = window_scores(q, k, win, d**-0.5, softmax, "avg", 5, backend="triton")
    want = window_scores_ref(q, k, win, d**-0.5, softmax, "avg", 5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_triton_every_key_in_the_window() -> None:
    """L = w: nothing to score; every position is -inf on both backends, softmax included."""
    q, k, win = _case(1, 2, 6, 6, 8, seed=0, shared=True)
    for softmax in (False, True):
        got = window_scores(q, k, win, 1.0, softmax, "avg", 3, backend="triton")
        assert torch.equal(got, window_scores_ref(q, k, win, 1.0, softmax, "avg", 3))
        assert got.isneginf().all()


def test_auto_on_cpu_uses_torch() -> None:
    record: dict[str, str] = {}
    window_scores(*_case(1, 2, 2, 9, 4, seed=1, shared=True), 0.5, record=record)
    assert record == {"window_scores": "torch"}


@needs_interpreter
def test_bf16_cpu_explicit_triton_names_bf16() -> None:
    q, k, win = _case(1, 1, 2, 8, 4, seed=0, shared=True)
    with pytest.raises(KernelUnavailableError, match="input 1 has dtype bfloat16"):
        window_scores(q, k.bfloat16(), win, 1.0, backend="triton")


def test_registered_for_info() -> None:
    assert "window_scores" in [op["name"] for op in _dispatch.describe()]


@pytest.mark.parametrize("backend", ["torch", "triton", None], ids=["torch", "triton", "ref"])
def test_bad_inputs_name_what_was_given(backend: str | None) -> None:
    fn = window_scores_ref if backend is None else window_scores
    kw = {} if backend is None else {"backend": backend}
    q, k, win = _case(2, 3, 4, 10, 8, seed=0, shared=False)
    with pytest.raises(ValueError, match=r"^window_scores: q must hold 1 to L = 10 .* got 0"):
        fn(q[:, :, :0], k, win, 1.0, **kw)
    with pytest.raises(ValueError, match=r"q must hold 1 to L = 3 queries .*, got 6"):
        fn(q, k[:, :, :3], win, 1.0, **kw)
    with pytest.raises(ValueError, match=r"B, H, d = 2, 3, 4 \(k's\), got shape \(2, 3, 6, 8\)"):
        fn(q, k[..., :4], win, 1.0, **kw)
    with pytest.raises(ValueError, match="must be floating point, got torch.float32, torch.int64"):
        fn(q, k.long(), win, 1.0, **kw)
    with pytest.raises(ValueError, match=r"window must be \[w\] or \[B, H, w\] with B, H = 2, 3"):
        fn(q, k, win[0], 1.0, **kw)
    with pytest.raises(ValueError, match="window must be int64 positions, got torch.int32"):
        fn(q, k, win.int(), 1.0, **kw)
    with pytest.raises(ValueError, match="pool must be one of max, avg, got 'mean'"):
        fn(q, k, win, 1.0, pool="mean", **kw)
    with pytest.raises(ValueError, match="kernel_size must be an int >= 1, got 0"):
        fn(q, k, win, 1.0, kernel_size=0, **kw)
    with pytest.raises(ValueError, match="kernel_size must be odd .* got 4"):
        fn(q, k, win, 1.0, kernel_size=4, **kw)


def _centroids(start: int, side: int) -> torch.Tensor:
    """ScaleKV's 16 window positions on a square map (research/var.md §2.1.3)."""
    patch = side // 4
    axis = torch.arange(4) * patch + (patch - 1) // 2
    return start + (axis[:, None] * side + axis[None, :]).flatten()


def test_centroids_helper_matches_the_research_examples() -> None:
    pos = _centroids(0, 64)
    assert (pos // 64).unique().tolist() == (pos % 64).unique().tolist() == [7, 23, 39, 55]
    assert _centroids(100, 20).tolist()[3:5] == [100 + 2 * 20 + 17, 100 + 7 * 20 + 2]


@native
@pytest.mark.parametrize(
    "variant",
    [pytest.param((False, "max"), id="released"), pytest.param((True, "avg"), id="paper")],
)
def test_native_infinity_geometry(variant: tuple[bool, str]) -> None:
    """Infinity-2B at its last scale: CFG batch 2, 16 heads of 128, 6,425 + 4,096 fp32 keys,
    bf16 queries at the 64x64 map's 16 centroids."""
    softmax, pool = variant
    q, k, _ = _case(2, 16, 16, 10521, 128, seed=0, shared=True, device="cuda")
    win = _centroids(6425, 64).cuda()
    q = q[:, :, -4096:].bfloat16()  # the 64x64 map's queries
    record: dict[str, str] = {}
    got = window_scores(q, k, win, 128**-0.5, softmax, pool, 5, record=record)
    assert record == {"window_scores": "triton"}
    want = window_scores_ref(q, k, win, 128**-0.5, softmax, pool, 5)
    assert torch.equal(got.isinf(), want.isinf())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
