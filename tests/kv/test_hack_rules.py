"""HACK's (reconstructed) rules that test_hack_select.py does not reach: option and class-table
refusals, ``check`` (the store's hook) with ``start_scale`` and one-class tables, the mandatory
first map when ``first_scales=0``, ``merge`` where nothing is evicted and its compaction's
kernel record, the pivot search's precision, ``head_order`` on many tied heads and
``permute_heads`` on every per-head tensor. Expectations are hand-computed or plain loops."""

from __future__ import annotations

import pytest
import torch

from diffcache.kv import ScaleCall, Schedule
from diffcache.kv.hack import HACKOptions, HACKSelection, _most_similar, head_order, permute_heads
from diffcache.testing.kernels import needs_interpreter

SCHED = Schedule.square((1, 2, 3, 4, 5))  # 1, 4, 9, 16, 25 tokens


# ---- refusals and their messages (a plan's options and class table) ----


def test_option_bounds_accept_their_least_value_and_refuse_below_it():
    HACKOptions(first_scales=0, start_scale=0, n_obs=1, recent_cap=1)
    for name, value, least in (("first_scales", -1, 0), ("n_obs", 0, 1), ("recent_cap", 0, 1)):
        message = f"^hack: {name}={value}; it must be at least {least}$"
        with pytest.raises(ValueError, match=message):
            HACKOptions(**{name: value})


@pytest.mark.parametrize("classes", [[0, 1, 1], [[0, 2], [1, 0]]])
def test_a_class_table_that_is_not_layers_x_heads_of_0_1_is_refused(classes):
    message = r"^hack: classes must be a layers x heads table of 0 \(contextual\) / 1$"
    with pytest.raises(ValueError, match=message):
        HACKSelection(classes, 4, 8)


def test_budgets_of_one_row_are_allowed_and_of_zero_refused_naming_both():
    HACKSelection([[0, 0]], 1, 1)
    for bc, bs in ((0, 8), (8, 0)):
        message = f"^hack: budget_contextual={bc}, budget_structural={bs}; both must be at least 1"
        with pytest.raises(ValueError, match=message):
            HACKSelection([[0, 1]], bc, bs)


def test_scope_pair_refuses_a_batch_that_is_not_cond_then_uncond_rows():
    sel = HACKSelection([[0]], 2, 2)
    call = ScaleCall(layer=0, si=1, schedule=SCHED, cond_rows=1, positions=torch.zeros(3, 1, 5))
    k = torch.randn(3, 1, 5, 4)
    message = (
        "hack: scope='pair' needs the batch to be conditional rows then as many unconditional "
        "ones; got 3 rows with cond_rows=1"
    )
    with pytest.raises(ValueError, match=f"^{message}$"):
        sel.keep(call, 0, k[:, :, -4:], k, k)


# ---- check: the store's hook ----


def test_check_matches_the_class_table_and_only_checks_the_scales_it_compresses():
    """Maps of 1, 4, 25, 1, 1 tokens: structural heads keep 5 first-scale rows plus the current
    map, 30 rows at scale 2 but 6 at scales 3 and 4."""
    bumpy = Schedule(((1, 1), (2, 2), (5, 5), (1, 1), (1, 1)))
    HACKSelection([[0, 1]], 4, 20, HACKOptions(start_scale=3)).check(bumpy, layers=1)
    with pytest.raises(ValueError, match="budget_structural=20 is below the 30 rows .* scale 2"):
        HACKSelection([[0, 1]], 4, 20).check(bumpy, layers=1)
    with pytest.raises(ValueError, match=r"are \(1, 2\) .* model has 2 layers x 2 heads"):
        HACKSelection([[0, 1]], 4, 30).check(bumpy, layers=2)


def test_only_structural_heads_need_their_mandatory_rows_to_fit():
    HACKSelection([[0, 0]], 4, 1).check(SCHED, layers=1)  # no structural head: B_S unused
    with pytest.raises(ValueError, match="budget_structural=1 is below the 5 rows"):
        HACKSelection([[1, 1]], 4, 1).check(SCHED, layers=1)


# ---- selection and merge ----


def test_without_first_scales_the_previous_map_is_still_kept():
    """``first_scales=0``, ``recent="previous"`` at scale 1: the structural head must keep the
    previous map (position 0) even though its key scores lowest of the 5 rows."""
    sel = HACKSelection([[1]], 2, 2, HACKOptions(first_scales=0, recent="previous"))
    q = torch.ones(1, 1, 4, 2)
    k = torch.tensor([[[[-3.0, -3.0], [1.0, 0.0], [0.0, 2.0], [0.5, 0.5], [0.0, 0.0]]]])
    pos = torch.arange(5).view(1, 1, 5)
    call = ScaleCall(layer=0, si=1, schedule=SCHED, cond_rows=1, positions=pos)
    assert sel.keep(call, 0, q, k, k).tolist() == [[[0, 2]]]  # row 2 scores highest of the rest


def _last_call(**kw) -> ScaleCall:
    return ScaleCall(layer=0, si=len(SCHED) - 1, schedule=SCHED, cond_rows=1, **kw)


def test_merge_with_nothing_evicted_leaves_the_compaction_to_the_store():
    sel = HACKSelection([[0, 1]], 6, 6)
    k = torch.randn(1, 2, 6, 4)
    assert sel.merge(_last_call(), 0, k, k, torch.arange(6).expand(1, 2, 6)) is None


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_merge_compacts_the_heads_that_do_not_merge_with_the_plans_backend(backend):
    """One group of a contextual (merging) and a structural head: the structural head's rows are
    the kept ones, gathered by ``kv_compact`` on the plan's backend, which it records."""
    sel = HACKSelection([[0, 1]], 3, 3)
    g = torch.Generator().manual_seed(2)
    k, v = (torch.randn(1, 2, 6, 4, generator=g) for _ in "kv")
    keep = torch.tensor([[[0, 2, 5], [1, 3, 4]]])
    record: dict[str, str] = {}
    k2, v2 = sel.merge(_last_call(kernels=backend, record=record), 0, k, v, keep)
    assert record == {"kv_compact": backend}
    assert torch.equal(k2[0, 1], k[0, 1, [1, 3, 4]]) and torch.equal(v2[0, 1], v[0, 1, [1, 3, 4]])


def test_pivot_search_compares_cosines_in_fp32_at_least():
    """bf16 keys: cosines 0.99980 and 0.99995 both round to 1.0 in bf16 (a tie, the first
    wins); in fp32 the second pool row is the closer one."""
    rows = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.bfloat16)
    pool = torch.tensor([[[[1.0, 0.02], [1.0, 0.01]]]], dtype=torch.bfloat16)
    assert _most_similar(rows, pool).tolist() == [[[1]]]


def test_head_order_keeps_each_class_in_its_original_order_over_many_heads():
    g = torch.Generator().manual_seed(0)
    table = (torch.rand(3, 64, generator=g) > 0.5).long()
    expect = [
        [h for h in range(64) if row[h] == 0] + [h for h in range(64) if row[h] == 1]
        for row in table.tolist()
    ]
    assert head_order(table).tolist() == expect


def test_permute_heads_moves_every_per_head_tensor_block_by_block():
    heads, hd = 3, 2
    c = heads * hd
    g = torch.Generator().manual_seed(1)
    sd = {
        name: torch.randn(*shape, generator=g)
        for name, shape in {
            "mat_qkv.weight": (3 * c, c),
            "mat_qkv.bias": (3 * c,),
            "q_bias": (c,),
            "v_bias": (c,),
            "zero_k_bias": (c,),
            "scale_mul_1H11": (1, heads, 1, 1),
            "proj.weight": (c, c),
        }.items()
    }
    perm = [2, 0, 1]
    out = permute_heads(sd, perm, heads)
    for j, old in enumerate(perm):
        new, was = slice(j * hd, (j + 1) * hd), slice(old * hd, (old + 1) * hd)
        for part in range(3):  # q, k, v blocks of mat_qkv
            new_rows = slice(part * c + new.start, part * c + new.stop)
            old_rows = slice(part * c + was.start, part * c + was.stop)
            assert torch.equal(out["mat_qkv.weight"][new_rows], sd["mat_qkv.weight"][old_rows])
            assert torch.equal(out["mat_qkv.bias"][new_rows], sd["mat_qkv.bias"][old_rows])
        for name in ("q_bias", "v_bias", "zero_k_bias"):
            assert torch.equal(out[name][new], sd[name][was])
        assert torch.equal(out["proj.weight"][:, new], sd["proj.weight"][:, was])
        assert out["scale_mul_1H11"][0, j] == sd["scale_mul_1H11"][0, old]


def test_a_layer_or_head_count_outside_the_table_is_refused():
    sel = HACKSelection([[0, 1]], 4, 8)
    message = (
        r"^hack: layer 1 with 2 heads is outside the head classes \(1, 2\) \(layers x heads\)$"
    )
    with pytest.raises(ValueError, match=message):
        sel.groups(1, 2)
    with pytest.raises(ValueError, match="layer 0 with 3 heads is outside"):
        sel.groups(0, 3)


@pytest.mark.parametrize(("first_scales", "need"), [(2, 5), (3, 5)])
def test_the_refusal_counts_the_rows_the_first_scales_hold_at_that_scale(first_scales, need):
    """Scale 1 of 1 + 4 tokens: the first scales hold its 5 rows (not more: map 2 comes later)."""
    sel = HACKSelection([[1]], 4, 4, HACKOptions(first_scales=first_scales))
    with pytest.raises(ValueError, match=f"below the {need} rows .* at scale 1 of"):
        sel.check(SCHED, layers=1)


def test_a_previous_map_inside_the_first_scales_is_not_counted_twice():
    """first_scales=4, recent="previous": at the last scale the mandatory rows are the 30 of the
    first four maps, which a budget of 30 holds."""
    HACKSelection([[1]], 4, 30, HACKOptions(first_scales=4, recent="previous")).check(SCHED, 1)


def _previous_map_partly_evicted(budget: int):
    """Scale 2 with ``recent="previous"``, first_scales 1: the store hands rows 0, 2, 3 and the
    new map (positions 1 and 4 of map 1 were evicted before): 3 mandatory rows, though the
    schedule's bound is 5."""
    sel = HACKSelection([[1]], 4, budget, HACKOptions(first_scales=1, recent="previous"))
    pos = torch.tensor([0, 2, 3, *range(5, 14)]).view(1, 1, -1)
    call = ScaleCall(layer=0, si=2, schedule=SCHED, cond_rows=1, positions=pos)
    k = torch.randn(1, 1, 12, 4, generator=torch.Generator().manual_seed(3))
    return sel.keep(call, 0, k[:, :, -9:], k, k)


def test_a_budget_of_exactly_the_rows_present_keeps_them_and_one_less_is_refused():
    assert _previous_map_partly_evicted(3).tolist() == [[[0, 1, 2]]]
    with pytest.raises(
        ValueError, match="budget_structural=2 is below the 3 rows .* at scale 2 of"
    ):
        _previous_map_partly_evicted(2)


def test_scope_pair_without_cfg_selects_each_row_on_its_own():
    """cond_rows equal to the batch (no CFG): nothing to pair, as scope="row"."""
    g = torch.Generator().manual_seed(4)
    k = torch.randn(2, 2, 14, 4, generator=g)
    pos = torch.arange(14).expand(2, 2, 14)
    call = ScaleCall(layer=0, si=2, schedule=SCHED, cond_rows=2, positions=pos)
    kept = [
        HACKSelection([[0, 0]], 6, 6, HACKOptions(scope=s)).keep(call, 0, k[:, :, -9:], k, k)
        for s in ("pair", "row")
    ]
    assert torch.equal(kept[0], kept[1]) and not torch.equal(kept[0][0], kept[0][1])


def test_subset_attention_of_bf16_inputs_is_computed_in_fp32():
    """Against a loop over the observed queries in fp32 (the bf16 values widen exactly)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 1, 4, 8, generator=g).bfloat16()
    k = torch.randn(1, 1, 9, 8, generator=g).bfloat16()
    sel = HACKSelection([[0]], 4, 4, HACKOptions(n_obs=4))
    call = ScaleCall(layer=0, si=1, schedule=SCHED, cond_rows=1, scale=0.3)
    got = sel._subset_attention(call, q, k, None)
    qf, kf = q.float()[0, 0], k.float()[0, 0]
    expect = sum(
        torch.softmax(torch.stack([qf[i] @ kf[j] * 0.3 for j in range(9)]), 0) for i in range(4)
    )
    assert got.dtype == torch.float32
    torch.testing.assert_close(got[0, 0], expect, rtol=0, atol=1e-6)
