"""HACK's head-aware KV selection for next-scale models, reconstructed (variant "reconstructed").

HACK ("Head-Aware KV Cache Compression for Efficient Visual Autoregressive Modeling", Qin et al.,
arXiv 2504.09261, AAAI 2026) splits every layer's heads, by an offline profile, into *contextual*
heads (vertical attention stripes: every query reads the same few keys) and *structural* heads
(diagonal patterns: which key is read depends on the query's position), gives them asymmetric
budgets ``B_C`` and ``B_S`` (``alpha·B_C + (1−alpha)·B_S = B``, ``alpha`` the contextual fraction)
and selects each class's rows by its own rule:

* contextual: the top-``B_C`` rows by *subset attention*, the softmax attention of ``N_obs``
  uniformly sampled queries of the new map, summed over those queries;
* structural: the rows of the first scales and of the most recent scale always, the remaining
  ``B_S − mandatory`` slots filled from the other rows by subset attention;
* at the last scale, the contextual heads' evicted rows are merged into the kept ones (LOOK-M's
  pivot merge) instead of being dropped.

HACK's code is not public: this is the reconstruction of research/var.md §2.2.3, and every open
question of §2.2.5 is a field of :class:`HACKOptions` (defaults in brackets, with the reason):

* ``when`` ["pre"]: select before the scale's attention over history + the new map's rows, so
  the queries attend to at most the budget (the paper's O(Bn²) claim needs that); "post"
  selects after, like ScaleKV.
* budgets ``B_C``/``B_S`` are given; :func:`diffcache.kv.head_stats.split_budget` derives them
  from ``B``, ``alpha`` and the ratio ``B_C/B_S``, and :func:`~diffcache.kv.head_stats.hack_budget`
  maps the compression ratio to ``B`` against the final total length or the history length.
* ``first_scales`` [2]: ``N_init`` = the tokens of the first scales ("the first two scales").
* ``recent`` ["current"]: the most recent scale is the new map (§2.2.3's pseudo-code) or the
  previous one; ``recent_cap`` [None: the whole map] caps ``N_k`` to the map's last tokens.
* ``n_obs`` [32] and ``sampling`` ["stride"]: the subset queries, a regular stride
  ``i·n // n_obs`` (deterministic, no RNG) or "random": a permutation drawn from a
  ``torch.Generator`` of its own, seeded by ``seed`` and the (layer, scale), so the sampler's
  stream never moves and the draw does not depend on call order.
* ``softmax_over`` ["all"]: the subset softmax over every row (§2.2.3) or over the candidate rows
  only (the mandatory rows masked out).
* ``merge`` ["pivot"], ``merge_heads`` ["contextual"], ``merge_at`` ["last"]: LOOK-M's pivot merge
  (each evicted row averaged into the kept row whose key is most cosine-similar), on which
  heads, at the last selection a query reads ("last": the last scale when "pre", the one
  before it when "post") or at every compression. LOOK-M's reference concatenates keys
  and values in different orders (a K/V row misalignment); here K and V rows are merged with
  one assignment.
* ``scope`` ["pair"]: with CFG, the conditional and unconditional rows of an image keep the same
  rows (their scores summed), or "row": each row selects on its own.
* the classification's normalisation ["none": the plain sum over columns, as described] is an
  option of :func:`~diffcache.kv.head_stats.column_variance`, its ranking ["global", as
  described; or per layer] of :func:`~diffcache.kv.head_stats.classify_heads`.
* ``start_scale`` [0]: no compression before this scale; from it on, a group compresses whenever
  its rows exceed its budget.

Rows are named by their position in the generation (:class:`~diffcache.kv.history.Schedule`);
the store owns them and hands them over in ``ScaleCall.positions``: the selection keeps no state
between calls.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from diffcache.kernels import kv_compact, take_rows
from diffcache.kv.history import ScaleCall, Schedule

CONTEXTUAL, STRUCTURAL = 0, 1
_CHOICES = {
    "when": ("pre", "post"),
    "recent": ("current", "previous"),
    "sampling": ("stride", "random"),
    "softmax_over": ("all", "candidates"),
    "merge": ("none", "pivot"),
    "merge_heads": ("contextual", "structural", "all"),
    "merge_at": ("last", "every"),
    "scope": ("pair", "row"),
}
_MERGE_KINDS = {"contextual": (CONTEXTUAL,), "structural": (STRUCTURAL,), "all": (0, 1)}


@dataclasses.dataclass(frozen=True)
class HACKOptions:
    """The reconstruction's answers to research/var.md §2.2.5, one field each (the module
    docstring says what each means and why its default); a plan records them as they are."""

    when: str = "pre"
    first_scales: int = 2
    recent: str = "current"
    recent_cap: int | None = None
    n_obs: int = 32
    sampling: str = "stride"
    seed: int = 0
    softmax_over: str = "all"
    merge: str = "pivot"
    merge_heads: str = "contextual"
    merge_at: str = "last"
    scope: str = "pair"
    start_scale: int = 0

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"hack: {name}={getattr(self, name)!r}; choose one of {allowed}")
        least = {"first_scales": 0, "start_scale": 0, "n_obs": 1, "recent_cap": 1}
        for name, low in least.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"hack: {name}={value}; it must be at least {low}")


@dataclasses.dataclass(frozen=True)
class _Group:
    """One head group of a layer as the selection runs it, its masks made once: ``heads`` (the
    layer's), their ``classes``, the rows it keeps (``budget``); ``structural`` ``[Hg, 1]``
    marks the heads that keep mandatory rows and ``merging`` indexes the heads whose evicted
    rows are merged, each None where the group's heads all do or none does."""

    heads: list[int]
    classes: tuple[int, ...]
    budget: int
    structural: torch.Tensor | None
    merging: torch.Tensor | None


def _layer_groups(
    row: list[int], budgets: dict[int, int], merging: tuple[int, ...]
) -> list[_Group]:
    """A layer's head groups (its heads' classes ``row``): all heads in one where both classes
    keep as many rows, else the contextual heads, then the structural ones."""
    if budgets[CONTEXTUAL] == budgets[STRUCTURAL]:
        parts = [list(range(len(row)))]
    else:
        parts = [
            g for c in (CONTEXTUAL, STRUCTURAL) if (g := [h for h, x in enumerate(row) if x == c])
        ]
    groups = []
    for heads in parts:
        classes = tuple(row[h] for h in heads)
        structural = [c == STRUCTURAL for c in classes]
        merged = [j for j, c in enumerate(classes) if c in merging]
        groups.append(
            _Group(
                heads,
                classes,
                budgets[classes[0]],
                None if len(set(structural)) == 1 else torch.tensor(structural)[:, None],
                None if len(merged) in (0, len(heads)) else torch.tensor(merged),
            )
        )
    return groups


class HACKSelection:
    """HACK (reconstructed) as a :class:`~diffcache.kv.history.Selection`: per layer contextual
    and structural heads (``classes[l][h]``: 0 contextual, 1 structural), budgets
    ``budget_contextual`` (B_C) and ``budget_structural`` (B_S) rows per head, the open
    questions answered by ``options``. With ``B_C = B_S`` a layer's heads are one group, its
    contextual heads' rows masked out of the mandatory set (one score, top-k and compaction per
    layer); else a contextual and a structural group, selected one after the other."""

    variant = "reconstructed"

    def __init__(
        self,
        classes: Sequence[Sequence[int]] | torch.Tensor,
        budget_contextual: int,
        budget_structural: int,
        options: HACKOptions | None = None,
    ) -> None:
        table = torch.as_tensor(classes, dtype=torch.int64)
        if table.ndim != 2 or not bool(((table == CONTEXTUAL) | (table == STRUCTURAL)).all()):
            raise ValueError("hack: classes must be a layers x heads table of 0 (contextual) / 1")
        if budget_contextual < 1 or budget_structural < 1:
            raise ValueError(
                f"hack: budget_contextual={budget_contextual}, budget_structural="
                f"{budget_structural}; both must be at least 1 row"
            )
        self.classes = table
        self.budgets = {CONTEXTUAL: int(budget_contextual), STRUCTURAL: int(budget_structural)}
        self.options = options or HACKOptions()
        self.when = self.options.when
        merging = _MERGE_KINDS[self.options.merge_heads]
        self._by_layer = [_layer_groups(row, self.budgets, merging) for row in table.tolist()]

    # -- the Selection protocol -------------------------------------------------------------

    def groups(self, layer: int, heads: int) -> list[list[int]]:
        """One group of all the layer's heads where ``B_C = B_S`` (both classes keep as many rows:
        one dense tensor, scored, selected and compacted in one pass); else its contextual
        heads, then its structural heads (empty groups left out)."""
        return [g.heads for g in self._groups(layer, heads)]

    def keep(
        self, call: ScaleCall, group: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor | None:
        batch, heads, rows, _ = k.shape
        budget = self.budget(call, group, rows)
        if budget is None or rows <= budget:
            return None
        positions = self._row_positions(call, k)
        mandatory = None  # contextual heads have none
        g = self._group(call.layer, group)
        if STRUCTURAL in g.classes:
            mandatory = self._mandatory(call, positions)
            if g.structural is not None:  # a group of both classes: its contextual heads
                mandatory = mandatory & g.structural.to(k.device)  # have none
            if self._mandatory_count(call.schedule, call.si) > budget:  # an upper bound: the
                worst = int(mandatory.sum(-1).max())  # exact count (a host sync) only then
                if worst > budget:
                    raise ValueError(self._too_small(call.schedule, call.si, worst))
        scores = self._subset_attention(call, q, k, mandatory)
        if mandatory is not None:
            scores = scores.masked_fill(mandatory, float("inf"))
        if self.options.scope == "pair" and call.cond_rows < batch:
            c = _pair_rows(call, batch)
            paired = scores[:c] + scores[c:]
            keep = paired.topk(budget, dim=-1).indices.sort(dim=-1).values.repeat(2, 1, 1)
        else:
            keep = scores.topk(budget, dim=-1).indices.sort(dim=-1).values
        return keep

    def budget(self, call: ScaleCall, group: int, length: int) -> int | None:
        """Rows ``group`` keeps at most after this call: its head class's budget; None (no
        compression) before ``start_scale``."""
        if call.si < self.options.start_scale:
            return None
        return self._group(call.layer, group).budget

    # -- the merge at the last scale ---------------------------------------------------------

    def merge(
        self, call: ScaleCall, group: int, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The kept rows ``keep`` of ``k``/``v`` with the evicted rows merged into them on the
        group's heads where the merge applies (:meth:`merges`): each evicted row is averaged,
        K and V alike, into the kept row whose key is most cosine-similar to its key (LOOK-M
        pivot); None where it applies to none of them or nothing is evicted (the store compacts
        the kept rows itself)."""
        if not self.merges(call, group) or keep.shape[-1] == k.shape[2]:
            return None
        heads = self._group(call.layer, group).merging
        if heads is None:  # every head of the group merges
            return _pivot_merge(k, v, keep)
        kept_k, kept_v = kv_compact(  # the store's compaction, for the heads that do not merge
            k, v, k[:, :, :0], v[:, :, :0], keep, backend=call.kernels, record=call.record
        )
        heads = heads.to(k.device)
        merged_k, merged_v = _pivot_merge(*(t.index_select(1, heads) for t in (k, v, keep)))
        return kept_k.index_copy_(1, heads, merged_k), kept_v.index_copy_(1, heads, merged_v)

    def merges(self, call: ScaleCall, group: int) -> bool:
        """Whether :meth:`merge` merges (rather than only gathers) for this call and some head
        of the group: ``merge_at="last"`` is the last selection some query reads (the last
        scale when ``when="pre"``, the one before it when ``"post"``)."""
        o = self.options
        last = len(call.schedule) - (1 if o.when == "pre" else 2)
        if o.merge == "none" or (o.merge_at == "last" and call.si != last):
            return False
        kinds = _MERGE_KINDS[o.merge_heads]
        return any(c in kinds for c in self._group(call.layer, group).classes)

    # -- checks and helpers ------------------------------------------------------------------

    def validate(self, schedule: Schedule, layers: int, heads: int) -> None:
        """Refuse, before any work, a class table that does not match the model or a structural
        budget below the rows it must keep at a scale where it could compress (an upper bound
        when ``when="pre"`` and ``recent="previous"``: that scale's rows were candidates)."""
        if tuple(self.classes.shape) != (layers, heads):
            raise ValueError(
                f"hack: the head classes are {tuple(self.classes.shape)} (layers x heads) but "
                f"the model has {layers} layers x {heads} heads"
            )
        if not bool((self.classes == STRUCTURAL).any()):
            return
        budget = self.budgets[STRUCTURAL]
        for si in range(self.options.start_scale, len(schedule)):
            need = self._mandatory_count(schedule, si)
            if schedule.start(si + 1) > budget and need > budget:
                raise ValueError(self._too_small(schedule, si, need))

    def check(self, schedule: Schedule, layers: int) -> None:
        """:meth:`validate` with the heads of the class table (the budgeted store's hook)."""
        self.validate(schedule, layers, self.classes.shape[1])

    def _groups(self, layer: int, heads: int) -> list[_Group]:
        if heads != self.classes.shape[1] or not 0 <= layer < self.classes.shape[0]:
            raise ValueError(
                f"hack: layer {layer} with {heads} heads is outside the head classes "
                f"{tuple(self.classes.shape)} (layers x heads)"
            )
        return self._by_layer[layer]

    def _group(self, layer: int, group: int) -> _Group:
        return self._groups(layer, self.classes.shape[1])[group]

    def _row_positions(self, call: ScaleCall, k: torch.Tensor) -> torch.Tensor:
        """The generation positions of ``k``'s rows, as the store hands them over
        (``ScaleCall.positions``)."""
        pos = call.positions
        if pos is None or tuple(pos.shape) != tuple(k.shape[:3]):
            got = None if pos is None else list(pos.shape)
            raise ValueError(
                f"hack: layer {call.layer} at scale {call.si} needs the rows' positions "
                f"{list(k.shape[:3])} in ScaleCall.positions (a budgeted store sets them), "
                f"got {got}"
            )
        return pos.to(k.device)

    def _recent_span(self, schedule: Schedule, si: int) -> tuple[int, int]:
        """The positions ``[lo, hi)`` of the most recent scale's mandatory rows (empty if none):
        the whole map, or its last ``recent_cap`` tokens."""
        recent = si if self.options.recent == "current" else si - 1
        if recent < 0:
            return 0, 0
        lo, hi = schedule.start(recent), schedule.start(recent + 1)
        cap = self.options.recent_cap
        return (lo if cap is None else max(lo, hi - cap)), hi

    def _mandatory(self, call: ScaleCall, positions: torch.Tensor) -> torch.Tensor:
        """The rows structural heads must keep: the first scales and the most recent scale."""
        sched = call.schedule
        lo, hi = self._recent_span(sched, call.si)
        first = positions < sched.start(min(self.options.first_scales, len(sched)))
        return first | ((positions >= lo) & (positions < hi))

    def _mandatory_count(self, schedule: Schedule, si: int) -> int:
        first = schedule.start(min(self.options.first_scales, si + 1))
        lo, hi = self._recent_span(schedule, si)
        return first + max(0, hi - max(lo, first))

    def _too_small(self, schedule: Schedule, si: int, need: int) -> str:
        o = self.options
        return (
            f"hack: budget_structural={self.budgets[STRUCTURAL]} is below the {need} rows "
            f"structural heads must keep at scale {si} of {list(schedule.sizes)} (first_scales="
            f"{o.first_scales}, recent={o.recent!r}, recent_cap={o.recent_cap}); raise the budget"
        )

    def observed_queries(self, call: ScaleCall, n: int) -> torch.Tensor:
        """The indices of the ``n_obs`` queries (of the new map's ``n``) the subset attention
        uses, ascending; "random" draws them from a generator seeded with
        ``seed·1000003 + layer·scales + si``."""
        o = self.options
        if n <= o.n_obs or o.sampling == "stride":
            return _strided(n, o.n_obs)
        salt = call.layer * len(call.schedule) + call.si
        gen = torch.Generator().manual_seed(o.seed * 1_000_003 + salt)
        return torch.randperm(n, generator=gen)[: o.n_obs].sort().values

    def _subset_attention(
        self, call: ScaleCall, q: torch.Tensor, k: torch.Tensor, mandatory: torch.Tensor | None
    ) -> torch.Tensor:
        """``Σ_{i∈obs} softmax(q_i·Kᵀ·scale)`` per row of ``k`` ``[B, Hg, L]`` (fp32 or wider);
        ``mandatory`` rows (None: none) masked out of the softmax with "candidates"."""
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), torch.float32)
        obs = self.observed_queries(call, q.shape[2]).to(q.device)
        logits = q.index_select(2, obs).to(dtype) @ k.to(dtype).mT * call.scale
        if mandatory is not None and self.options.softmax_over == "candidates":
            logits = logits.masked_fill(mandatory.unsqueeze(2), float("-inf"))
        return logits.softmax(dim=-1).sum(dim=2)


@functools.lru_cache(maxsize=256)
def _strided(n: int, n_obs: int) -> torch.Tensor:
    """``i·n // n_obs`` for ``i < n_obs`` (every query when ``n <= n_obs``), made once per
    ``(n, n_obs)`` (never written to)."""
    return torch.arange(n) if n <= n_obs else torch.arange(n_obs) * n // n_obs


def _pivot_merge(
    k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept rows ``keep`` ``[B, H, m]`` of ``k``/``v`` with every other row averaged, K and V
    alike, into the kept row whose key is most cosine-similar to its key (LOOK-M pivot)."""
    kept_k, kept_v = take_rows(k, keep), take_rows(v, keep)
    evicted = torch.ones(k.shape[:3], dtype=torch.bool, device=k.device)
    evicted.scatter_(2, keep, False)
    gone = torch.arange(k.shape[2], device=k.device).expand(k.shape[:3])[evicted]
    gone = gone.view(*k.shape[:2], -1)
    gone_k, gone_v = take_rows(k, gone), take_rows(v, gone)
    pivot = _most_similar(gone_k, kept_k)
    return _mean_into(kept_k, pivot, gone_k), _mean_into(kept_v, pivot, gone_v)


def _mean_into(kept: torch.Tensor, pivot: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Each kept row ``[B, H, m, d]`` averaged with the ``rows`` ``[B, H, E, d]`` whose ``pivot``
    ``[B, H, E]`` names it: ``kept.scatter_reduce(2, pivot, rows, "mean", include_self=True)``
    with the rows flattened: one ``index_add`` (whole rows, not element by element) and an
    exact count per kept row."""
    b, h, m, d = kept.shape
    flat = (pivot + torch.arange(0, b * h * m, m, device=pivot.device).view(b, h, 1)).view(-1)
    total = kept.reshape(-1, d).index_add(0, flat, rows.reshape(-1, d))
    count = torch.bincount(flat, minlength=b * h * m).add_(1)
    return (total / count[:, None].to(kept.dtype)).view(b, h, m, d)


def _most_similar(rows: torch.Tensor, pool: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """For each of ``rows`` ``[B, H, E, d]`` the index of its most cosine-similar row of ``pool``
    ``[B, H, m, d]``, ``chunk`` rows at a time (the last scale's E × m map is large)."""
    wide = torch.promote_types(rows.dtype, torch.float32)
    pool = F.normalize(pool.to(wide), dim=-1).mT
    parts = [
        (F.normalize(rows[:, :, i : i + chunk].to(wide), dim=-1) @ pool).argmax(-1)
        for i in range(0, rows.shape[2], chunk)
    ]
    return torch.cat(parts, dim=2)


def _pair_rows(call: ScaleCall, batch: int) -> int:
    if batch != 2 * call.cond_rows:
        raise ValueError(
            f"hack: scope='pair' needs the batch to be conditional rows then as many "
            f"unconditional ones; got {batch} rows with cond_rows={call.cond_rows}"
        )
    return call.cond_rows


def head_order(classes: Sequence[Sequence[int]] | torch.Tensor) -> torch.Tensor:
    """Per layer, the head permutation that puts the contextual heads first, then the
    structural ones, each in their original order (HACK's static head reordering)."""
    table = torch.as_tensor(classes, dtype=torch.int64)
    return torch.sort(table, dim=1, stable=True).indices


def permute_heads(
    state: dict[str, torch.Tensor], perm: Sequence[int] | torch.Tensor, heads: int
) -> dict[str, torch.Tensor]:
    """A VAR/Infinity self-attention state dict with its heads reordered: new head ``j`` is old
    head ``perm[j]``. Permutes the q, k and v blocks of ``mat_qkv.weight`` (and of a
    ``mat_qkv.bias``), ``q_bias``, ``v_bias``, ``zero_k_bias``, ``scale_mul_1H11`` and the input
    columns of ``proj.weight``; the attention's output is unchanged."""
    perm = torch.as_tensor(perm, dtype=torch.int64)
    if sorted(perm.tolist()) != list(range(heads)):
        raise ValueError(f"permute_heads: {perm.tolist()} is not a permutation of {heads} heads")
    out = dict(state)
    width = state["proj.weight"].shape[1]
    channels = (perm[:, None] * (width // heads) + torch.arange(width // heads)).reshape(-1)
    qkv = torch.cat([channels + i * width for i in range(3)])
    for name in ("mat_qkv.weight", "mat_qkv.bias"):
        if name in state:
            out[name] = state[name][qkv]
    for name in ("q_bias", "v_bias", "zero_k_bias"):
        if name in state:
            out[name] = state[name][channels]
    out["scale_mul_1H11"] = state["scale_mul_1H11"][:, perm]
    out["proj.weight"] = state["proj.weight"][:, channels]
    return out
