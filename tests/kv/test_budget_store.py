"""The budgeted history store on synthetic q/k/v: equivalence with the full cache, gather ≡ mask,
head groups, dtypes, bytes and index validation (research/var.md §3.2 items 1–3, 6, 10)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffcache.kv import FullHistory, History, ScaleCall, Schedule
from diffcache.kv.baselines import SnapKVSelection
from diffcache.kv.budget import BudgetedHistory, capacity, check_keep
from diffcache.kv.hack import HACKOptions, HACKSelection
from diffcache.kv.scalekv import ScaleKVSelection
from diffcache.kv.scalekv_budgets import ScaleBudget, ScaleKVBudgets
from diffcache.testing.kernels import needs_interpreter

SCHED = Schedule.square((1, 2, 3, 4))


class Fixed:
    """A selection keeping rows its ``rule(call, group, length, b, hg)`` names."""

    def __init__(self, when, rule, groups=None, budget=None):
        self.when, self.rule, self._groups, self._budget = when, rule, groups, budget

    def groups(self, layer, heads):
        return self._groups or [list(range(heads))]

    def keep(self, call, group, q, k, v):
        b, hg, length = k.shape[:3]
        return self.rule(call, group, length, b, hg)

    def budget(self, call, group, length):
        return self._budget


def keep_all(call, group, length, b, hg):
    return torch.arange(length).expand(b, hg, length)


def sweep(store, layers=2, batch=3, heads=4, d=8, dtype=torch.float64, seed=0):
    """Drive ``store`` over SCHED; returns the outputs and the inputs per (si, layer)."""
    g = torch.Generator().manual_seed(seed)
    outs, ins = [], []
    for si in range(len(SCHED)):
        n = SCHED.tokens(si)
        for layer in range(layers):
            q, k, v = (torch.randn(batch, heads, n, d, generator=g, dtype=dtype) for _ in range(3))
            call = ScaleCall(layer=layer, si=si, schedule=SCHED, cond_rows=batch)
            outs.append(store.attend(call, q, k, v))
            ins.append((q, k, v))
    return outs, ins


@pytest.mark.parametrize("when", ["pre", "post"])
@pytest.mark.parametrize("batch", [1, 3])
def test_keep_everything_is_bit_exact_with_full_history(when, batch):
    full_out, _ = sweep(FullHistory(), batch=batch)
    store = BudgetedHistory(Fixed(when, keep_all))
    assert isinstance(store, History)
    out, _ = sweep(store, batch=batch)
    assert all(torch.equal(a, b) for a, b in zip(out, full_out, strict=True))
    none_out, _ = sweep(BudgetedHistory(Fixed(when, lambda *a: None)), batch=batch)
    assert all(torch.equal(a, b) for a, b in zip(none_out, full_out, strict=True))
    assert store.nbytes() == store.history_nbytes() == 2 * 2 * batch * 4 * SCHED.total * 8 * 8


@pytest.mark.parametrize("when", ["pre", "post"])
def test_a_selection_keeping_more_than_its_budget_grows_the_buffers(when):
    """The buffers are sized by the budget (3 rows: room for 19, the 3 kept plus the last map
    of 16); a selection that keeps everything anyway (``None``) still holds and attends every
    row: the history of 14 rows is copied into grown buffers at the last scale, bit-exact with
    the full cache, positions and bytes included."""
    full_out, _ = sweep(FullHistory())
    store = BudgetedHistory(Fixed(when, lambda *a: None, budget=3))
    out, _ = sweep(store)
    assert all(torch.equal(a, b) for a, b in zip(out, full_out, strict=True))
    assert store.rows[0][0].k.shape[2] == SCHED.total == 30
    assert torch.equal(store.positions(1, 0), torch.arange(30).expand(3, 4, 30))
    assert store.positions(1, 0).dtype == torch.int64  # the selection's index type
    assert store.nbytes() == 2 * 3 * 4 * 30 * 8 * (8 + 8)


def test_positions_follow_the_maps_a_layer_was_given():
    """Positions are written when read: the rows appended since a compaction are one run of
    consecutive positions, and a map that does not continue it (here scale 2 skipped: maps of
    1, 4, then 16 rows at position 14) starts a new run. A selection that keeps the last
    row of each map then holds positions 0, 4, 29; the rows hold the k each map handed over."""
    seen = {}

    def last_of_each(call, group, length, b, hg):
        seen[call.si] = call.positions.clone()
        return torch.tensor([0, 4, length - 1]).expand(b, hg, 3)

    store = BudgetedHistory(Fixed("post", last_of_each, budget=8))
    ks = {}
    for si in (0, 1, 3):
        q, k, v = (torch.randn(1, 2, SCHED.tokens(si), 4) for _ in "qkv")
        ks[si] = k
        store.attend(ScaleCall(0, si, SCHED, 1), q, k, v)
    assert torch.equal(seen[3], torch.cat((torch.arange(5), torch.arange(14, 30))).expand(1, 2, -1))
    assert torch.equal(store.positions(0, 0), torch.tensor([0, 4, 29]).expand(1, 2, 3))
    want = torch.cat((ks[0], ks[1][:, :, 3:], ks[3][:, :, -1:]), dim=2)
    assert torch.equal(store.held(0, 0)[0], want)


def test_our_selections_keep_everything_where_their_budget_is_none():
    """The store does not ask diffcache's own selections where their budget is None (no
    compression at that call): ScaleKV until the cache has exceeded its base (5 rows here:
    scales 0 and 1) and at the last scale, HACK before its start_scale (2). Asked anyway, each
    keeps everything (None) there, and selects where the budget is set."""
    plan = ScaleKVBudgets(4, tuple(ScaleBudget(si, "D", 4, 4) for si in range(4)))
    scalekv = ScaleKVSelection(plan, "paper", base_capacity=5, window=4, kernel=3)
    hack = HACKSelection([[0, 1]], 3, 3, HACKOptions(start_scale=2, first_scales=0, recent_cap=1))
    unset = {}
    for name, sel in (("scalekv", scalekv), ("hack", hack)):
        for si in range(len(SCHED)):
            length = SCHED.start(si + 1)
            q, k, v = (torch.randn(1, 2, n, 4) for n in (SCHED.tokens(si), length, length))
            call = ScaleCall(0, si, SCHED, 1, positions=torch.arange(length).expand(1, 2, -1))
            kept = sel.keep(call, 0, q, k, v)
            if sel.budget(call, 0, length) is None:
                unset.setdefault(name, []).append(si)
                assert kept is None, (name, si)
            else:
                assert kept is not None and kept.shape[-1] < length, (name, si)
    assert unset == {"scalekv": [0, 1, 3], "hack": [0, 1]}


def random_subsets(call, group, length, b, hg, m=None):
    """A sorted random subset of ``m`` rows per (row, head), seeded by the call."""
    m = m or max(1, (length * 2) // 3)
    g = torch.Generator().manual_seed(1000 * call.si + 10 * call.layer + group)
    return torch.rand(b, hg, length, generator=g).argsort(-1)[..., :m].sort(-1).values


def masked_oracle(q, k, v, keep):
    """Attention over the whole cache with −inf on the evicted rows, per (row, head)."""
    mask = torch.full(k.shape[:3], float("-inf"), dtype=q.dtype)
    mask.scatter_(2, keep, 0.0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, :, None, :], scale=1.0)


@pytest.mark.parametrize(
    ("groups", "sizes"),
    [
        (None, None),
        ([[2, 0], [1, 3]], {0: 5, 1: 9}),
        ([[3], [0, 1, 2]], {}),
        ([[0, 1], [2, 3]], {0: 3, 1: 6}),  # in order: the outputs are concatenated
    ],
)
def test_pre_selection_gather_equals_mask_oracle(groups, sizes):
    """§3.2 item 3 through the store: groups of any heads, each its own kept count."""
    sizes = sizes or {}

    def rule(call, group, length, b, hg):
        return random_subsets(call, group, length, b, hg, min(length, sizes.get(group, 0)) or None)

    store = BudgetedHistory(Fixed("pre", rule, groups))
    layers, batch, heads = 2, 2, 4
    g = torch.Generator().manual_seed(3)
    hist = {(layer, h): ([], []) for layer in range(layers) for h in range(heads)}
    for si in range(len(SCHED)):
        n = SCHED.tokens(si)
        for layer in range(layers):
            q, k, v = (
                torch.randn(batch, heads, n, 8, generator=g, dtype=torch.float64) for _ in "qkv"
            )
            call = ScaleCall(layer=layer, si=si, schedule=SCHED, cond_rows=1)
            out = store.attend(call, q, k, v)
            for gi, ids in enumerate(groups or [list(range(heads))]):
                for j, h in enumerate(ids):
                    hk, hv = hist[layer, h]
                    k_all = torch.cat([*hk, k[:, h : h + 1]], 2)
                    v_all = torch.cat([*hv, v[:, h : h + 1]], 2)
                    keep = rule(call, gi, k_all.shape[2], batch, len(ids))[:, j : j + 1]
                    expect = masked_oracle(q[:, h : h + 1], k_all, v_all, keep)
                    torch.testing.assert_close(out[:, h : h + 1], expect, rtol=0, atol=1e-12)
                    idx = keep[..., None].expand(-1, -1, -1, 8)
                    hist[layer, h] = ([k_all.gather(2, idx)], [v_all.gather(2, idx)])


def test_post_selection_attends_to_everything_then_keeps_the_subset():
    batch, heads = 2, 3
    store = BudgetedHistory(Fixed("post", random_subsets))
    g = torch.Generator().manual_seed(5)
    hk = hv = None
    pos = torch.empty(batch, heads, 0, dtype=torch.int64)
    for si in range(len(SCHED)):
        q, k, v = (torch.randn(batch, heads, SCHED.tokens(si), 4, generator=g) for _ in "qkv")
        call = ScaleCall(layer=0, si=si, schedule=SCHED, cond_rows=1)
        out = store.attend(call, q, k, v)
        k_all = k if hk is None else torch.cat((hk, k), 2)
        v_all = v if hv is None else torch.cat((hv, v), 2)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k_all, v_all, scale=1.0))
        keep = random_subsets(call, 0, k_all.shape[2], batch, heads)
        hk = torch.stack([k_all[b, h, keep[b, h]] for b in range(batch) for h in range(heads)])
        hk = hk.view(batch, heads, -1, 4)
        hv = torch.stack([v_all[b, h, keep[b, h]] for b in range(batch) for h in range(heads)])
        hv = hv.view(batch, heads, -1, 4)
        assert torch.equal(store.held(0, 0)[0], hk) and torch.equal(store.held(0, 0)[1], hv)
        new = torch.arange(SCHED.start(si), SCHED.start(si + 1)).expand(batch, heads, -1)
        pos = torch.cat((pos, new), 2).gather(2, keep)
        assert torch.equal(store.positions(0, 0), pos)  # §3.2 item 6: positions ride along
        assert torch.equal(SCHED.scale_of(pos), SCHED.scale_of(torch.arange(SCHED.total))[pos])


def test_dtypes_and_bytes_are_measured_per_tensor():
    """Cosine attention: K fp32 next to fp16 V; nbytes counts each at its own size."""
    store = BudgetedHistory(
        Fixed("post", lambda c, g, length, b, hg: random_subsets(c, g, length, b, hg, 3))
    )
    rows = 0
    for si in range(len(SCHED)):
        n = SCHED.tokens(si)
        q = torch.randn(2, 2, n, 4)
        call = ScaleCall(layer=0, si=si, schedule=SCHED, cond_rows=1)
        store.attend(call, q, torch.randn(2, 2, n, 4), torch.randn(2, 2, n, 4).half())
        assert (
            store.held(0, 0)[0].dtype == torch.float32
            and store.held(0, 0)[1].dtype == torch.float16
        )
        rows = min(3, rows + n)
        assert store.held(0, 0)[0].shape[2] == rows
        assert store.nbytes() == 2 * 2 * rows * 4 * (4 + 2)


def test_merge_replaces_the_gather():
    class Merge(Fixed):
        def merge(self, call, group, k, v, keep):
            idx = keep[..., None].expand(-1, -1, -1, k.shape[-1])
            return k.gather(2, idx) * 0 + call.si, v.gather(2, idx) * 0 - call.si

    store = BudgetedHistory(Merge("post", random_subsets))
    sweep(store, layers=1)
    last = len(SCHED) - 1
    assert bool((store.held(0, 0)[0] == last).all()) and bool((store.held(0, 0)[1] == -last).all())


@pytest.mark.parametrize("when", ["pre", "post"])
def test_a_group_within_its_budget_is_not_asked(when):
    """A selection with a budget is asked what to keep only when the group's rows exceed it
    (pre: history + the new map; post: the same rows after attention)."""
    budget, asked = 7, []

    def rule(call, group, length, b, hg):
        asked.append((call.si, call.layer))
        return torch.arange(length - budget, length).expand(b, hg, budget)

    store = BudgetedHistory(Fixed(when, rule, budget=budget))
    sweep(store)
    held, expect = 0, []  # rows before each scale: 0, 1, 5, 7 (maps of 1, 4, 9, 16 rows)
    for si in range(len(SCHED)):
        if held + SCHED.tokens(si) > budget:
            expect += [(si, layer) for layer in range(2)]
        held = min(budget, held + SCHED.tokens(si))
    assert asked == expect == [(2, 0), (2, 1), (3, 0), (3, 1)]


@pytest.mark.parametrize(
    ("keep", "budget", "message"),
    [
        (lambda length, b, hg: torch.arange(length).flip(0).expand(b, hg, length), None, "sorted"),
        (lambda length, b, hg: torch.zeros(b, hg, 2, dtype=torch.int64), None, "sorted"),
        (lambda length, b, hg: torch.arange(1, length + 1).expand(b, hg, length), None, "lie in"),
        (lambda length, b, hg: torch.arange(length).expand(b, hg, length).int(), None, "int64"),
        (lambda length, b, hg: torch.arange(length).expand(b, hg, length), 2, "budget of 2"),
    ],
)
def test_bad_kept_indices_are_refused(keep, budget, message):
    store = BudgetedHistory(
        Fixed("post", lambda c, g, length, b, hg: keep(length, b, hg), budget=budget)
    )
    q = torch.randn(1, 2, 9, 4)
    with pytest.raises(ValueError, match=message):
        store.attend(ScaleCall(layer=0, si=2, schedule=SCHED, cond_rows=1), q, q, q)


def test_groups_must_partition_the_heads():
    store = BudgetedHistory(Fixed("post", keep_all, groups=[[0, 1], [1]]))
    q = torch.randn(1, 3, 1, 4)
    with pytest.raises(ValueError, match="partition its 3 heads"):
        store.attend(ScaleCall(layer=0, si=0, schedule=SCHED, cond_rows=1), q, q, q)


def test_scalekv_with_budgets_above_every_length_is_the_full_cache():
    """§3.2 item 2: compression triggered at every scale but every cache fits its budget."""
    plan = ScaleKVBudgets(100, tuple(ScaleBudget(si, "DD", 100, 100) for si in range(4)))
    for variant in ("released", "paper"):
        store = BudgetedHistory(ScaleKVSelection(plan, variant, base_capacity=0))
        out, _ = sweep(store)
        full_out, _ = sweep(FullHistory())
        assert all(torch.equal(a, b) for a, b in zip(out, full_out, strict=True))


def test_scalekv_lengths_after_every_scale():
    """§3.2 item 4: each compressed layer holds exactly its Max or Min, nothing is compressed
    while the cache stays within base_capacity; maps of 1, 4, 9, 16, 25 tokens (cumulative 1,
    5, 14, 30, 55), base 20, so the first compression follows scale 3."""
    sched = Schedule.square((1, 2, 3, 4, 5))
    plan = ScaleKVBudgets(20, (ScaleBudget(3, "DR", 24, 16), ScaleBudget(4, "RD", 24, 16)))
    store = BudgetedHistory(ScaleKVSelection(plan, "paper", base_capacity=20, window=4))
    expect = [[1, 1], [5, 5], [14, 14], [24, 16], [24 + 25, 16 + 25]]  # the last: not compressed
    for si in range(len(sched)):
        for layer in range(2):
            q, k, v = (torch.randn(2, 2, sched.tokens(si), 4) for _ in "qkv")
            store.attend(ScaleCall(layer, si, sched, 1), q, k, v)
        assert [store.held(layer, 0)[0].shape[2] for layer in range(2)] == expect[si]


def test_rows_live_in_buffers_sized_for_the_budget_plus_the_map():
    """Each scale's rows are written into the buffers allocated at the layer's first call (no
    concatenated history): sized for the most rows held at once, the budget plus a map
    (schedule and budgets of test_scalekv_lengths_after_every_scale)."""
    sched = Schedule.square((1, 2, 3, 4, 5))
    plan = ScaleKVBudgets(20, (ScaleBudget(3, "DR", 24, 16), ScaleBudget(4, "RD", 24, 16)))
    store = BudgetedHistory(ScaleKVSelection(plan, "paper", base_capacity=20, window=4))
    before = [0, 0]  # rows held before the scale, per layer
    most, first = [0, 0], {}
    for si in range(len(sched)):
        for layer in range(2):
            q, k, v = (torch.randn(2, 2, sched.tokens(si), 4) for _ in "qkv")
            most[layer] = max(most[layer], before[layer] + sched.tokens(si))
            store.attend(ScaleCall(layer, si, sched, 1), q, k, v)
            held = store.held(layer, 0)[0]
            assert held.data_ptr() == first.setdefault(layer, held.data_ptr())
            before[layer] = held.shape[2]
    assert most == [49, 41]
    assert [store.rows[layer][0].k.shape[2] for layer in range(2)] == most


@needs_interpreter
@pytest.mark.parametrize("method", ["released", "paper", "snapkv"])
def test_triton_kernels_keep_what_the_torch_path_keeps(method):
    """kernels: triton (kv_compact and window_scores under the interpreter) gives the torch
    path's outputs and kept positions, and the store's record names the backends."""
    plan = ScaleKVBudgets(7, tuple(ScaleBudget(si, "DR", 8, 6) for si in range(4)))

    def selection():
        if method == "snapkv":
            return SnapKVSelection(9, window=4, kernel=3)
        return ScaleKVSelection(plan, method, base_capacity=5, window=4, kernel=3)

    runs = {}
    for kernels in ("torch", "triton"):
        store = BudgetedHistory(selection(), kernels)
        g = torch.Generator().manual_seed(5)
        outs = []
        for si in range(len(SCHED)):
            for layer in range(2):
                q, k, v = (torch.randn(2, 2, SCHED.tokens(si), 8, generator=g) for _ in "qkv")
                call = ScaleCall(layer, si, SCHED, 1, raw_query=lambda q=q: 0.5 * q)
                outs.append(store.attend(call, q, k, v))
        runs[kernels] = outs, [store.positions(layer, 0) for layer in range(2)]
        assert store.kernel_record == {"kv_compact": kernels, "window_scores": kernels}
    assert all(torch.equal(a, b) for a, b in zip(*(r[0] for r in runs.values()), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(*(r[1] for r in runs.values()), strict=True))


def test_the_buffers_hold_the_most_rows_a_group_holds_at_once():
    """``capacity`` walks the budget over the schedule (maps of 1, 4, 9, 16 rows): a budget
    above every length holds all 30 rows at the end; a budget of 7 holds 7 + 16 at the last
    scale; no budget method at all, the whole schedule."""
    call = ScaleCall(layer=0, si=0, schedule=SCHED, cond_rows=1)
    assert capacity(Fixed("post", keep_all, budget=None), call, 0) == SCHED.total == 30
    assert capacity(Fixed("post", keep_all, budget=7), call, 0) == 7 + 16
    assert capacity(Fixed("post", keep_all, budget=1), call, 0) == 1 + 16

    class NoBudget:
        when = "post"

    assert capacity(NoBudget(), call, 0) == 30


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        (torch.arange(9).expand(2, 9), r"must be int64 \[B=2, Hg=2, m\], got torch.int64 \[2, 9\]"),
        # one image's rows for a batch of two: they would broadcast
        (torch.arange(9).expand(1, 2, 9), r"must be int64 \[B=2, Hg=2, m\], got .* \[1, 2, 9\]"),
        (torch.arange(9, dtype=torch.int32).expand(2, 2, 9), r"must be int64 .* got torch.int32"),
        (torch.tensor([-1, 0, 8]).expand(2, 2, 3), r"must lie in \[0, 9\), got \[-1, 8\]$"),
        (torch.tensor([0, 5, 5]).expand(2, 2, 3), "must be sorted ascending and unique per"),
    ],
    ids=["2-d", "batch", "int32", "negative", "repeated"],
)
def test_check_keep_refuses_with_the_store_own_message(keep, message):
    """The store checks a selection's kept indices itself (a merge gathers with them, and
    not every compaction checks them), each refusal its own message."""
    with pytest.raises(ValueError, match=f"^kept indices {message}"):
        check_keep(keep, (2, 2, 9), None)
    check_keep(torch.tensor([0, 5, 8]).expand(2, 2, 3), (2, 2, 9), 3)  # a good one passes


def test_a_selection_must_say_pre_or_post():
    with pytest.raises(ValueError, match=r"^selection.when must be 'pre' or 'post', got 'both'$"):
        BudgetedHistory(Fixed("both", keep_all))


@pytest.mark.parametrize(("when", "keys"), [("pre", [1, 5, 5, 5]), ("post", [1, 5, 14, 21])])
def test_pairs_count_every_query_key_pair_attended(when, keys):
    """Batch 3, 4 heads, 2 layers over maps of 1, 4, 9, 16 rows; the selection keeps the last
    5 rows once a group holds more. Per call: batch x heads x queries x the keys attended,
    by hand: pre, the kept rows (1, 5, 5, 5); post, history + the new map (1, 5, 5 + 9,
    5 + 16)."""

    def rule(call, group, length, b, hg):
        return torch.arange(length - 5, length).expand(b, hg, 5)

    store = BudgetedHistory(Fixed(when, rule, budget=5))
    sweep(store)
    expect = {si: 2 * 3 * 4 * SCHED.tokens(si) * keys[si] for si in range(len(SCHED))}
    assert store.scale_pairs == expect
    assert store.pairs == sum(expect.values())


@pytest.mark.parametrize("when", ["pre", "post"])
def test_a_group_exactly_at_its_budget_is_not_asked(when):
    """Budget 5 over maps of 1, 4, 9, 16 rows: after scale 1 a group holds exactly 5 rows,
    which fit; it is asked at scales 2 and 3 only."""
    asked = []

    def rule(call, group, length, b, hg):
        asked.append(call.si)
        return torch.arange(length - 5, length).expand(b, hg, 5)

    sweep(BudgetedHistory(Fixed(when, rule, budget=5)), layers=1)
    assert asked == [2, 3]


def test_the_selection_sees_the_group_history_and_new_rows_of_k_and_v():
    """``keep`` gets the K and V rows it chooses among (history kept, then the new map), as
    the protocol says: a rule may score by V."""
    seen = []

    class ByValue(Fixed):
        def keep(self, call, group, q, k, v):
            seen.append((k.clone(), v.clone()))
            top = v[..., 0].topk(3, dim=-1).indices
            return top.sort(dim=-1).values

    store = BudgetedHistory(ByValue("post", None, budget=3))
    _, ins = sweep(store, layers=1)
    hk, hv = ins[0][1], ins[0][2]
    for si in range(len(SCHED)):
        k_all = torch.cat((hk, ins[si][1]), 2) if si else hk
        v_all = torch.cat((hv, ins[si][2]), 2) if si else hv
        if k_all.shape[2] > 3:
            k_seen, v_seen = seen.pop(0)
            assert torch.equal(k_seen, k_all) and torch.equal(v_seen, v_all)
            idx = v_all[..., 0].topk(3, dim=-1).indices.sort(dim=-1).values
            gather = idx[..., None].expand(-1, -1, -1, 8)
            k_all, v_all = k_all.gather(2, gather), v_all.gather(2, gather)
        hk, hv = k_all, v_all
    assert seen == []
    assert torch.equal(store.held(0, 0)[1], hv)


def test_a_merge_of_the_wrong_shape_is_refused():
    """A merge must hand back K and V of the kept rows' shape; K alone wrong is refused."""

    class BadMerge(Fixed):
        def merge(self, call, group, k, v, keep):
            idx = keep[..., None].expand(-1, -1, -1, k.shape[-1])
            return k.gather(2, idx)[:, :, :-1], v.gather(2, idx)

    store = BudgetedHistory(
        BadMerge("post", lambda c, g, length, b, hg: torch.arange(3).expand(b, hg, 3))
    )
    q = torch.randn(1, 2, 9, 4)
    with pytest.raises(ValueError, match=r"^merge must return K and V of shape \[1, 2, 3, 4\]$"):
        store.attend(ScaleCall(layer=0, si=2, schedule=SCHED, cond_rows=1), q, q, q)
