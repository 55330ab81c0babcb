"""ScaleKVSelection's rules the reference test (test_selection_reference.py) does not reach: an
explicit ``base_capacity``, ``check`` on a one-layer plan, and its refusals' messages (a plan's
user reads them as ``diffcache: error: ...``)."""

from __future__ import annotations

import re

import pytest
import torch

from diffcache.errors import PlanError
from diffcache.kv import ScaleCall, Schedule
from diffcache.kv.scalekv import ScaleKVSelection
from diffcache.kv.scalekv_budgets import ScaleBudget, ScaleKVBudgets

INFINITY_1M = Schedule.square((1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64))


def _plan(scales, source: str = "") -> ScaleKVBudgets:
    """A one-layer plan of 60 rows after each scale of ``scales``."""
    return ScaleKVBudgets(60, tuple(ScaleBudget(si, "D", 60, 60) for si in scales), source)


def test_base_capacity_given_replaces_the_plans_average():
    """After scale 4 the cache holds 1+4+16+36+64 = 121 rows: compressed only while the base
    (the plan's average, 60, unless given) is below 121."""
    call = ScaleCall(layer=0, si=4, schedule=INFINITY_1M, cond_rows=1)
    budgets = [
        ScaleKVSelection(_plan([4]), base_capacity=base).budget(call, 0, 121)
        for base in (None, 120, 121)
    ]
    assert budgets == [60, 60, None]


def test_check_passes_a_one_layer_plan_covering_every_compression():
    """Base 100: scales 4..11 compress (the last scale does not without reference_compat)."""
    ScaleKVSelection(_plan(range(4, 12)), base_capacity=100).check(INFINITY_1M, layers=1)


@pytest.mark.parametrize("source", ["", "plans/x.json"])
def test_a_missing_compression_is_refused_naming_the_plans_source_and_key(source):
    where = f" {source}" if source else ""
    message = (
        f"ScaleKV budgets{where} have no entry for the compression after scale 5 (key 'Scale 7')"
    )
    sel = ScaleKVSelection(_plan([4], source), base_capacity=100)
    with pytest.raises(PlanError, match=f"^{re.escape(message)}$"):
        sel.check(INFINITY_1M, layers=1)


def test_an_unknown_variant_is_refused_by_name():
    with pytest.raises(
        PlanError, match=r"^ScaleKV variant 'exact' is not one of 'released', 'paper'$"
    ):
        ScaleKVSelection(_plan([4]), "exact")


def test_the_released_variant_without_the_reprojected_query_says_so():
    call = ScaleCall(layer=0, si=4, schedule=INFINITY_1M, cond_rows=1)
    k = torch.zeros(1, 1, 121, 4)
    message = "ScaleKV variant 'released' needs the model's re-projected query"
    with pytest.raises(PlanError, match=f"^{re.escape(message)}$"):
        ScaleKVSelection(_plan([4]), base_capacity=100).keep(call, 0, k[:, :, -64:], k, k)
