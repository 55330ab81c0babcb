"""KV bytes from the architecture: the papers' numbers (research/var.md §2.1.8, Appendix A) and the
store's own measurement against the arithmetic (§3.2 item 10)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from diffcache.adapter import Capabilities
from diffcache.errors import PlanError
from diffcache.kv import ScaleCall, Schedule
from diffcache.kv.baselines import PyramidKVSelection, SlidingWindowSelection, StreamingSelection
from diffcache.kv.budget import BudgetedHistory
from diffcache.kv.hack import HACKOptions, HACKSelection
from diffcache.kv.history_method import KeepAll
from diffcache.kv.memory import MIB, Geometry, kv_bytes, plan_memory, selection_budget
from diffcache.kv.scalekv import ScaleKVSelection
from diffcache.kv.scalekv_budgets import RELEASED_8B_10PCT, ScaleBudget, ScaleKVBudgets
from diffcache.pipelines.kv_configs import kv_config
from diffcache.plan import Plan

INFINITY_1M = Schedule.square((1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64))
VAR_256 = Schedule.square((1, 2, 3, 4, 5, 6, 8, 10, 13, 16))


def test_kv_bytes_formula_reproduces_scalekv_table_1():
    assert kv_bytes(32, 2048, 6425, 16, 4, 2) / MIB == 38550
    assert kv_bytes(40, 3584, 6425, 16, 4, 2) / MIB == 84328.125


@pytest.mark.parametrize(
    ("layers", "heads", "full", "ten_pct"),
    [(32, 16, 38550, 3900), (40, 28, 84328.125, 8531.25)],  # Infinity-2B, -8B; head_dim 128
)
def test_history_before_the_last_scale_at_batch_8(layers, heads, full, ten_pct):
    geo = Geometry(layers, heads, 128, INFINITY_1M, rows=16)
    assert geo.history_before()[-1] / MIB == full
    assert geo.history_before(lambda si, layer: 650)[-1] / MIB == ten_pct


def test_released_8b_plan_holds_the_paper_10pct_memory():
    """The drafter/refiner budgets of "Scale 13" average 650: 8531.25 MiB before the last scale."""
    geo = Geometry(40, 28, 128, INFINITY_1M, rows=16)
    assert geo.history_before(RELEASED_8B_10PCT.budget)[-1] / MIB == 8531.25


@pytest.mark.parametrize(
    ("depth", "mib"), [(16, 127.5), (20, 199.21875), (24, 286.875), (30, 448.2421875)]
)
def test_var_full_cache_one_image_with_cfg(depth, mib):
    """Appendix A: VAR-d{depth} (width 64·depth, head_dim 64) at T = 680, 2 rows."""
    geo = Geometry(depth, depth, 64, VAR_256, rows=2)
    assert sum(geo.history_lengths()[-1]) * geo.row_bytes / MIB == mib
    assert geo.sweep_peak() / MIB == mib  # the full cache only grows: its peak is the end
    assert geo.history_before()[-1] / MIB == depth * 64 * depth * 424 * 2 * 6 / MIB


def test_infinity_one_image_history_before_last_scale():
    assert Geometry(32, 16, 128, INFINITY_1M, rows=2).history_before()[-1] / MIB == 4818.75


def run_store(selection, geo: Geometry, seed: int = 0) -> BudgetedHistory:
    store = BudgetedHistory(selection)
    g = torch.Generator().manual_seed(seed)
    for si in range(len(geo.schedule)):
        n = geo.schedule.tokens(si)
        for layer in range(geo.layers):
            shape = (geo.rows, geo.heads, n, geo.head_dim)
            q, k = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
            v = torch.randn(shape, generator=g).half()
            call = ScaleCall(layer, si, geo.schedule, geo.rows // 2, raw_query=lambda q=q: q)
            store.attend(call, q, k, v)
    return store


@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.1])
def test_measured_bytes_equal_the_arithmetic(ratio):
    geo = Geometry(3, 2, 4, Schedule.square((1, 2, 3, 4, 5)), rows=2, k_bytes=4, v_bytes=2)
    budget = round(ratio * geo.schedule.total)
    store = run_store(SlidingWindowSelection(budget), geo)
    assert list(store.scale_history.values()) == geo.history_before(lambda si, layer: budget)
    assert store.peak_nbytes() == geo.sweep_peak(lambda si, layer: budget)
    assert store.nbytes() == sum(geo.history_lengths(lambda si, la: budget)[-1]) * geo.row_bytes


def test_measured_bytes_equal_the_arithmetic_with_per_layer_budgets():
    """ScaleKV's drafter/refiner budgets differ per layer, so the sweep order sets the peak.

    Maps of 1, 4, 16, 25, 1 tokens, 3 layers: after scale 2 the layers hold [21, 16, 16], after
    scale 3 [16, 28, 16]. The peak is at scale 3's last layer: 16 + 28 (compacted) + 16 + 25."""
    geo = Geometry(3, 2, 4, Schedule.square((1, 2, 4, 5, 1)), rows=2)
    plan = ScaleKVBudgets(20, (ScaleBudget(2, "DRR", 28, 16), ScaleBudget(3, "RDR", 28, 16)))
    sel = ScaleKVSelection(plan, "paper", base_capacity=20)
    store = run_store(sel, geo)

    def budget(si: int, layer: int) -> int | None:
        return sel.budget(ScaleCall(layer, si, geo.schedule, 1), 0, 0)

    assert geo.history_lengths(budget)[3:] == [[21, 16, 16], [16, 28, 16], [17, 29, 17]]
    assert geo.sweep_peak(budget) == (16 + 28 + 16 + 25) * geo.row_bytes
    assert list(store.scale_history.values()) == geo.history_before(budget)
    assert store.peak_nbytes() == geo.sweep_peak(budget)
    assert [store.held(layer, 0)[0].shape[2] for layer in range(3)] == [17, 29, 17]


GEO = Geometry(3, 2, 4, Schedule.square((1, 2, 3, 4, 5)), rows=2)


@pytest.mark.parametrize(
    "selection",
    [
        StreamingSelection(20, sinks=2),
        PyramidKVSelection(22, layers=3, window=4),
        ScaleKVSelection(
            ScaleKVBudgets(20, (ScaleBudget(2, "DRR", 28, 16), ScaleBudget(3, "RDR", 28, 16))),
            "paper",
            window=4,
        ),
        # per layer a contextual (12 rows) and a structural (30 rows) head, in either order
        HACKSelection([[0, 1], [1, 0], [1, 0]], 12, 30, HACKOptions(recent_cap=4, n_obs=4)),
        HACKSelection([[0, 1], [1, 0], [1, 0]], 30, 30, HACKOptions(recent_cap=4, n_obs=4)),
    ],
    ids=["streaming", "pyramidkv", "scalekv", "hack", "hack-one-group"],
)
def test_selection_budget_equals_the_store_measurement(selection):
    """The rows ``diffcache kv`` assumes are the rows the budgeted store really keeps."""
    budget, groups = selection_budget(selection, GEO.schedule, GEO.layers, GEO.heads)
    store = run_store(selection, GEO)
    assert list(store.scale_history.values()) == GEO.history_before(budget, groups)
    assert store.peak_nbytes() == GEO.sweep_peak(budget, groups)
    assert max(GEO.sweep_peaks(budget, groups)) == GEO.sweep_peak(budget, groups)
    last = [
        [store.held(layer, g)[0].shape[2] for g in range(len(groups[layer]))] for layer in range(3)
    ]
    assert GEO.group_lengths(budget, groups)[-1] == last


def test_head_groups_with_their_own_budgets_by_hand():
    """Maps of 1, 4, 9, 16, 25 tokens, 3 layers of a 1-head contextual group keeping 12 rows
    then a 1-head structural one keeping 30. Before the last scale every group holds
    min(b, 30): 12 + 30 per layer; at the last scale the peak is the last layer's structural
    group at 30 + 25 rows, with the layers before it compacted to 12 + 30."""
    budget = lambda si, layer: [12, 30]  # noqa: E731
    groups = [[1, 1]] * 3
    head = GEO.row_bytes // GEO.heads
    assert GEO.history_before(budget, groups)[-1] == 3 * (12 + 30) * head
    assert GEO.sweep_peak(budget, groups) == (2 * (12 + 30) + 12 + 30 + 25) * head
    with pytest.raises(ValueError, match="2 budgets for 1 groups"):
        GEO.history_before(budget)


def test_hack_with_equal_budgets_holds_a_whole_layer_at_its_transient_rows():
    """B_C = B_S = 30: a layer's contextual and structural heads are selected in one pass, so
    both hold their history + the new map at once. At the last scale (25 tokens on 30 held)
    the peak is the last layer's 2 heads at 30 + 25 rows with the two before it compacted to
    30 (two groups one after the other would hold one head at 30 instead of 55)."""
    sel = HACKSelection([[0, 1], [1, 0], [1, 0]], 30, 30, HACKOptions(recent_cap=4, n_obs=4))
    store = run_store(sel, GEO)
    assert store.groups == {layer: [[0, 1]] for layer in range(3)}
    assert store.peak_nbytes() == (30 + 30 + 55) * GEO.row_bytes
    budget, groups = selection_budget(sel, GEO.schedule, GEO.layers, GEO.heads)
    assert groups == [[2]] * 3 and GEO.sweep_peak(budget, groups) == store.peak_nbytes()


def test_head_groups_must_split_every_layer_into_its_heads():
    """A group table of the wrong depth (the heads add up) and one of the right depth whose
    heads do not add up are both refused, naming the model."""
    for groups in ([[2], [2]], [[2], [1], [2]]):
        with pytest.raises(ValueError, match=r"^head groups .* do not split 3 x 2 heads$"):
            GEO.group_sizes(groups)
    assert GEO.group_sizes([[1, 1], [2], [1, 1]]) == [[1, 1], [2], [1, 1]]


def test_attention_macs_are_the_pairs_the_full_store_attends():
    """The plain cache's MACs per scale: 2·head_dim per (query, key) pair the store counts
    when it keeps everything (one scale by hand: maps of 1 and 4 tokens, 2 layers, 3 heads,
    head_dim 5, 2 rows: 2·5 MACs × 4 queries × 5 keys × 3 heads × 2 rows × 2 layers)."""
    store = run_store(KeepAll(), GEO)
    per_pair = 2 * GEO.head_dim
    assert GEO.attention_macs() == [per_pair * p for p in store.scale_pairs.values()]
    assert Geometry(2, 3, 5, Schedule.square((1, 2)), rows=2).attention_macs()[1] == 2400


def test_a_reported_geometry_rebuilds_the_model_geometry():
    """``Stats.kv_geometry`` holds the schedule as lists; :meth:`Geometry.of` reads it back."""
    stats_geometry = dict(
        layers=3, heads=2, head_dim=4, schedule=[[1, 1], [2, 2], [3, 3], [4, 4], [5, 5]], rows=2
    )
    assert Geometry.of({**stats_geometry, "k_bytes": 4, "v_bytes": 2}) == GEO
    assert Geometry.of({**stats_geometry, "k_bytes": 2, "v_bytes": 2}).row_bytes == 2 * 2 * 4 * 4


def _plan(make, kv_store="history", source="p.yaml", method="custom"):
    """A stand-in for a loaded plan whose method config needs a ``kv_store`` and builds its
    selection with ``make(calibration, schedule, layers, heads)``."""
    config = SimpleNamespace(make=make, needs=Capabilities(kv_store=kv_store))
    return SimpleNamespace(config=config, calibration_data=None, source=source, method=method)


def test_a_selection_without_a_budget_is_refused_naming_the_plan():
    """``diffcache kv`` needs the rows per head group; a selection that does not say them is a
    ValueError naming its class, one PlanError line naming the plan in ``plan_memory``."""
    with pytest.raises(ValueError, match=r"^KeepAll declares no budget per head group$"):
        selection_budget(KeepAll(), GEO.schedule, GEO.layers, GEO.heads)

    def make(calibration, schedule, layers, heads):
        return KeepAll()

    with pytest.raises(
        PlanError, match=r"^p\.yaml: method custom: KeepAll declares no budget per head group$"
    ):
        plan_memory(_plan(make), GEO)


def test_a_plan_that_keeps_everything_holds_the_full_cache():
    """A baseline without a budget or ratio keeps every row: its history and peaks are the full
    cache's, scale by scale (the plain cache only grows, so each peak is the history after)."""
    plan = Plan.from_dict({"diffcache": 1, "model": "var", "method": "streaming"}, source="s")
    memory = plan_memory(plan, GEO)
    row = GEO.layers * GEO.row_bytes  # one position in every layer
    assert memory.kept == memory.full == [GEO.schedule.start(si) * row for si in range(5)]
    assert memory.kept_peaks == memory.full_peaks
    assert memory.full_peaks == [GEO.schedule.start(si + 1) * row for si in range(5)]


def test_a_plan_for_another_depth_is_one_line_naming_the_plan():
    """Issue 23's bad input: the 8B plan's roles are for 40 layers; on Infinity-2B (32) the
    error names the plan file and both depths, and names what ``diffcache kv`` covers for a
    method without a budgeted history."""
    geo = kv_config("infinity-2b").geometry(1, "bf16")
    plan = Plan.load("infinity-8b-scalekv.yaml")
    with pytest.raises(
        PlanError, match=r"infinity-8b-scalekv\.yaml: .*40 layers, the model has 32"
    ):
        plan_memory(plan, geo)
    with pytest.raises(PlanError) as err:
        plan_memory(_plan(None, kv_store=""), geo)
    assert str(err.value) == (
        "p.yaml: method custom keeps no budgeted KV history (diffcache kv covers scalekv, hack, "
        "h2o, snapkv, streaming, pyramidkv)"
    )
