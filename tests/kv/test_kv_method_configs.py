"""Issue 23's bad input at the method configs, before any model runs: a budget that would hold
the whole cache, and two ways of giving the budget at once (research/var.md §3.2 item 5)."""

from __future__ import annotations

import pytest

from diffcache.errors import PlanError
from diffcache.kv import Schedule
from diffcache.methods.hack import HACKCalibration, HACKConfig
from diffcache.methods.scalekv import ScaleKVConfig

SCHED = Schedule.square((1, 2, 3, 4))  # 30 tokens
CLASSES = HACKCalibration(((0, 1), (1, 0)))


def test_a_scalekv_average_holding_the_whole_cache_is_refused():
    with pytest.raises(PlanError) as err:
        ScaleKVConfig(average=30).make(SCHED, 2, 2)
    assert str(err.value) == (
        "scalekv average budget of 30 rows is not below the whole cache of 30 rows: it would "
        "keep everything"
    )
    budgets = ScaleKVConfig(average=29).make(SCHED, 2, 2).budgets
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
