"""HACK (reconstructed) selection against a slow per-(row, head) loop written from
research/var.md §2.2.3, on random inputs driven through the scales by a minimal store."""

import dataclasses
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffcache.kv import ScaleCall, Schedule, Selection
from diffcache.kv.hack import (
    HACKOptions,
    HACKSelection,
    _mean_into,
    _most_similar,
    head_order,
    permute_heads,
)

SCHED = Schedule.square((1, 2, 3, 4, 5))  # 1, 4, 9, 16, 25 tokens; 55 in all
CLASSES = [[0, 1, 1, 0], [1, 1, 0, 1]]  # 2 layers x 4 heads, 0 = contextual
D = 8


def drive(sel, batch=4, cond_rows=2, seed=0, schedule=SCHED, scale=0.7, rows=None, perm=None):
    """A minimal pre-attention store: per scale, layer and group, hand the selection the group's
    kept history + the new map and keep what it says. Returns, per call, the inputs, the kept
    indices and the generation positions of the rows (tracked here, independently). ``rows``
    reorders the batch rows of every input, ``perm[layer]`` the heads of a layer's inputs."""
    gen = torch.Generator().manual_seed(seed)
    heads = len(CLASSES[0])
    hist = {}
    log = []
    for si in range(len(schedule)):
        n = schedule.tokens(si)
        new_pos = torch.arange(schedule.start(si), schedule.start(si) + n)
        for layer in range(len(CLASSES)):
            q, k, v = (
                torch.randn(batch, heads, n, D, generator=gen, dtype=torch.float64) for _ in "qkv"
            )
            if rows is not None:
                q, k, v = q[rows], k[rows], v[rows]
            if perm is not None:
                q, k, v = q[:, perm[layer]], k[:, perm[layer]], v[:, perm[layer]]
            call = ScaleCall(
                layer=layer, si=si, schedule=schedule, cond_rows=cond_rows, scale=scale
            )
            for g, idx in enumerate(sel.groups(layer, heads)):
                kh, vh, ph = hist.get((layer, g), (None, None, None))
                kg, vg = k[:, idx], v[:, idx]
                pg = new_pos.expand(batch, len(idx), n)
                if kh is not None:
                    kg, vg, pg = (
                        torch.cat((kh, kg), 2),
                        torch.cat((vh, vg), 2),
                        torch.cat((ph, pg), 2),
                    )
                keep = sel.keep(dataclasses.replace(call, positions=pg), g, q[:, idx], kg, vg)
                log.append(
                    dict(call=call, group=g, heads=idx, q=q[:, idx], k=kg, pos=pg, keep=keep)
                )
                if keep is not None:
                    e = keep.unsqueeze(-1).expand(*keep.shape, D)
                    kg, vg, pg = kg.gather(2, e), vg.gather(2, e), pg.gather(2, keep)
                hist[layer, g] = (kg, vg, pg)
    return log


def reference_keep(entry, budget, opts, obs=None):
    """§2.2.3 as a loop: subset softmax attention of N_obs strided queries, top-B_C for
    contextual heads; first scales + most recent scale + top of the rest for structural (each
    head's class from CLASSES)."""
    q, k, pos, call = entry["q"], entry["k"], entry["pos"], entry["call"]
    batch, heads, rows, _ = k.shape
    if rows <= budget or call.si < opts.get("start_scale", 0):
        return None
    n = q.shape[2]
    if obs is None:  # a regular stride of n_obs queries
        obs = (
            [i * n // opts["n_obs"] for i in range(opts["n_obs"])]
            if n > opts["n_obs"]
            else range(n)
        )
    recent = call.si if opts["recent"] == "current" else call.si - 1
    lo, hi = SCHED.start(max(recent, 0)), SCHED.start(recent + 1) if recent >= 0 else 0
    if opts.get("recent_cap"):  # only the scale's last tokens
        lo = max(lo, hi - opts["recent_cap"])

    kinds = [CLASSES[call.layer][h] for h in entry["heads"]]

    def mandatory(b, h):
        if kinds[h] == 0:
            return set()
        return {j for j in range(rows) if pos[b, h, j] < SCHED.start(2) or lo <= pos[b, h, j] < hi}

    def scores(b, h):
        must = mandatory(b, h)
        out = [0.0] * rows
        for i in obs:
            cand = [j for j in range(rows) if opts["softmax_over"] == "all" or j not in must]
            logits = {j: float(q[b, h, i] @ k[b, h, j]) * call.scale for j in cand}
            top = max(logits.values())
            z = sum(math.exp(x - top) for x in logits.values())
            for j, x in logits.items():
                out[j] += math.exp(x - top) / z
        return out

    keep = torch.empty(batch, heads, budget, dtype=torch.int64)
    c = call.cond_rows
    for b in range(batch):
        for h in range(heads):
            s = scores(b, h)
            if opts["scope"] == "pair":
                twin = b + c if b < c else b - c
                s = [x + y for x, y in zip(s, scores(twin, h), strict=True)]
            must = mandatory(b, h)
            rest = sorted((j for j in range(rows) if j not in must), key=lambda j: -s[j])
            keep[b, h] = torch.tensor(sorted([*must, *rest[: budget - len(must)]]))
    return keep


OPTIONS = [
    dict(recent="current", softmax_over="all", scope="pair"),
    dict(recent="previous", softmax_over="candidates", scope="row"),
    dict(recent="current", softmax_over="candidates", scope="row"),
    dict(recent="previous", softmax_over="all", scope="pair"),
    dict(recent="current", softmax_over="all", scope="pair", recent_cap=7, start_scale=3),
    dict(recent="previous", softmax_over="candidates", scope="row", sampling="random", seed=3),
]


@pytest.mark.parametrize("opts", OPTIONS)
def test_selection_matches_the_slow_reference_at_every_call(opts):
    opts = dict(opts, n_obs=5)
    budgets = {0: 7, 1: 33}  # structural: 5 first-scale rows + up to 25 recent ones fit
    sel = HACKSelection(CLASSES, budgets[0], budgets[1], HACKOptions(**opts))
    assert isinstance(sel, Selection) and sel.when == "pre"
    compressed = set()
    for entry in drive(sel):
        kinds = {CLASSES[entry["call"].layer][h] for h in entry["heads"]}
        assert len(kinds) == 1  # B_C != B_S: a group of each class
        kind = kinds.pop()
        obs = None
        if opts.get("sampling") == "random":  # the draw itself is tested on its own below
            obs = sel.observed_queries(entry["call"], entry["q"].shape[2]).tolist()
        expect = reference_keep(entry, budgets[kind], opts, obs)
        if expect is None:
            assert entry["keep"] is None
            continue
        compressed.add((kind, entry["call"].si))
        assert torch.equal(entry["keep"], expect)
        assert entry["keep"].shape[-1] == budgets[kind]  # the budget, exactly
    assert {kind for kind, _ in compressed} == {0, 1}  # both kinds compress
    assert min(si for _, si in compressed) == max(2, opts.get("start_scale", 0))


@pytest.mark.parametrize("opts", OPTIONS)
def test_equal_budgets_select_a_layer_as_one_group_each_head_by_its_class(opts):
    """B_C = B_S: one group of all heads per layer (one score, top-k and compaction), and every
    head still keeps what the reference says for its own class."""
    opts = dict(opts, n_obs=5, recent_cap=7)  # structural: 5 first-scale rows + 7 recent of 16
    sel = HACKSelection(CLASSES, 16, 16, HACKOptions(**opts))
    assert [sel.groups(layer, 4) for layer in range(2)] == [[[0, 1, 2, 3]]] * 2
    compressed = set()
    for entry in drive(sel):
        obs = None
        if opts.get("sampling") == "random":
            obs = sel.observed_queries(entry["call"], entry["q"].shape[2]).tolist()
        expect = reference_keep(entry, 16, opts, obs)
        if expect is None:
            assert entry["keep"] is None
            continue
        assert torch.equal(entry["keep"], expect)
        compressed.add(entry["call"].si)
    assert compressed == {3, 4}  # 14 rows fit at scale 2; 30, then 16 + 25, do not


def test_structural_heads_keep_first_scales_and_recent_scale():
    for recent in ("current", "previous"):
        sel = HACKSelection(CLASSES, 3, 33, HACKOptions(recent=recent, n_obs=4, when="post"))
        seen = 0
        for entry in drive(sel, seed=1):
            call, keep = entry["call"], entry["keep"]
            if keep is None or CLASSES[call.layer][entry["heads"][0]] == 0:
                continue
            kept = entry["pos"].gather(2, keep)
            r = call.si if recent == "current" else call.si - 1
            for want in (range(0, SCHED.start(2)), range(SCHED.start(r), SCHED.start(r + 1))):
                held = entry["pos"][..., None] == torch.tensor(list(want))  # present rows
                got = kept[..., None] == torch.tensor(list(want))
                assert torch.equal(got.sum(2), held.sum(2))
            seen += 1
        assert seen >= 2


def test_budget_below_the_mandatory_set_is_one_clear_error():
    sel = HACKSelection(CLASSES, 4, 29)  # the last scale needs 5 + 25 = 30 rows
    with pytest.raises(ValueError, match=r"budget_structural=29 is below the 30 rows .* scale 4"):
        sel.validate(SCHED, layers=2, heads=4)
    with pytest.raises(ValueError, match="budget_structural=29 is below the 30 rows"):
        drive(sel)
    HACKSelection(CLASSES, 4, 30).validate(SCHED, layers=2, heads=4)  # exactly enough
    with pytest.raises(ValueError, match=r"are \(2, 4\) .* model has 3 layers x 4 heads"):
        HACKSelection(CLASSES, 4, 30).validate(SCHED, layers=3, heads=4)
    capped = HACKOptions(recent_cap=7)  # 5 first-scale rows + the recent map's last 7
    HACKSelection(CLASSES, 4, 12, capped).validate(SCHED, layers=2, heads=4)
    with pytest.raises(ValueError, match="budget_structural=11 is below the 12 rows"):
        HACKSelection(CLASSES, 4, 11, capped).validate(SCHED, layers=2, heads=4)
    with pytest.raises(ValueError, match="scope='bogus'"):
        HACKOptions(scope="bogus")


class HostSyncs(TorchDispatchMode):
    """Counts the ops that read a tensor's value back to the host (``int()``, ``bool()``)."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.syncs += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_a_budget_above_the_mandatory_set_selects_without_a_host_sync():
    """The mandatory rows are counted on the host from the schedule; their tensor is read back
    only where that bound exceeds the budget (the case the error above needs)."""
    sel = HACKSelection(CLASSES, 4, 30)  # the last scale needs 30 rows: within the budget
    with HostSyncs() as mode:
        log = drive(sel)
    assert sum(e["keep"] is not None for e in log) >= 4 and mode.syncs == 0


def test_a_caller_that_gives_no_positions_is_told_so():
    """The store owns the rows' positions (ScaleCall.positions); a caller without them, or with
    positions of another shape, is refused when the selection would compress."""
    sel = HACKSelection(CLASSES, 2, 33)
    q, k = torch.randn(1, 2, 4, D), torch.randn(1, 2, 5, D)
    call = ScaleCall(layer=0, si=1, schedule=SCHED, cond_rows=1)
    with pytest.raises(ValueError, match=r"needs the rows' positions \[1, 2, 5\].*got None"):
        sel.keep(call, 0, q, k, k)
    short = dataclasses.replace(call, positions=torch.arange(4).expand(1, 2, 4))
    with pytest.raises(ValueError, match=r"got \[1, 2, 4\]"):
        sel.keep(short, 0, q, k, k)


def test_cfg_scope_pair_keeps_identical_rows_and_row_follows_its_rows():
    pair = [
        e["keep"] for e in drive(HACKSelection(CLASSES, 6, 33, HACKOptions(scope="pair", n_obs=3)))
    ]
    for keep in filter(lambda t: t is not None, pair):
        assert torch.equal(keep[:2], keep[2:])
    # row scope: swapping the conditional and unconditional rows swaps the kept sets
    swap = torch.tensor([2, 3, 0, 1])
    plain = [
        e["keep"] for e in drive(HACKSelection(CLASSES, 6, 33, HACKOptions(scope="row", n_obs=3)))
    ]
    swapped = drive(HACKSelection(CLASSES, 6, 33, HACKOptions(scope="row", n_obs=3)), rows=swap)
    assert [t is None for t in plain] == [e["keep"] is None for e in swapped]
    for keep, entry in zip(plain, swapped, strict=True):
        if keep is not None:
            assert torch.equal(entry["keep"], keep[swap])
    assert not torch.equal(plain[-1][:2], plain[-1][2:])  # the rows did differ


def test_random_subset_queries_use_their_own_generator():
    sel = HACKSelection(CLASSES, 6, 33, HACKOptions(sampling="random", seed=5, n_obs=4))
    call = ScaleCall(layer=1, si=4, schedule=SCHED, cond_rows=1)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    obs = sel.observed_queries(call, 25)
    assert torch.equal(torch.random.get_rng_state(), before)
    expect = torch.randperm(25, generator=torch.Generator().manual_seed(5 * 1_000_003 + 9))[:4]
    assert obs.tolist() == sorted(expect.tolist())
    assert sel.observed_queries(call, 3).tolist() == [0, 1, 2]  # fewer queries than n_obs
    stride = HACKSelection(CLASSES, 6, 33, HACKOptions(n_obs=4)).observed_queries(call, 25)
    assert stride.tolist() == [0, 6, 12, 18]


def test_pivot_merge_matches_a_hand_computation():
    k = torch.tensor(
        [[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.2, 0.8], [0.1, 1.0]], dtype=torch.float64
    )
    v = torch.tensor(
        [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 10.0]], dtype=torch.float64
    )
    k, v = k.expand(1, 1, 5, 2), v.expand(1, 1, 5, 2)
    keep = torch.tensor([[[0, 2]]])
    sel = HACKSelection([[0, 1]], 2, 4)  # head 0 contextual (group 0), head 1 structural
    last = ScaleCall(layer=0, si=len(SCHED) - 1, schedule=SCHED, cond_rows=1)
    mk, mv = sel.merge(last, 0, k, v, keep)
    # row 1 is closest (cosine) to kept row 0, rows 3 and 4 to kept row 2
    expect_k = [[(1 + 0.9) / 2, (0 + 0.1) / 2], [(0 + 0.2 + 0.1) / 3, (1 + 0.8 + 1) / 3]]
    assert torch.allclose(mk[0, 0], torch.tensor(expect_k, dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.equal(mv[0, 0], torch.tensor([[2.0, 3.0], [7.0, 8.0]], dtype=torch.float64))
    # not the last scale, or a structural group: nothing merged (the store compacts)
    early = ScaleCall(layer=0, si=2, schedule=SCHED, cond_rows=1)
    for call, group in ((early, 0), (last, 1)):
        assert sel.merge(call, group, k, v, keep) is None
    every = HACKSelection([[0, 1]], 2, 4, HACKOptions(merge_at="every", merge_heads="all"))
    assert torch.equal(every.merge(early, 1, k, v, keep)[1], mv)
    # B_C = B_S: both heads in one group; the contextual head 0 merges, the structural head 1
    # keeps its rows 0 and 2 as they are
    shared = HACKSelection([[0, 1]], 2, 2)
    k2, v2, keep2 = k.expand(1, 2, 5, 2), v.expand(1, 2, 5, 2), keep.expand(1, 2, 2)
    sk, sv = shared.merge(last, 0, k2, v2, keep2)
    assert torch.equal(sk[0, 0], mk[0, 0]) and torch.equal(sv[0, 0], mv[0, 0])
    assert sk[0, 1].tolist() == [[1.0, 0.0], [0.0, 1.0]] and sv[0, 1].tolist() == [[1, 2], [5, 6]]
    assert shared.merge(early, 0, k2, v2, keep2) is None


def test_pivot_search_in_chunks_matches_the_whole_similarity_map():
    gen = torch.Generator().manual_seed(7)
    rows, pool = torch.randn(2, 3, 10, D, generator=gen), torch.randn(2, 3, 4, D, generator=gen)
    cos = torch.nn.functional.cosine_similarity(rows.unsqueeze(3), pool.unsqueeze(2), dim=-1)
    assert torch.equal(_most_similar(rows, pool, chunk=3), cos.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pivot_mean_is_scatter_reduce_bit_for_bit(dtype):
    """The merge's flattened index_add averages exactly as ``scatter_reduce(mean,
    include_self)`` does, bf16 included where a kept row takes over 256 rows (its count is
    exact in both, not summed in bf16)."""
    gen = torch.Generator().manual_seed(3)
    kept = torch.randn(2, 3, 5, D, generator=gen).to(dtype)
    rows = torch.randn(2, 3, 400, D, generator=gen).to(dtype)
    pivot = torch.randint(0, 5, (2, 3, 400), generator=gen)
    pivot[0, 0] = 2  # one kept row takes all 400
    index = pivot.unsqueeze(-1).expand(*pivot.shape, D)
    expect = kept.scatter_reduce(2, index, rows, reduce="mean", include_self=True)
    assert torch.equal(_mean_into(kept, pivot, rows), expect)


def test_head_order_puts_contextual_heads_first():
    assert head_order([[1, 0, 1, 0], [0, 0, 1, 1]]).tolist() == [[1, 3, 0, 2], [0, 1, 2, 3]]


def per_head_keeps(log):
    """``{(scale, layer, head): kept indices [B, m]}`` from a drive log."""
    out = {}
    for e in log:
        if e["keep"] is not None:
            for j, h in enumerate(e["heads"]):
                out[e["call"].si, e["call"].layer, h] = e["keep"][:, j]
    return out


def groups_are_contiguous(classes):
    sel = HACKSelection(classes, 1, 2)  # B_C != B_S: a group of each class
    groups = [sel.groups(layer, len(classes[0])) for layer in range(len(classes))]
    return all(sum(g, []) == list(range(len(classes[0]))) for g in groups)


def test_selection_on_reordered_heads_keeps_the_same_rows_per_head():
    # HACK's deployment reorders heads so each class is contiguous; the rows kept per head
    # must not change (research/var.md §3.2 item 13, the selection half)
    order = head_order(CLASSES)
    reordered = [[CLASSES[layer][h] for h in order[layer]] for layer in range(len(CLASSES))]
    assert groups_are_contiguous(reordered)
    plain = per_head_keeps(drive(HACKSelection(CLASSES, 6, 33, HACKOptions(n_obs=3))))
    moved = per_head_keeps(drive(HACKSelection(reordered, 6, 33, HACKOptions(n_obs=3)), perm=order))
    assert len(plain) == len(moved) > 0
    for (si, layer, j), keep in moved.items():
        assert torch.equal(keep, plain[si, layer, int(order[layer][j])])


def test_merge_at_last_is_the_last_selection_a_query_reads():
    last, before = len(SCHED) - 1, len(SCHED) - 2
    for when, merging in (("pre", last), ("post", before)):
        sel = HACKSelection([[0, 1]], 2, 4, HACKOptions(when=when))
        for si in range(len(SCHED)):
            call = ScaleCall(layer=0, si=si, schedule=SCHED, cond_rows=1)
            assert sel.merges(call, 0) == (si == merging) and not sel.merges(call, 1)
    none = HACKSelection([[0, 1]], 2, 4, HACKOptions(merge="none"))
    assert not none.merges(ScaleCall(layer=0, si=last, schedule=SCHED, cond_rows=1), 0)


def var_attention(sd, x, heads):
    """A VAR-style self-attention block (cosine attention, per-head temperature), float64."""
    b, n, c = x.shape
    bias = torch.cat((sd["q_bias"], sd["zero_k_bias"], sd["v_bias"]))
    qkv = (x @ sd["mat_qkv.weight"].T + bias).view(b, n, 3, heads, c // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    mul = sd["scale_mul_1H11"].clamp_max(math.log(100)).exp()
    q = torch.nn.functional.normalize(q, dim=-1) * mul
    k = torch.nn.functional.normalize(k, dim=-1)
    heads_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0)
    out = heads_out.transpose(1, 2).reshape(b, n, c) @ sd["proj.weight"].T + sd["proj.bias"]
    return out, heads_out


def test_head_permutation_leaves_the_attention_output_unchanged():
    gen = torch.Generator().manual_seed(0)
    heads, c = 4, 24

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    sd = {
        "mat_qkv.weight": rand(3 * c, c),
        "q_bias": rand(c),
        "v_bias": rand(c),
        "zero_k_bias": torch.zeros(c, dtype=torch.float64),
        "scale_mul_1H11": rand(1, heads, 1, 1) + 2.0,
        "proj.weight": rand(c, c),
        "proj.bias": rand(c),
    }
    x = rand(2, 7, c)
    perm = torch.tensor([2, 0, 3, 1])
    permuted = permute_heads(sd, perm, heads)
    out, per_head = var_attention(sd, x, heads)
    out_p, per_head_p = var_attention(permuted, x, heads)
    assert torch.allclose(out_p, out, rtol=0, atol=1e-12)
    assert torch.allclose(per_head_p, per_head[:, perm], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="not a permutation"):
        permute_heads(sd, [0, 0, 1, 2], heads)
