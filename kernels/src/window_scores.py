"""Observation-window scores of a layer's keys, pooled: what SnapKV-style selection ranks.

The keys ``k [B, H, L, d]`` are a layer's cache (history, then the current map's ``n`` rows);
``q [B, H, n, d]`` are the current map's queries. A window of positions among the keys (int64,
``[w]`` shared or ``[B, H, w]``) votes for the keys: each window position inside the current map
(``pos >= L - n``) votes with its query ``q[pos - (L - n)]``; a window position of an earlier map
has no query at this scale and no vote. ``s[b, h, j] = sum_i f(q_i . k_j * scale)`` with ``f``
the identity (ScaleKV as released: raw logits, the window's own keys at ``-inf``) or the softmax
over every key ``j`` (SnapKV, the ScaleKV paper), the window's own keys then given 0, as
SnapKV's slicing of the last ``w`` columns does. These are the semantics of
``diffcache.kv.select.window_logits`` / ``window_softmax``. The scores are then pooled along ``j``
(``max_pool1d`` or ``avg_pool1d``, odd ``kernel_size``, stride 1, padding ``kernel_size // 2``;
average pooling counts the padding, as ``F.avg_pool1d`` does by default) and the window positions
set to ``-inf``, so that ``torch.topk`` never picks them (research/var.md §2.1.3, §2.3, §4.6 P1).
Scores are float32; with raw logits a window position's neighbours inherit its ``-inf`` under
average pooling, as in PyTorch.

As a GEMM the window is a skinny ``w x d . d x L`` product and the softmax needs a pass for its
row statistics: the Triton path runs one launch of per-chunk row max / sum-exp (softmax only)
and one launch that computes each tile of scores, pools it (a tile recomputes the
``kernel_size // 2`` scores at each edge, written to a scratch row only it reads) and writes
the pooled, re-masked scores. Products are float32 (inputs of any float dtype are upcast).
Window indices must lie in ``[0, L)``: the reference raises, the kernel ignores one outside.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch
import torch.nn.functional as F

from ._dispatch import FLOATS, Backend, OpSpec, _record, pick, register_op, tl, triton

SPEC = register_op(
    OpSpec(
        name="window_scores",
        description="pooled window-query scores of every key (raw logits or softmax), fp32",
        dtypes=FLOATS,
        input_dtypes={2: (torch.int64,)},
    )
)

POOLS = ("max", "avg")
_BLOCK_L = 128  # keys per tile of the statistics pass
_STATS_CHUNK = 1024  # keys per program of the statistics pass
_MAX_BLOCK_W = 32  # window queries per step; longer windows loop
_MAX_BLOCK_D = 64  # head-dim lanes per step of the dot products; wider heads loop


def _check(
    q: torch.Tensor, k: torch.Tensor, window: torch.Tensor, pool: str, kernel_size: int
) -> None:
    """Raise ValueError naming the first argument that does not fit."""
    if k.dim() != 4:
        raise ValueError(f"window_scores: k must be [B, H, L, d], got shape {tuple(k.shape)}")
    b, h, length, d = k.shape
    if q.dim() != 4 or (q.shape[0], q.shape[1], q.shape[3]) != (b, h, d):
        raise ValueError(
            f"window_scores: q must be [B, H, n, d] with B, H, d = {b}, {h}, {d} (k's), got "
            f"shape {tuple(q.shape)}"
        )
    if not 1 <= q.shape[2] <= length:
        raise ValueError(
            f"window_scores: q must hold 1 to L = {length} queries (the last rows of k), got "
            f"{q.shape[2]}"
        )
    if not (q.dtype.is_floating_point and k.dtype.is_floating_point):
        raise ValueError(f"window_scores: q and k must be floating point, got {q.dtype}, {k.dtype}")
    if window.dim() not in (1, 3) or (window.dim() == 3 and tuple(window.shape[:2]) != (b, h)):
        raise ValueError(
            f"window_scores: window must be [w] or [B, H, w] with B, H = {b}, {h}, got shape "
            f"{tuple(window.shape)}"
        )
    if window.dtype != torch.int64:
        raise ValueError(f"window_scores: window must be int64 positions, got {window.dtype}")
    if pool not in POOLS:
        raise ValueError(f"window_scores: pool must be one of {', '.join(POOLS)}, got {pool!r}")
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
        raise ValueError(f"window_scores: kernel_size must be an int >= 1, got {kernel_size!r}")
    if kernel_size % 2 == 0:
        raise ValueError(
            f"window_scores: kernel_size must be odd (padding kernel_size // 2 keeps L scores), "
            f"got {kernel_size}"
        )


def window_scores_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    window: torch.Tensor,
    scale: float,
    softmax: bool = False,
    pool: str = "max",
    kernel_size: int = 5,
) -> torch.Tensor:
    """Torch reference: float32 logits of the window's queries, softmax over every key or the
    window's keys at ``-inf``, the window's keys given no vote, sum over the window,
    ``F.max_pool1d`` / ``F.avg_pool1d``, the window at ``-inf``. Arguments as
    :func:`window_scores`.

    Raises:
        ValueError: Shapes, dtypes or pooling do not fit.
    """
    _check(q, k, window, pool, kernel_size)
    b, h, n, d = q.shape
    length = k.shape[2]
    win = window.expand(b, h, window.shape[-1])
    local = win - (length - n)  # the window position's query row; < 0: no query at this scale
    voters = (local >= 0)[..., None]
    qw = q.gather(2, local.clamp(min=0)[..., None].expand(-1, -1, -1, d))
    masked = torch.zeros(b, h, length, dtype=torch.bool, device=k.device)
    masked.scatter_(2, win, True)
    logits = torch.matmul(qw.float(), k.float().transpose(2, 3)) * scale
    votes = logits.softmax(dim=-1) if softmax else logits
    scores = votes.masked_fill(~voters, 0.0).sum(dim=2)
    scores = scores.masked_fill(masked, 0.0 if softmax else float("-inf"))
    pool_fn = F.max_pool1d if pool == "max" else F.avg_pool1d
    pooled = pool_fn(scores, kernel_size, stride=1, padding=kernel_size // 2)
    return pooled.masked_fill(masked, float("-inf"))


if triton is not None:

    @triton.jit
    def _in_window(win_ptr, w_s, r, w, BLOCK_W: tl.constexpr):
        """Whether each key position ``r`` is one of the ``w`` window positions."""
        hit = tl.zeros(r.shape, dtype=tl.int32)
        for i0 in range(0, w, BLOCK_W):
            i = i0 + tl.arange(0, BLOCK_W)
            pos = tl.load(win_ptr + i * w_s, mask=i < w, other=0)
            eq = (r[None, :] == pos[:, None]) & (i < w)[:, None]
            hit = tl.maximum(hit, tl.max(eq.to(tl.int32), axis=0))
        return hit > 0

    @triton.jit
    def _voters(win_ptr, w_s, i, w, first):
        """The query row of each window entry ``i`` (its position less ``first``, the current
        map's first key) and whether it has one (the entry lies in the current map)."""
        pos = tl.load(win_ptr + i * w_s, mask=i < w, other=-1)
        return pos - first, (i < w) & (pos >= first)

    @triton.jit
    def _logits(q_ptr, k_ptr, q_n, q_d, k_l, k_d, qi, has_q, r, L, d, scale, BLOCK_D: tl.constexpr):
        """``q_qi . k_r * scale`` for query rows ``qi`` (0 where not ``has_q``) and key
        positions ``r``, float32."""
        acc = tl.zeros((qi.shape[0], r.shape[0]), dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            qt = tl.load(
                q_ptr + qi[:, None] * q_n + dd[None, :] * q_d,
                mask=has_q[:, None] & (dd < d)[None, :],
                other=0.0,
            )
            kt = tl.load(
                k_ptr + r[None, :] * k_l + dd[:, None] * k_d,
                mask=((r >= 0) & (r < L))[None, :] & (dd < d)[:, None],
                other=0.0,
            )
            acc += tl.dot(qt.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
        return acc * scale

    @triton.jit
    def _stats_kernel(
        q_ptr,
        k_ptr,
        win_ptr,
        m_ptr,
        z_ptr,
        H,
        w,
        n,
        L,
        d,
        n_chunks,
        scale,
        q_b,
        q_h,
        q_n,
        q_d,
        k_b,
        k_h,
        k_l,
        k_d,
        w_b,
        w_h,
        w_s,
        CHUNK: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_W: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Program (b*H + h, chunk): each window row's max and sum of exp over the chunk's keys,
        to ``m``/``z [B*H, n_chunks, w]``."""
        bh = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1).to(tl.int64)
        b = bh // H
        h = bh % H
        qp = q_ptr + b * q_b + h * q_h
        kp = k_ptr + b * k_b + h * k_h
        wp = win_ptr + b * w_b + h * w_h
        for i0 in range(0, w, BLOCK_W):
            i = i0 + tl.arange(0, BLOCK_W)
            qi, has_q = _voters(wp, w_s, i, w, L - n)
            m = tl.full((BLOCK_W,), float("-inf"), tl.float32)
            z = tl.zeros((BLOCK_W,), tl.float32)
            for r0 in range(0, CHUNK, BLOCK_L):
                r = c * CHUNK + r0 + tl.arange(0, BLOCK_L)
                x = _logits(qp, kp, q_n, q_d, k_l, k_d, qi, has_q, r, L, d, scale, BLOCK_D)
                x = tl.where((r >= L)[None, :], float("-inf"), x)
                m_new = tl.maximum(m, tl.max(x, axis=1))
                base = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far
                z = z * tl.exp(m - base) + tl.sum(tl.exp(x - base[:, None]), axis=1)
                m = m_new
            out = (bh * n_chunks + c) * w + i
            tl.store(m_ptr + out, m, mask=i < w)
            tl.store(z_ptr + out, z, mask=i < w)

    @triton.jit
    def _scores_kernel(
        q_ptr,
        k_ptr,
        win_ptr,
        m_ptr,
        z_ptr,
        scratch_ptr,
        out_ptr,
        H,
        w,
        n,
        L,
        d,
        n_chunks,
        scale,
        q_b,
        q_h,
        q_n,
        q_d,
        k_b,
        k_h,
        k_l,
        k_d,
        w_b,
        w_h,
        w_s,
        SOFTMAX: tl.constexpr,
        MAX_POOL: tl.constexpr,
        KSIZE: tl.constexpr,
        BLOCK_E: tl.constexpr,
        BLOCK_W: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Program (b*H + h, tile): scores of BLOCK_E keys from ``KSIZE // 2`` before the tile,
        pooled into the tile's ``BLOCK_E - 2 * (KSIZE // 2)`` outputs."""
        PAD: tl.constexpr = KSIZE // 2
        STEP: tl.constexpr = BLOCK_E - 2 * PAD
        bh = tl.program_id(0).to(tl.int64)
        t = tl.program_id(1).to(tl.int64)
        b = bh // H
        h = bh % H
        qp = q_ptr + b * q_b + h * q_h
        kp = k_ptr + b * k_b + h * k_h
        wp = win_ptr + b * w_b + h * w_h
        e = tl.arange(0, BLOCK_E)
        r = t * STEP - PAD + e
        valid = (r >= 0) & (r < L)
        win = _in_window(wp, w_s, r, w, BLOCK_W)
        s = tl.zeros((BLOCK_E,), tl.float32)
        for i0 in range(0, w, BLOCK_W):
            i = i0 + tl.arange(0, BLOCK_W)
            qi, has_q = _voters(wp, w_s, i, w, L - n)
            x = _logits(qp, kp, q_n, q_d, k_l, k_d, qi, has_q, r, L, d, scale, BLOCK_D)
            if SOFTMAX:
                m = tl.full((BLOCK_W,), float("-inf"), tl.float32)
                z = tl.zeros((BLOCK_W,), tl.float32)
                for c in range(0, n_chunks):
                    at = (bh * n_chunks + c) * w + i
                    mc = tl.load(m_ptr + at, mask=i < w, other=float("-inf"))
                    zc = tl.load(z_ptr + at, mask=i < w, other=0.0)
                    m_new = tl.maximum(m, mc)
                    base = tl.where(m_new == float("-inf"), 0.0, m_new)
                    z = z * tl.exp(m - base) + zc * tl.exp(mc - base)
                    m = m_new
                x = tl.exp(x - m[:, None]) / z[:, None]
                keep = has_q[:, None] & (valid & ~win)[None, :]
            else:
                keep = has_q[:, None] & valid[None, :]
            s += tl.sum(tl.where(keep, x, 0.0), axis=0)
        if not SOFTMAX:
            s = tl.where(win, float("-inf"), s)
        # outside [0, L): the pooling's padding (-inf for max, 0 counted for avg)
        if MAX_POOL:
            s = tl.where(valid, s, float("-inf"))
        else:
            s = tl.where(valid, s, 0.0)
        row = scratch_ptr + (bh * tl.num_programs(1) + t) * BLOCK_E
        tl.store(row + e, s)
        tl.debug_barrier()  # the tile's scores are visible to all its threads
        acc = tl.load(row + e)
        for j in tl.static_range(1, KSIZE):
            v = tl.load(row + e + j, mask=e + j < BLOCK_E, other=0.0)
            if MAX_POOL:
                acc = tl.maximum(acc, v)
            else:
                acc += v
        if not MAX_POOL:
            acc = acc / KSIZE
        o = t * STEP + e
        acc = tl.where(_in_window(wp, w_s, o, w, BLOCK_W), float("-inf"), acc)
        tl.store(out_ptr + bh * L + o, acc, mask=(e < STEP) & (o < L))


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    window: torch.Tensor,
    scale: float,
    softmax: bool,
    pool: str,
    kernel_size: int,
) -> torch.Tensor:
    b, h, n, d = q.shape
    length, w = k.shape[2], window.shape[-1]
    out = torch.empty((b, h, length), dtype=torch.float32, device=k.device)
    if out.numel() == 0:
        return out
    win = window.expand(b, h, w)
    pad = kernel_size // 2
    block_e = max(128, triton.next_power_of_2(4 * pad))
    block_w = min(max(16, triton.next_power_of_2(w)), _MAX_BLOCK_W)
    block_d = min(max(16, triton.next_power_of_2(d)), _MAX_BLOCK_D)
    n_chunks = triton.cdiv(length, _STATS_CHUNK)
    stats = torch.empty((2, b * h, n_chunks, w), dtype=torch.float32, device=k.device)
    strides = (*q.stride(), *k.stride(), *win.stride())
    sizes = (h, w, n, length, d, n_chunks, float(scale))
    if softmax:
        _stats_kernel[(b * h, n_chunks)](
            q, k, win, stats[0], stats[1], *sizes, *strides,
            CHUNK=_STATS_CHUNK, BLOCK_L=_BLOCK_L, BLOCK_W=block_w, BLOCK_D=block_d,
        )  # fmt: skip
    tiles = triton.cdiv(length, block_e - 2 * pad)
    scratch = torch.empty(b * h * tiles * block_e, dtype=torch.float32, device=k.device)
    _scores_kernel[(b * h, tiles)](
        q, k, win, stats[0], stats[1], scratch, out, *sizes, *strides,
        SOFTMAX=softmax, MAX_POOL=pool == "max", KSIZE=kernel_size,
        BLOCK_E=block_e, BLOCK_W=block_w, BLOCK_D=block_d,
    )  # fmt: skip
    return out


def window_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    window: torch.Tensor,
    scale: float,
    softmax: bool = False,
    pool: str = "max",
    kernel_size: int = 5,
    backend: str | Backend = "auto",
    record: MutableMapping[str, str] | None = None,
) -> torch.Tensor:
    """Pooled scores of every key by the window's queries, the window set to ``-inf``.

    Args:
        q: ``[B, H, n, d]`` the current map's queries, the last ``n`` keys' (any float dtype
            and strides).
        k: ``[B, H, L, d]`` the keys scored (any float dtype and strides).
        window: int64 positions in ``[0, L)`` of the window among the keys: ``[w]`` for every
            (b, h), or ``[B, H, w]``; those of the current map vote with their queries.
        scale: Multiplies ``q . k`` (``1 / sqrt(d)`` for SnapKV and ScaleKV).
        softmax: Sum softmax probabilities over every key (SnapKV, ScaleKV paper; the window's
            keys then get none) instead of the raw logits (ScaleKV as released).
        pool: ``"max"`` (ScaleKV) or ``"avg"`` (SnapKV) pooling along the keys.
        kernel_size: Odd pooling width; 1 pools nothing.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``; see :mod:`diffcache.kernels`.
        record: Where to write ``record[op] = "torch" | "triton"``, the backend that ran.

    Returns:
        ``[B, H, L]`` float32 scores for ``torch.topk``.

    Raises:
        ValueError: Shapes, dtypes or pooling do not fit.
        KernelUnavailableError: ``backend="triton"`` cannot run on these inputs.
    """
    _check(q, k, window, pool, kernel_size)
    chosen = pick(SPEC, backend, q, k, window)
    if chosen is Backend.TRITON:
        out = _launch(q, k, window, scale, softmax, pool, kernel_size)
    else:
        out = window_scores_ref(q, k, window, scale, softmax, pool, kernel_size)
    _record(SPEC, chosen, record)
    return out
