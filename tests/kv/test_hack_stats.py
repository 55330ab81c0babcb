"""Offline head statistics of HACK and ScaleKV (research/var.md §2.1.1, §2.2.2, §3.2 items 9,
14) against whole-map computations, analytic values and the released ScaleKV plan numbers."""

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


def full_map(q, k, scale):
    return (q.double() @ k.double().mT * scale).softmax(dim=-1)


def test_column_variance_streams_to_the_whole_map_value():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 23, 8, generator=gen)
    k = torch.randn(2, 3, 31, 8, generator=gen)
    expect = full_map(q, k, 0.5).var(dim=2, correction=0).sum(dim=-1)  # [B, H]
    for chunk in (1, 5, 23, 100):  # uneven chunks, one chunk, more than the queries
        got = column_variance(q, k, 0.5, chunk=chunk)
        assert torch.allclose(got, expect, rtol=1e-10, atol=0)
    assert torch.allclose(column_variance(q, k, 0.5, chunk=4, normalise="columns"), expect / 31)


def test_vertical_stripes_score_lower_variance_than_a_diagonal():
    n, sharp = 8, 30.0
    keys = torch.eye(n).expand(1, 1, n, n)
    diagonal = sharp * torch.eye(n).expand(1, 1, n, n)  # query i reads key i
    stripes = torch.zeros(1, 1, n, n)
    stripes[..., [0, 3]] = sharp  # every query reads keys 0 and 3
    var_diag = column_variance(diagonal, keys, chunk=3).item()
    var_stripe = column_variance(stripes, keys, chunk=3).item()
    # a one-hot diagonal: each column holds one 1 among n queries, variance (1/n)(1 - 1/n)
    assert var_diag == pytest.approx(n * (1 / n) * (1 - 1 / n), abs=1e-9)
    assert var_stripe == pytest.approx(0.0, abs=1e-20)  # identical rows
    assert var_stripe < var_diag


def test_classification_counts_and_global_versus_layer_ranking():
    variance = torch.tensor([[0.1, 0.2, 0.9, 0.8], [0.7, 0.6, 0.5, 0.3], [0.95, 0.4, 0.85, 0.99]])
    glob = classify_heads(variance, alpha=0.5)
    assert int((glob == 0).sum()) == round(0.5 * 3 * 4)
    # the six lowest: 0.1, 0.2, 0.3, 0.4, 0.5, 0.6
    assert glob.tolist() == [[0, 0, 1, 1], [1, 0, 0, 0], [1, 0, 1, 1]]
    per_layer = classify_heads(variance, alpha=0.5, ranking="layer")
    assert per_layer.tolist() == [[0, 0, 1, 1], [1, 1, 0, 0], [1, 0, 0, 1]]
    for alpha in (0.0, 0.25, 0.4, 1.0):
        assert int((classify_heads(variance, alpha) == 0).sum()) == round(alpha * 12)
    with pytest.raises(ValueError, match="alpha=1.5"):
        classify_heads(variance, 1.5)


def test_hack_budget_arithmetic():
    var256 = Schedule.square((1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    assert hack_budget(0.5, var256) == 340  # (1 - 0.5) * 680
    assert hack_budget(0.5, var256, reference="history") == 212  # (1 - 0.5) * 424
    assert hack_budget(0.7, var256) == 204
    b_c, b_s = split_budget(340, alpha=0.5, ratio=1 / 3)
    assert (b_c, b_s) == (170, 510)
    assert 0.5 * b_c + 0.5 * b_s == 340 and b_c * 3 == b_s
    for budget, alpha, ratio in (
        (340, 0.3, 0.1),
        (1000, 0.25, 0.2),
        (97, 0.6, 0.5),
        (50, 0.0, 0.1),
    ):
        b_c, b_s = split_budget(budget, alpha, ratio)
        avg = alpha * b_c + (1 - alpha) * b_s
        assert budget - 1 < avg <= budget, (budget, alpha, ratio, b_c, b_s)
        assert abs(b_c - ratio * b_s) <= 1 / max(alpha, 1e-9) + ratio
    assert split_budget(400, alpha=0.25, ratio=0.2) == (100, 500)  # 25 + 375 = 400


def test_selectivity_on_uniform_and_concentrated_maps():
    history, current, d = 12, 4, 6
    k = torch.randn(1, 2, history + current, d, generator=torch.Generator().manual_seed(1))
    uniform = torch.zeros(1, 2, current, d)  # q = 0: every key gets 1/T
    t = history + current
    for top in (1, 3, 50):
        expect = (current / t) * (min(top, history) / t)
        got = selectivity(uniform, k, history, top, chunk=3)
        assert torch.allclose(got, torch.full((1, 2), expect, dtype=torch.float64))
    # keys one-hot. Query i splits its mass between its own current key and history key 0
    # (a refiner: 1/2 * 1/2); spreading it evenly over the history gives ~0 current mass
    keys = torch.eye(t).expand(1, 1, t, t)
    focused = torch.eye(t)[history:].clone()
    focused[:, 0] = 1.0
    spread = torch.zeros(current, t)
    spread[:, :history] = 1.0
    asi_focused = selectivity(40.0 * focused.expand(1, 1, current, t), keys, history, 3).item()
    asi_spread = selectivity(40.0 * spread.expand(1, 1, current, t), keys, history, 3).item()
    assert asi_focused == pytest.approx(0.25, abs=1e-12)
    assert asi_spread == pytest.approx(0.0, abs=1e-12)
    assert asi_focused > asi_spread
    # random inputs: the two factors of the whole map
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 3, 9, d, generator=gen), torch.randn(2, 3, 20, d, generator=gen)
    a = full_map(q, k, 0.8)
    expect = a[..., 11:].sum(-1).mean(-1) * a[..., :11].topk(4, dim=-1).values.sum(-1).mean(-1)
    assert torch.allclose(selectivity(q, k, 11, 4, 0.8, chunk=2), expect, rtol=1e-12, atol=0)
    assert torch.equal(selectivity(q, k, 0, 4), torch.zeros(2, 3, dtype=torch.float64))


def test_zscore_is_per_scale_and_drafters_are_the_global_lowest():
    asi = torch.tensor([[1.0, 2.0, 10.0], [3.0, 6.0, 10.0], [2.0, 4.0, 10.0]])
    z = zscore(asi, eps=0.0 + 1e-12)
    # column 0: mean 2, std sqrt(2/3); column 1: mean 4, std sqrt(8/3); column 2 constant
    s0, s1 = (2 / 3) ** 0.5, (8 / 3) ** 0.5
    expect = torch.tensor([[-1 / s0, -2 / s1, 0.0], [1 / s0, 2 / s1, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(z, expect, atol=1e-9)
    zz = torch.tensor([[0.5, -2.0, 0.1], [-1.0, 0.3, 2.0], [1.5, -0.2, -3.0]])
    assert drafters(zz, 3).tolist() == [
        [False, True, False],
        [True, False, False],
        [False, False, True],
    ]
    assert int(drafters(zz, 0).sum()) == 0 and bool(drafters(zz, 9).all())


def test_eq4_budgets_reproduce_the_released_scalekv_plan():
    # Infinity-2B 10%: blocks 0 and 23 draft at "Scale 9" and "Scale 10", refiners 632 then 594,
    # average 650; the released plan's drafter budgets are 920 and 1490 (research/var.md 2.1.4).
    roles = torch.zeros(32, 2, dtype=torch.bool)
    roles[[0, 23]] = True
    drafter, refiner = scalekv_budgets(roles, budget=650, refiner_start=632, delta=38)
    assert (drafter, refiner) == ([920, 1490], [632, 594])
    for s in range(2):
        assert 2 * drafter[s] + 30 * refiner[s] == 32 * 650
    pooled, _ = scalekv_budgets(roles, 650, 632, 38, balance="global")
    assert pooled == [(32 * 650 * 2 - 30 * (632 + 594)) // 4] * 2
    with pytest.raises(ValueError, match=r"B_r\(1\) < 0"):
        scalekv_budgets(roles, 650, 30, 40)
    roles[:, 1] = False
    with pytest.raises(ValueError, match="a drafter at every scale"):
        scalekv_budgets(roles, 650, 632, 38)


def asi_of_map(a, history, top_k):
    """ASI of a whole attention map [B, H, n, T], averaged over rows and heads."""
    current = a[..., history:].sum(-1).mean(-1)
    top = a[..., :history].topk(min(top_k, history), dim=-1).values.sum(-1).mean(-1)
    return (current * top).mean()


def test_tables_over_layers_and_scales():
    gen = torch.Generator().manual_seed(4)
    sched = Schedule.square((1, 2, 3))  # 1, 4, 9 tokens
    last = [
        (torch.randn(2, 3, 9, 4, generator=gen), torch.randn(2, 3, 14, 4, generator=gen))
        for _ in range(2)
    ]
    expect = torch.stack([full_map(q, k, 1.0).var(2, correction=0).sum(-1).sum(0) for q, k in last])
    assert torch.allclose(variance_table(last, chunk=4), expect, rtol=1e-10, atol=0)
    maps = {}
    for layer in range(2):
        for si in (1, 2):
            q = torch.randn(2, 3, sched.tokens(si), 4, generator=gen)
            maps[layer, si] = (q, torch.randn(2, 3, sched.start(si + 1), 4, generator=gen))
    table, scales = selectivity_table(maps, sched, top_k=2, chunk=3)
    assert scales == [1, 2] and table.shape == (2, 2)
    for (layer, si), (q, k) in maps.items():
        want = asi_of_map(full_map(q, k, 1.0), sched.start(si), 2)
        assert torch.allclose(table[layer, scales.index(si)], want, rtol=1e-12, atol=0)
    del maps[1, 2]
    with pytest.raises(ValueError, match="every scale"):
        selectivity_table(maps, sched, top_k=2)
    maps[1, 2] = maps[1, 1]
    with pytest.raises(ValueError, match="layer 1 scale 2 has 4 queries and 5 keys"):
        selectivity_table(maps, sched, top_k=2)
