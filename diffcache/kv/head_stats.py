"""Offline attention statistics of HACK and ScaleKV and the plans' arithmetic derived from them.

The statistics take one layer's queries and keys at one scale as tensors ``[B, H, n, d]`` /
``[B, H, T, d]`` (queries of the scale's map, keys of the history followed by the map) and work
over query chunks, so a full attention map (Infinity-2B's last scale: 4096 × 10521 per head) is
never held whole (research/var.md §4.5).

* HACK (reconstructed, §2.2.2–2.2.3): :func:`column_variance` at the last scale per (layer,
  head), :func:`variance_table` over the layers; :func:`classify_heads` marks the ``alpha``
  fraction with the lowest variance contextual; :func:`split_budget` and :func:`hack_budget`
  give ``B_C``, ``B_S`` and ``B``.
* ScaleKV (§2.1.1, its profiling code is not released): :func:`selectivity` (the Attention
  Selectivity Index) per (layer, scale), :func:`selectivity_table` over them, :func:`zscore`
  per scale, :func:`drafters` (the ``N_d`` globally lowest pairs) and :func:`scalekv_budgets`
  (Eq. 4).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction

import torch

from diffcache.kv.hack import CONTEXTUAL, STRUCTURAL
from diffcache.kv.history import Schedule


def _attention_chunks(q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int):
    """Softmax attention rows of ``q`` over ``k``, ``chunk`` queries at a time, in fp64."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk}; it must be at least 1")
    kt = k.to(torch.float64).mT
    for i in range(0, q.shape[2], chunk):
        yield (q[:, :, i : i + chunk].to(torch.float64) @ kt * scale).softmax(dim=-1)


def column_variance(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float = 1.0,
    *,
    chunk: int = 256,
    normalise: str = "none",
) -> torch.Tensor:
    """HACK's head statistic ``Σ_j Var_i(A_ij)`` ``[B, H]``: for each key column ``j`` of the
    attention map ``A = softmax(q·kᵀ·scale)``, the variance over the queries ``i`` (population,
    ddof 0), summed over the columns. ``normalise="columns"`` divides by the number of columns
    (the mean instead of the sum: comparable across key lengths). Streams over query chunks with
    the pairwise mean/variance update, so it holds ``chunk`` rows of the map at a time."""
    if normalise not in ("none", "columns"):
        raise ValueError(f"normalise={normalise!r}; choose 'none' or 'columns'")
    count, mean, m2 = 0, None, None
    for a in _attention_chunks(q, k, scale, chunk):
        c = a.shape[2]
        a_mean = a.mean(dim=2)
        a_m2 = (a - a_mean.unsqueeze(2)).square().sum(dim=2)
        if mean is None:
            count, mean, m2 = c, a_mean, a_m2
            continue
        delta, total = a_mean - mean, count + c
        mean = mean + delta * (c / total)
        m2 = m2 + a_m2 + delta.square() * (count * c / total)
        count = total
    out = (m2 / count).sum(dim=-1)
    return out / k.shape[2] if normalise == "columns" else out


def variance_table(
    last_scale: Sequence[tuple[torch.Tensor, torch.Tensor]],
    scale: float = 1.0,
    *,
    chunk: int = 256,
    normalise: str = "none",
) -> torch.Tensor:
    """HACK's ``σ`` ``[L, H]``: :func:`column_variance` of each layer's ``(q, k)`` at the last
    scale, summed over the batch rows (the calibration samples)."""
    rows = [
        column_variance(q, k, scale, chunk=chunk, normalise=normalise).sum(0) for q, k in last_scale
    ]
    return torch.stack(rows)


def classify_heads(
    variance: torch.Tensor, alpha: float, *, ranking: str = "global"
) -> torch.Tensor:
    """Head classes ``[L, H]`` (0 contextual, 1 structural) from the variance table ``[L, H]``:
    the ``round(alpha·L·H)`` heads of lowest variance over all layers are contextual
    (``ranking="global"``, HACK as described), or the ``round(alpha·H)`` lowest of each layer
    (``"layer"``). Ties go to the lower (layer, head) index."""
    if ranking not in ("global", "layer"):
        raise ValueError(f"ranking={ranking!r}; choose 'global' or 'layer'")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}; the contextual fraction must lie in [0, 1]")
    layers, heads = variance.shape
    out = torch.full((layers, heads), STRUCTURAL, dtype=torch.int64, device=variance.device)
    if ranking == "global":
        lowest = torch.sort(variance.flatten(), stable=True).indices[
            : round(alpha * layers * heads)
        ]
        out.view(-1)[lowest] = CONTEXTUAL
    else:
        lowest = torch.sort(variance, dim=1, stable=True).indices[:, : round(alpha * heads)]
        out.scatter_(1, lowest, CONTEXTUAL)
    return out


def split_budget(budget: int, alpha: float, ratio: float) -> tuple[int, int]:
    """``(B_C, B_S)`` with ``B_C/B_S = ratio`` and ``alpha·B_C + (1−alpha)·B_S = budget`` (HACK's
    split; ``alpha`` the contextual fraction of heads, the realised one after rounding).
    Rounded down, ``B_S`` first and ``B_C`` taking what is left, so the average never exceeds
    ``budget``; exact when the numbers allow it."""
    if not 0.0 <= alpha <= 1.0 or ratio <= 0 or budget < 1:
        raise ValueError(
            f"budget={budget}, alpha={alpha}, ratio={ratio}: need budget >= 1, alpha in [0, 1] "
            "and ratio > 0"
        )
    a = Fraction(alpha).limit_denominator(10**6)
    r = Fraction(ratio).limit_denominator(10**6)
    structural = math.floor(budget / (a * r + 1 - a))
    if a == 0:
        return math.floor(r * structural), structural
    return math.floor((budget - (1 - a) * structural) / a), structural


def hack_budget(compression: float, schedule: Schedule, *, reference: str = "final") -> int:
    """HACK's average budget ``B = round((1 − ρ)·T_K)`` for the compression ratio ``ρ``, with
    ``T_K`` the final total length (``reference="final"``) or the history the last scale sees
    (``"history"``): the paper's mapping is not known (research/var.md §2.2.5)."""
    if not 0.0 <= compression < 1.0:
        raise ValueError(f"compression={compression}; the ratio must lie in [0, 1)")
    if reference not in ("final", "history"):
        raise ValueError(f"reference={reference!r}; choose 'final' or 'history'")
    length = schedule.total if reference == "final" else schedule.start(len(schedule) - 1)
    return round((1 - compression) * length)


def selectivity(
    q: torch.Tensor,
    k: torch.Tensor,
    history: int,
    top_k: int,
    scale: float = 1.0,
    *,
    chunk: int = 256,
) -> torch.Tensor:
    """ScaleKV's Attention Selectivity Index ``[B, H]`` of one layer at one scale: the current
    attention ratio ``E_i[Σ_{j∈current} A_ij]`` times the history top-K′ ratio
    ``E_i[sum of the top_k largest A_ij over the history]``, ``A = softmax(q·kᵀ·scale)``, the
    first ``history`` columns of ``k`` the history. The (layer, scale) value is its mean over
    heads and calibration rows. No history (scale 0): 0."""
    if not 0 <= history <= k.shape[2] or top_k < 1:
        raise ValueError(f"history={history}, top_k={top_k} for {k.shape[2]} keys")
    current = torch.zeros(q.shape[:2], dtype=torch.float64, device=q.device)
    top = torch.zeros_like(current)
    for a in _attention_chunks(q, k, scale, chunk):
        current += a[..., history:].sum(dim=-1).sum(dim=-1)
        if history:
            top += a[..., :history].topk(min(top_k, history), dim=-1).values.sum(dim=-1).sum(dim=-1)
    n = q.shape[2]
    return (current / n) * (top / n)


def selectivity_table(
    maps: Mapping[tuple[int, int], tuple[torch.Tensor, torch.Tensor]],
    schedule: Schedule,
    top_k: int,
    scale: float = 1.0,
    *,
    chunk: int = 256,
) -> tuple[torch.Tensor, list[int]]:
    """ScaleKV's ASI table ``[L, K]`` and its scales: ``maps[layer, si]`` is that layer's
    ``(q, k)`` at scale ``si`` (``k`` the whole history then the map); each value is the mean of
    :func:`selectivity` over heads and batch rows. Every layer must be given at every scale."""
    layers = sorted({layer for layer, _ in maps})
    scales = sorted({si for _, si in maps})
    if layers != list(range(len(layers))) or len(maps) != len(layers) * len(scales):
        raise ValueError(
            f"selectivity_table: need layers 0..L-1 at every scale, got {sorted(maps)}"
        )
    table = torch.empty(len(layers), len(scales), dtype=torch.float64)
    for (layer, si), (q, k) in maps.items():
        if k.shape[2] != schedule.start(si + 1) or q.shape[2] != schedule.tokens(si):
            raise ValueError(
                f"selectivity_table: layer {layer} scale {si} has {q.shape[2]} queries and "
                f"{k.shape[2]} keys; the schedule says {schedule.tokens(si)} and "
                f"{schedule.start(si + 1)}"
            )
        asi = selectivity(q, k, schedule.start(si), top_k, scale, chunk=chunk)
        table[layer, scales.index(si)] = asi.mean()
    return table, scales


def zscore(asi: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``Z(l,k) = (ASI(l,k) − μ_k)/(σ_k + eps)`` over the layers of each scale ``k``
    (``asi`` is ``[L, K]``; σ the population standard deviation)."""
    mean = asi.mean(dim=0, keepdim=True)
    std = asi.std(dim=0, correction=0, keepdim=True)
    return (asi - mean) / (std + eps)


def drafters(z: torch.Tensor, n_drafters: int) -> torch.Tensor:
    """The drafter mask ``[L, K]``: the ``n_drafters`` (layer, scale) pairs with the lowest Z over
    the whole table (ties to the lower flat index); the rest are refiners."""
    if not 0 <= n_drafters <= z.numel():
        raise ValueError(f"n_drafters={n_drafters} for a table of {z.numel()} (layer, scale) pairs")
    out = torch.zeros(z.numel(), dtype=torch.bool, device=z.device)
    out[torch.sort(z.flatten(), stable=True).indices[:n_drafters]] = True
    return out.view(z.shape)


def scalekv_budgets(
    roles: torch.Tensor, budget: int, refiner_start: int, delta: int, *, balance: str = "scale"
) -> tuple[list[int], list[int]]:
    """ScaleKV's Eq. 4: per scale ``k`` (the columns of ``roles`` ``[L, K]``, True = drafter) the
    refiner budget ``B_r(k) = refiner_start − delta·k`` and the drafter budget ``B_d(k)`` that
    spends the rest of ``Σ_k N_d^k·B_d(k) + N_r^k·B_r(k) = budget·L·K``. ``balance="scale"`` meets
    the sum at every scale (what the released plan files do), ``"global"`` gives every drafter one
    budget from the pooled rest. Drafter budgets round down. Returns ``(B_d, B_r)`` per scale."""
    if balance not in ("scale", "global"):
        raise ValueError(f"balance={balance!r}; choose 'scale' or 'global'")
    layers, scales = roles.shape
    refiner = [refiner_start - delta * s for s in range(scales)]
    if refiner[-1] < 0:
        raise ValueError(f"refiner_start={refiner_start}, delta={delta}: B_r({scales - 1}) < 0")
    n_d = roles.sum(dim=0).tolist()
    rest = [budget * layers - (layers - n) * r for n, r in zip(n_d, refiner, strict=True)]
    if balance == "global":
        if not sum(n_d):
            raise ValueError("scalekv_budgets: no drafters to give the rest to")
        drafter = [sum(rest) // sum(n_d)] * scales
    elif not all(n_d):
        raise ValueError(f"scalekv_budgets: balance='scale' needs a drafter at every scale: {n_d}")
    else:
        drafter = [r // n for r, n in zip(rest, n_d, strict=True)]
    return drafter, refiner
