"""Composable parts of the next-scale models' KV selections (research/var.md §4.3).

A selection answers, for one layer's head group at one scale, which rows of ``k`` (the group's
history followed by the new map's rows, ``[B, Hg, L, d]``) the store keeps. The parts here are
plain functions over tensors so each selection (``diffcache.kv.scalekv``,
``diffcache.kv.baselines``) is a few lines of composition:

- observation windows: which cache rows vote (:func:`centroid_window`, :func:`last_rows`);
- scorers: a score per (row, head, cache row) ``[B, Hg, L]`` (:func:`window_logits`,
  :func:`window_softmax`, :func:`accumulated_attention`);
- pooling over the flattened cache order (:func:`pool1d`);
- mandatory sets: rows always kept (:func:`sinks`, :func:`sink_scales`, :func:`recent`,
  :func:`recent_scale`, and the window itself);
- selectors: :func:`topk_with_mandatory`, :func:`positional`;
- triggers: :func:`after_length_exceeds`, :func:`every_scale_from`.

Positions are indices into the layer's cache as the store hands it over; with a post-attention
selection the cache ends with the current map, so the map's rows are the last ``tokens(si)``.
Every score is per (batch row, head): CFG's conditional and unconditional rows choose on their own.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from diffcache.errors import PlanError
from diffcache.kernels import Backend, pick, window_scores
from diffcache.kernels.window_scores import SPEC as WINDOW_SCORES
from diffcache.kv.history import ScaleCall


def grid_centroids(h: int, w: int, grid: int) -> list[int] | None:
    """Raster indices, inside an ``h×w`` map, of the centroid tokens of a ``grid×grid`` patch
    grid (patches of ``h//grid × w//grid``; centroid ``(i·ph + (ph−1)//2, j·pw + (pw−1)//2)``),
    or None when the map is too small for the grid (``h`` or ``w`` below ``grid``)."""
    if h < grid or w < grid:
        return None
    ph, pw = h // grid, w // grid
    rows = [i * ph + (ph - 1) // 2 for i in range(grid)]
    cols = [j * pw + (pw - 1) // 2 for j in range(grid)]
    return [r * w + c for r in rows for c in cols]


def last_rows(length: int, size: int) -> torch.Tensor:
    """The last ``size`` positions of a cache of ``length`` rows (all of them if fewer)."""
    return torch.arange(max(0, length - size), length)


def centroid_window(call: ScaleCall, length: int, size: int = 16) -> torch.Tensor:
    """ScaleKV's observation window: the centroids of a ``√size × √size`` patch grid of the
    current map (the last rows of the cache), as cache positions; the last ``size`` positions
    when the map is smaller than the grid on either side (research/var.md §2.1.3).

    The grid runs over the schedule's ``(h, w)``; the released code assumes a square map of side
    √tokens (identical for square maps; it falls back, or mis-grids, on non-square ones)."""
    grid = math.isqrt(size)
    if grid * grid != size:
        raise PlanError(f"observation window size {size} is not a perfect square")
    h, w = call.schedule.sizes[call.si]
    local = _centroid_rows(h, w, grid)
    if local is None:
        return last_rows(length, size)
    return local + (length - h * w)


@functools.lru_cache(maxsize=256)
def _centroid_rows(h: int, w: int, grid: int) -> torch.Tensor | None:
    """:func:`grid_centroids` as a tensor, made once per map size (never written to)."""
    local = grid_centroids(h, w, grid)
    return None if local is None else torch.tensor(local)


def _window_queries(q: torch.Tensor, window: torch.Tensor, length: int) -> torch.Tensor:
    """The queries of the window rows that belong to the current map (``q`` holds its ``n``
    rows, the last ``n`` of the cache); rows of earlier maps have no query at this scale."""
    local = window - (length - q.shape[2])
    if int(local.min()) < 0:  # a window longer than the map
        local = local[local >= 0]
    return q.index_select(2, local.to(q.device))


def _score_dtype(*ts: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 when an input is fp64."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def window_logits(
    q: torch.Tensor, k: torch.Tensor, window: torch.Tensor, scale: float
) -> torch.Tensor:
    """ScaleKV released: the raw logits ``scale·q_w·k`` of the window's queries summed over the
    window (no softmax), with the window's own rows at −inf. ``[B, Hg, L]``."""
    dt = _score_dtype(q, k)
    qw = _window_queries(q, window, k.shape[2]).to(dt)
    logits = torch.matmul(qw, k.to(dt).transpose(2, 3)) * scale
    logits.index_fill_(-1, window.to(logits.device), float("-inf"))
    return logits.sum(dim=2)


def window_softmax(
    q: torch.Tensor, k: torch.Tensor, window: torch.Tensor, scale: float
) -> torch.Tensor:
    """SnapKV / ScaleKV paper: the window's queries' softmax attention over every cache row,
    summed over the window; the window's own rows get no vote (0, what SnapKV's slicing of
    the last ``w`` columns gives its average pooling). ``[B, Hg, L]``."""
    dt = _score_dtype(q, k)
    qw = _window_queries(q, window, k.shape[2]).to(dt)
    probs = torch.softmax(torch.matmul(qw, k.to(dt).transpose(2, 3)) * scale, dim=-1)
    return probs.sum(dim=2).index_fill_(-1, window.to(probs.device), 0.0)


def pooled_window_scores(
    call: ScaleCall,
    q: torch.Tensor,
    k: torch.Tensor,
    window: torch.Tensor,
    scale: float,
    softmax: bool,
    pool: str,
    kernel: int,
) -> torch.Tensor:
    """What a window selection ranks: :func:`window_softmax` (``softmax``) or
    :func:`window_logits`, then :func:`pool1d`; or, where the plan's backend
    (``call.kernels``) runs Triton on these tensors, the fused
    :func:`diffcache.kernels.window_scores`, which scores alike (only the window's own rows,
    which :func:`topk_with_mandatory` masks anyway, may differ: the kernel sets them to −inf).
    The torch scorers get ``window`` where it is (the host): reading it needs no device sync."""
    on_device = window.to(k.device)
    if pick(WINDOW_SCORES, call.kernels, q, k, on_device) is Backend.TRITON:
        return window_scores(
            q, k, on_device, scale, softmax, pool, kernel, backend="triton", record=call.record
        )
    if call.record is not None:
        call.record[WINDOW_SCORES.name] = Backend.TORCH.value
    scorer = window_softmax if softmax else window_logits
    return pool1d(scorer(q, k, window, scale), pool, kernel)


def accumulated_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """H2O: the softmax attention every current query gives each cache row, summed over the
    queries (explicit attention weights). ``[B, Hg, L]``."""
    dt = _score_dtype(q, k)
    return torch.softmax(torch.matmul(q.to(dt), k.to(dt).transpose(2, 3)) * scale, -1).sum(2)


def pool1d(scores: torch.Tensor, kind: str, kernel: int) -> torch.Tensor:
    """1-D pooling over the flattened cache order (windows cross map boundaries): ``"max"`` or
    ``"avg"`` (zero padding counted), stride 1, padding ``kernel//2``; kernel 1 is identity."""
    if kernel % 2 != 1:
        raise PlanError(f"pooling kernel {kernel} must be odd (the pooled length must not change)")
    if kind not in ("max", "avg"):
        raise PlanError(f"pooling {kind!r} is not one of 'max', 'avg'")
    if kernel == 1:
        return scores
    pool = F.max_pool1d if kind == "max" else F.avg_pool1d
    return pool(scores, kernel, stride=1, padding=kernel // 2)


def sinks(length: int, n: int) -> torch.Tensor:
    """The first ``n`` positions (StreamingLLM's attention sinks)."""
    return torch.arange(min(n, length))


def sink_scales(call: ScaleCall, length: int, scales: int) -> torch.Tensor:
    """Every position of the first ``scales`` maps (positions are never re-indexed: they are the
    cache's first rows as long as they are kept)."""
    return sinks(length, call.schedule.start(min(scales, len(call.schedule))))


def recent(length: int, n: int) -> torch.Tensor:
    """The last ``n`` positions."""
    return last_rows(length, n)


def recent_scale(call: ScaleCall, length: int) -> torch.Tensor:
    """The current map's positions (the most recent scale: the cache's last ``tokens(si)``)."""
    return last_rows(length, call.schedule.tokens(call.si))


def topk_with_mandatory(scores: torch.Tensor, mandatory: torch.Tensor, budget: int) -> torch.Tensor:
    """The ``budget − |mandatory|`` best-scored rows outside the mandatory set plus the mandatory
    set, sorted ascending: ``[B, Hg, budget]`` (every row when the cache is not longer)."""
    length, m = scores.shape[-1], mandatory.shape[0]
    if m > budget:
        raise PlanError(f"budget of {budget} rows is below the {m} rows that must be kept")
    mandatory = mandatory.to(scores.device)
    masked = scores.index_fill(-1, mandatory, float("-inf"))
    rest = masked.topk(min(budget, length) - m, dim=-1).indices
    fixed = mandatory.expand(*rest.shape[:-1], m)
    return torch.cat((rest, fixed), dim=-1).sort(dim=-1).values


def ends(like: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """Keep the first ``first`` and the last ``last`` of ``like``'s ``L`` rows (``[B, Hg, L,
    d]``; StreamingLLM's sinks and recent rows, a sliding window with ``first=0``) for every
    (row, head): ``[B, Hg, m]`` sorted, each row once, on ``like``'s device. The index depends on
    ``L`` alone: made once per ``(L, first, last, device)``."""
    return _ends(like.shape[2], first, last, like.device).expand(*like.shape[:2], -1)


@functools.lru_cache(maxsize=256)
def _ends(length: int, first: int, last: int, device: torch.device) -> torch.Tensor:
    """:func:`ends`' index (never written to)."""
    return torch.unique(torch.cat((sinks(length, first), recent(length, last)))).to(device)


def after_length_exceeds(call: ScaleCall, base: int) -> bool:
    """ScaleKV's trigger: compress once the cache has exceeded ``base`` rows at least once.

    Before the first compression the cache after scale ``si`` holds ``schedule.start(si+1)``
    rows, and that grows with ``si``, so the released per-layer ``has_reached_base`` flag is
    exactly "the full cumulative length exceeds ``base``": no state to carry or reset."""
    return call.schedule.start(call.si + 1) > base


def every_scale_from(call: ScaleCall, si0: int) -> bool:
    """Compress at every scale from ``si0`` on."""
    return call.si >= si0
