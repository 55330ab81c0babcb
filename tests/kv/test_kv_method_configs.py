"""The VAR KV method configs before any model runs: issue 23's bad input (a budget that would
hold the whole cache, two ways of giving the budget at once; research/var.md §3.2 item 5), the
budgets they hand their selections and what ``--target-kv`` makes of them."""

from __future__ import annotations

import pytest

from diffcache.errors import PlanError
from diffcache.kv import Schedule
from diffcache.methods.hack import HACKCalibration, HACKConfig
from diffcache.methods.kv_baselines import H2OConfig, PyramidKVConfig, SnapKVConfig, StreamingConfig
from diffcache.methods.scalekv import ScaleKVConfig, ScaleKVScale

SCHED = Schedule.square((1, 2, 3, 4))  # 30 tokens
CLASSES = HACKCalibration(((0, 1), (1, 0)))


def test_a_scalekv_average_holding_the_whole_cache_is_refused():
    with pytest.raises(PlanError) as err:
        ScaleKVConfig(average=30).make(None, SCHED, 2, 2)
    assert str(err.value) == (
        "scalekv average budget of 30 rows is not below the whole cache of 30 rows: it would "
        "keep everything"
    )
    budgets = ScaleKVConfig(average=29).make(None, SCHED, 2, 2).budgets
    # without per-scale tables every layer keeps the average after scales 0..2
    assert [[budgets.budget(si, layer) for layer in range(2)] for si in range(3)] == [[29] * 2] * 3


def test_a_hack_budget_holding_the_whole_cache_is_refused():
    with pytest.raises(PlanError) as err:
        HACKConfig(budget=30).make(CLASSES, SCHED, 2, 2)
    assert str(err.value) == (
        "hack: budget of 30 rows per head is not below the whole cache of 30 rows: it would "
        "keep everything"
    )
    assert HACKConfig(budget=29).make(CLASSES, SCHED, 2, 2) is not None


def test_hack_budget_and_compression_together_are_refused():
    with pytest.raises(
        PlanError, match=r"^hack: give budget \(5\) or compression \(0.5\), not both$"
    ):
        HACKConfig(budget=5, compression=0.5).average(SCHED)
    assert HACKConfig(budget=5).average(SCHED) == 5 and HACKConfig().average(SCHED) is None


def test_a_scalekv_compression_after_the_last_scale_is_refused():
    """Maps 1..4: compressions may follow scales 0..2; one after scale 3 would shape a history
    no scale reads."""
    late = ScaleKVScale(after_scale=3, roles="DR", drafter=12, refiner=4)
    with pytest.raises(PlanError) as err:
        ScaleKVConfig(average=8, scales=(late,)).make(None, SCHED, 2, 2)
    assert str(err.value) == (
        "scalekv budgets after scale 3, but the model's schedule has 4 scales (compressions "
        "after scales 0..2)"
    )
    last_allowed = ScaleKVScale(after_scale=2, roles="DR", drafter=12, refiner=4)
    budgets = (
        ScaleKVConfig(average=8, scales=(last_allowed,), window=4).make(None, SCHED, 2, 2).budgets
    )
    assert [budgets.budget(2, layer) for layer in range(2)] == [12, 4]


def test_scalekv_kv_target_is_a_ratio_of_the_average_without_tables():
    """``diffcache profile --target-kv``: the ratio replaces the average and the per-scale
    tables (the calibrator makes new ones); the other options stay."""
    table = (ScaleKVScale(after_scale=2, roles="DR", drafter=12, refiner=4),)
    cfg = ScaleKVConfig(average=8, scales=table, window=4, variant="paper")
    assert cfg.kv_target(0.3) == ScaleKVConfig(ratio=0.3, window=4, variant="paper")


def test_scalekv_options_reach_the_selection():
    """Non-default pooling and the released extra compression after the last scale."""
    cfg = ScaleKVConfig(average=8, window=4, kernel=3, pooling="avg", reference_compat=True)
    selection = cfg.make(None, SCHED, 2, 2)
    assert (selection.pooling, selection.reference_compat) == ("avg", True)
    assert (selection.window, selection.kernel, selection.base_capacity) == (4, 3, 8)
    paper = ScaleKVConfig(average=8, window=4, variant="paper", base_capacity=5)
    selection = paper.make(None, SCHED, 2, 2)
    assert (selection.variant, selection.base_capacity, selection.pooling) == ("paper", 5, "avg")


def test_hack_kv_target_replaces_a_budget_by_the_history_fraction():
    """``--target-kv 0.3`` from a plan with a budget: the budget goes, B = round(0.3 x 14) = 4
    rows (14: the history the last scale sees), the other options stay."""
    cfg = HACKConfig(budget=10, contextual_ratio=2.0).kv_target(0.3)
    assert (cfg.budget, cfg.compression, cfg.reference) == (None, 0.7, "history")
    assert cfg.contextual_ratio == 2.0 and cfg.average(SCHED) == 4


@pytest.mark.parametrize(
    ("budget", "ratio", "classes", "want"),
    [
        # alpha = 3/4 contextual: B_S = floor(10 / (3/4 x 2 + 1/4)) = 5,
        # B_C = floor((10 - 1/4 x 5) / (3/4)) = 11
        (10, 2.0, ((0, 0), (0, 1)), (11, 5)),
        # alpha = 1/4: B_S = floor(10 / (1/4 x 2 + 3/4)) = 8, B_C = floor((10 - 6) / (1/4)) = 16
        (10, 2.0, ((1, 1), (0, 1)), (16, 8)),
        # B = 1, alpha 1/2, ratio 10: B_S = floor(1 / 5.5) = 0 rows, raised to 1; B_C = 2
        (1, 10.0, ((0, 1), (1, 0)), (2, 1)),
        # B = 1, ratio 1/10: B_S = floor(1 / 0.55) = 1, B_C = floor(0.5 / 0.5) = 1
        (1, 0.1, ((0, 1), (1, 0)), (1, 1)),
        # ratio 1/10 at B = 3: B_S = floor(3 / 0.55) = 5, B_C = floor(0.5 / 0.5) = 1
        (3, 0.1, ((0, 1), (1, 0)), (1, 5)),
    ],
)
def test_hack_budgets_split_by_the_contextual_fraction_of_the_classes(budget, ratio, classes, want):
    """alpha·B_C + (1 − alpha)·B_S = B with B_C / B_S = ratio, alpha the contextual fraction of
    the calibration's heads (research/var.md §2.2.3), each class keeping at least one row."""
    cfg = HACKConfig(budget=budget, contextual_ratio=ratio)
    selection = cfg.make(HACKCalibration(classes), SCHED, 2, 2)
    assert (selection.budgets[0], selection.budgets[1]) == want


def test_hack_classes_for_another_model_name_both_shapes():
    with pytest.raises(PlanError) as err:
        HACKConfig(budget=5).make(HACKCalibration(()), SCHED, 2, 2)
    assert str(err.value) == (
        "hack: the calibration's head classes are for 0 layers x 0 heads, the model has 2 "
        "layers x 2 heads"
    )


def test_baseline_options_reach_their_selections():
    """Every option other than the defaults: H2O's recent rows, SnapKV's and PyramidKV's window
    and kernel, PyramidKV's beta, StreamingLLM's sinks; H2O's recent defaults to half the
    budget."""
    h2o = H2OConfig(budget=8, recent=3).make(None, SCHED, 2, 2)
    assert (h2o.tokens, h2o.recent) == (8, 3)
    assert H2OConfig(budget=9).make(None, SCHED, 2, 2).recent == 4
    snap = SnapKVConfig(budget=8, window=2, kernel=3).make(None, SCHED, 2, 2)
    assert (snap.tokens, snap.window, snap.kernel) == (8, 2, 3)
    pyramid = PyramidKVConfig(budget=8, window=2, kernel=3, beta=4).make(None, SCHED, 2, 2)
    assert (pyramid.tokens, pyramid.layers, pyramid.window, pyramid.kernel, pyramid.beta) == (
        8,
        2,
        2,
        3,
        4,
    )
    streaming = StreamingConfig(budget=8, sinks=2).make(None, SCHED, 2, 2)
    assert (streaming.tokens, streaming.sinks) == (8, 2)


@pytest.mark.parametrize(
    "config",
    [H2OConfig(budget=10), SnapKVConfig(budget=10, window=2), StreamingConfig(budget=10)]
    + [PyramidKVConfig(budget=10, window=2)],
)
def test_baseline_kv_target_replaces_a_budget_by_the_history_fraction(config):
    """``--target-kv 0.5`` from a plan with a budget: floor(0.5 x 14) = 7 rows per head."""
    cfg = config.kv_target(0.5)
    assert (cfg.budget, cfg.ratio) == (None, 0.5)
    assert cfg.make(None, SCHED, 2, 2).tokens == 7
