"""The profiling statistics' rules that test_hack_stats.py does not reach: the refusals and
their bounds, ties in the rankings, the defaults, exact fractions in the budget arithmetic and
the tables' options. Expectations are hand-computed or plain loops."""

from __future__ import annotations

import re

import pytest
import torch

from diffcache.kv import Schedule
from diffcache.kv.head_stats import (
    classify_heads,
    column_variance,
    drafters,
    hack_budget,
    scalekv_budgets,
    selectivity,
    selectivity_table,
    split_budget,
    variance_table,
    zscore,
)

SCHED = Schedule.square((1, 2, 3))  # 1, 4, 9 tokens


def _refuses(message: str, fn, *args, **kw) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        fn(*args, **kw)


def test_refusals_name_the_values_given():
    q, k = torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 5, 4)
    _refuses("chunk=0; it must be at least 1", column_variance, q, k, chunk=0)
    _refuses(
        "normalise='rows'; choose 'none' or 'columns'", column_variance, q, k, normalise="rows"
    )
    _refuses(
        "ranking='head'; choose 'global' or 'layer'",
        classify_heads,
        torch.zeros(2, 2),
        0.5,
        ranking="head",
    )
    _refuses("n_drafters=5 for a table of 4 (layer, scale) pairs", drafters, torch.zeros(2, 2), 5)
    _refuses("compression=1.0; the ratio must lie in [0, 1)", hack_budget, 1.0, SCHED)
    _refuses(
        "reference='total'; choose 'final' or 'history'", hack_budget, 0.5, SCHED, reference="total"
    )
    _refuses(
        "balance='layer'; choose 'scale' or 'global'",
        scalekv_budgets,
        torch.ones(2, 2, dtype=torch.bool),
        10,
        8,
        1,
        balance="layer",
    )
    _refuses(
        "scalekv_budgets: no drafters to give the rest to",
        scalekv_budgets,
        torch.zeros(2, 2, dtype=torch.bool),
        10,
        8,
        1,
        balance="global",
    )
    _refuses("history=6, top_k=2 for 5 keys", selectivity, q, k, 6, 2)
    _refuses("history=3, top_k=0 for 5 keys", selectivity, q, k, 3, 0)
    _refuses(
        "budget=0, alpha=0.5, ratio=1.0: need budget >= 1, alpha in [0, 1] and ratio > 0",
        split_budget, 0, 0.5, 1.0,
    )  # fmt: skip
    for alpha, ratio in ((1.5, 1.0), (0.5, 0.0)):
        with pytest.raises(ValueError, match=f"alpha={alpha}, ratio={ratio}"):
            split_budget(10, alpha, ratio)


def test_bounds_accept_their_edge_values():
    assert hack_budget(0.0, SCHED) == 14  # no compression: the whole final length
    assert split_budget(1, 1.0, 2.0) == (1, 0)  # every head contextual; a budget of one row
    # history = every key (no current map): no current attention, ASI 0
    q = torch.randn(1, 1, 2, 4, generator=torch.Generator().manual_seed(0))
    assert selectivity(q, torch.randn(1, 1, 5, 4), 5, 2).tolist() == [[0.0]]


def test_split_budget_keeps_exact_fractions():
    """37 contextual heads of 40×32 (alpha 37/1280) and ratio 1.37 = 137/100, exactly:
    B_S = floor(650 / (a·r + 1 − a)) = floor(650·128000 / 129369) = 643 and
    B_C = floor((650 − (1243/1280)·643) / (37/1280)) = floor(32751 / 37) = 885."""
    assert split_budget(650, 37 / 1280, 1.37) == (885, 643)


def test_split_budget_without_contextual_heads_gives_b_c_from_the_ratio():
    assert split_budget(650, 0.0, 1.5) == (975, 650)  # B_S = 650, B_C = 1.5 · 650


def test_scalekv_budgets_check_the_last_refiner_budget_and_allow_zero():
    roles = torch.ones(2, 3, dtype=torch.bool)
    assert scalekv_budgets(roles, 10, 8, 4)[1] == [8, 4, 0]  # B_r(2) = 0 is allowed
    _refuses("refiner_start=8, delta=5: B_r(2) < 0", scalekv_budgets, roles, 10, 8, 5)


def test_scalekv_budgets_round_drafter_budgets_down_to_whole_rows():
    """3 layers, one drafter a scale, average 10: rest = 30 − 2·B_r = 30 − 2·7 = 16 at scale 0
    and 30 − 2·4 = 22 at scale 1; balance "global" splits 38 over 2 drafters."""
    roles = torch.tensor([[True, False], [False, True], [False, False]])
    assert scalekv_budgets(roles, 10, 7, 3) == ([16, 22], [7, 4])
    roles2 = torch.tensor([[True, True], [True, False], [False, False]])  # 2 then 1 drafters
    drafter, _ = scalekv_budgets(roles2, 10, 7, 3)
    assert drafter == [23 // 2, 22] and all(type(d) is int for d in drafter)
    glob, _ = scalekv_budgets(roles2, 10, 7, 3, balance="global")
    assert glob == [(23 + 22) // 3] * 2 and type(glob[0]) is int


def test_rankings_break_ties_by_the_lower_index():
    ties = torch.zeros(2, 32)
    glob = classify_heads(ties, 0.5)
    assert glob.view(-1).tolist() == [0] * 32 + [1] * 32
    assert classify_heads(ties, 0.5, ranking="layer").tolist() == [[0] * 16 + [1] * 16] * 2
    mask = drafters(torch.zeros(4, 16), 20)
    assert mask.dtype == torch.bool and mask.view(-1).tolist() == [True] * 20 + [False] * 44


def _attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> list[list[float]]:
    """One (row, head)'s softmax map by hand."""
    out = []
    for qi in q:
        logits = [float(qi @ kj) * scale for kj in k]
        e = [2.718281828459045 ** (x - max(logits)) for x in logits]
        out.append([x / sum(e) for x in e])
    return out


def test_the_statistics_default_to_a_softmax_scale_of_one():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 3, 4, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 5, 4, generator=g, dtype=torch.float64)
    a = _attention(q[0, 0], k[0, 0], 1.0)
    var = sum(sum((r[j] - sum(x[j] for x in a) / 3) ** 2 for r in a) / 3 for j in range(5))
    assert column_variance(q, k).item() == pytest.approx(var, rel=1e-12)
    current = sum(sum(r[2:]) for r in a) / 3
    top = sum(max(r[:2]) for r in a) / 3
    assert selectivity(q, k, 2, 1).item() == pytest.approx(current * top, rel=1e-12)


def test_the_tables_pass_their_scale_and_normalisation_on():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 1, 9, 4, generator=g, dtype=torch.float64)
    k = torch.randn(2, 1, 14, 4, generator=g, dtype=torch.float64)
    table = variance_table([(q, k)], 0.5, normalise="columns")
    by_row = [column_variance(q[b : b + 1], k[b : b + 1], 0.5).item() / 14 for b in range(2)]
    assert table.item() == pytest.approx(sum(by_row), rel=1e-12)
    asi, scales = selectivity_table({(0, 2): (q, k)}, SCHED, top_k=2, scale=0.5)
    rows = [selectivity(q[b : b + 1], k[b : b + 1], 5, 2, 0.5).item() for b in range(2)]
    assert scales == [2] and asi.item() == pytest.approx(sum(rows) / 2, rel=1e-12)


def test_a_table_entry_of_the_wrong_length_is_refused_naming_both_counts():
    q, k = torch.zeros(1, 1, 9, 4), torch.zeros(1, 1, 13, 4)  # the keys one short
    message = (
        "selectivity_table: layer 0 scale 2 has 9 queries and 13 keys; the schedule says 9 and 14"
    )
    _refuses(message, selectivity_table, {(0, 2): (q, k)}, SCHED, 2)


def test_zscore_adds_its_default_eps_to_each_scales_deviation():
    """Scale 0 of [0, 2]: mean 1, population std 1, so Z = ±1 / (1 + 1e-6)."""
    z = zscore(torch.tensor([[0.0], [2.0]], dtype=torch.float64))
    assert z.flatten().tolist() == pytest.approx([-1 / (1 + 1e-6), 1 / (1 + 1e-6)], rel=1e-12)
