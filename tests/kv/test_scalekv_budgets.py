"""ScaleKV's budget plans: the released JSON format, the per-scale average constraint, and when
each budget applies (research/var.md §2.1.2, §2.1.4; §3.2 items 4 and 9)."""

from __future__ import annotations

import json

import pytest

from diffcache.errors import PlanError
from diffcache.kv import ScaleCall, Schedule
from diffcache.kv.scalekv import ScaleKVSelection
from diffcache.kv.scalekv_budgets import (
    RELEASED_2B_10PCT,
    RELEASED_8B_10PCT,
    ScaleBudget,
    ScaleKVBudgets,
    read_scalekv_json,
)

INFINITY_1M = Schedule.square((1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64))

# Synthetic, shaped like the released files: 4 layers, 100 tokens on average.
FIXTURE = {
    "Scale 9": {"Max": 160, "Min": 80, "High": 1, "Limit": 921, "Block 0": 1, "Block 1": 0,
                "Block 2": 0, "Block 3": 0},
    "Scale 10": {"Max": 130, "Min": 70, "High": 2, "Limit": 1736, "Block 0": 0, "Block 1": 1,
                 "Block 2": 0, "Block 3": 1},
}  # fmt: skip


def write(tmp_path, data):
    path = tmp_path / "budget.json"
    path.write_text(json.dumps(data))
    return path


def test_scale_s_applies_after_zero_based_scale_s_minus_2(tmp_path):
    plan = read_scalekv_json(write(tmp_path, FIXTURE), layers=4, average=100)
    assert [(s.applies_after_si, s.roles) for s in plan.scales] == [(7, "DRRR"), (8, "RDRD")]
    assert [plan.budget(7, layer) for layer in range(4)] == [160, 80, 80, 80]
    assert [plan.budget(8, layer) for layer in range(4)] == [70, 130, 70, 130]
    assert plan.budget(6, 0) is None and plan.budget(9, 0) is None


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"Max": 161}, r"1·161 \+ 3·80 = 401 is not 4·100 = 400"),
        ({"High": 2}, "'High' 2 is not the 1 drafter blocks"),
        ({"Block 3": 2}, "each 0 or 1"),
        ({"Block 4": 0}, "each 0 or 1 for a 4-layer model"),
    ],
)
def test_bad_plans_are_one_error(tmp_path, edit, message):
    data = {**FIXTURE, "Scale 9": {**FIXTURE["Scale 9"], **edit}}
    with pytest.raises(PlanError, match=message):
        read_scalekv_json(write(tmp_path, data), layers=4, average=100)


def test_bad_keys_and_files_are_one_error(tmp_path):
    with pytest.raises(PlanError, match="'Scale nine' is not 'Scale <s>'"):
        read_scalekv_json(write(tmp_path, {"Scale nine": {}}), layers=4)
    with pytest.raises(PlanError, match="cannot read ScaleKV budgets"):
        read_scalekv_json(tmp_path / "missing.json", layers=4)


@pytest.mark.parametrize(
    ("plan", "layers", "drafters"),
    [(RELEASED_2B_10PCT, 32, [2, 2, 2, 2, 1]), (RELEASED_8B_10PCT, 40, [3] * 5)],
)
def test_released_tables_hold_650_on_average(plan, layers, drafters):
    """research/var.md §2.1.4: High·Max + (L−High)·Min = L·650 at every scale."""
    assert plan.layers == layers and plan.average == 650
    assert [s.applies_after_si for s in plan.scales] == [7, 8, 9, 10, 11]
    assert [s.roles.count("D") for s in plan.scales] == drafters
    for s in plan.scales:
        assert (
            sum(plan.budget(s.applies_after_si, layer) for layer in range(layers)) == 650 * layers
        )


def test_released_trigger_and_budgets_over_the_1m_schedule():
    """Nothing while the cache stays within 650 rows (si 0..6: 521); "Scale 9" after si 7; no
    compression after the last scale unless reference_compat, then with "Scale 13"."""
    sel = ScaleKVSelection(RELEASED_2B_10PCT)
    compat = ScaleKVSelection(RELEASED_2B_10PCT, reference_compat=True)

    def budgets(s, si):
        call = ScaleCall(layer=0, si=si, schedule=INFINITY_1M, cond_rows=1)
        return s.budget(call, 0, 0), s.budget(ScaleCall(23, si, INFINITY_1M, 1), 0, 0)

    assert [budgets(sel, si) for si in range(13)] == [(None, None)] * 7 + [
        (920, 920), (1490, 1490), (2510, 2510), (4100, 4100), (6385, 465), (None, None)
    ]  # fmt: skip
    assert budgets(compat, 12) == (6385, 465)
    sel.check(INFINITY_1M, layers=32)
    with pytest.raises(PlanError, match="for 32 layers, the model has 40"):
        sel.check(INFINITY_1M, layers=40)


def test_a_plan_missing_a_triggered_scale_is_one_error():
    """A schedule whose cache exceeds 650 rows earlier than the plan expects."""
    early = Schedule.square((1, 2, 4, 6, 8, 12, 24, 24))
    with pytest.raises(
        PlanError, match=r"no entry for the compression after scale 6 \(key 'Scale 8'\)"
    ):
        ScaleKVSelection(RELEASED_2B_10PCT).check(early, layers=32)


def test_a_released_file_imports_without_naming_its_average(tmp_path, capsys):
    """``diffcache plans import --method scalekv`` without ``--average`` reads a released 10%
    file as the released 650 tokens per head and layer: the 8B file's rows (research/var.md
    §2.1.4, written out here in its JSON format) pass the exact per-scale average check only at
    650, and the plan equals the transcribed table."""
    from diffcache.cli import main
    from diffcache.plan import Plan

    rows = {9: (909, 629), 10: (1464, 584), 11: (2463, 503), 12: (4054, 374), 13: (6200, 200)}
    data = {}
    for s, (mx, mn) in rows.items():
        blocks = {f"Block {b}": int(b < 3) for b in range(40)}
        data[f"Scale {s}"] = {"Max": mx, "Min": mn, "High": 3, **blocks}
    out = tmp_path / "plan.yaml"
    argv = ["plans", "import", str(write(tmp_path, data)), "--method", "scalekv", "--depth", "40"]
    assert main([*argv, "--family", "infinity", "--out", str(out)]) == 0
    capsys.readouterr()
    options = Plan.load(out).options
    assert options["average"] == 650
    drafters = "D" * 3 + "R" * 37
    assert options["scales"] == [
        {"after_scale": s - 2, "roles": drafters, "drafter": mx, "refiner": mn}
        for s, (mx, mn) in rows.items()
    ]
    released = RELEASED_8B_10PCT.scales
    assert [(s.applies_after_si, s.roles, s.drafter, s.refiner) for s in released] == [
        (s - 2, drafters, mx, mn) for s, (mx, mn) in rows.items()
    ]


def test_every_error_names_the_file_and_what_it_wants(tmp_path):
    """The messages a user of ``plans import`` reads: the file's path, the key, the layers it
    wants ('Block 0'..'Block 3' for 4 layers) and the scale of an average that does not hold;
    'Scale 2' (after scale 0) is the first key a file can have."""
    path = write(tmp_path, {**FIXTURE, "Scale 9": {**FIXTURE["Scale 9"], "Max": 161}})
    with pytest.raises(PlanError) as err:
        read_scalekv_json(path, layers=4, average=100)
    assert str(err.value) == (
        f"ScaleKV budgets {path} after scale 7: 1·161 + 3·80 = 401 is not 4·100 = 400"
    )
    path = write(tmp_path, {**FIXTURE, "Scale 9": {**FIXTURE["Scale 9"], "Block 3": 2}})
    with pytest.raises(PlanError) as err:
        read_scalekv_json(path, layers=4, average=100)
    assert str(err.value) == (
        f"ScaleKV budgets {path} 'Scale 9': want 'Block 0'..'Block 3' each 0 or 1 "
        "for a 4-layer model"
    )
    with pytest.raises(PlanError) as err:
        read_scalekv_json(write(tmp_path, {"Scale 1": FIXTURE["Scale 9"]}), layers=4)
    assert str(err.value) == (
        f"ScaleKV budgets {path}: key 'Scale 1' is not 'Scale <s>' with s >= 2"
    )
    first = read_scalekv_json(write(tmp_path, {"Scale 2": FIXTURE["Scale 9"]}), 4, 100)
    assert [(s.applies_after_si, s.roles) for s in first.scales] == [(0, "DRRR")]
    assert first.source == str(path)


def test_a_plan_built_in_code_names_no_file():
    """A plan made in code (no ``source``) says only which scale breaks the average."""
    with pytest.raises(PlanError) as err:
        ScaleKVBudgets(100, (ScaleBudget(7, "DRRR", 161, 80),))
    assert str(err.value) == "ScaleKV budgets after scale 7: 1·161 + 3·80 = 401 is not 4·100 = 400"
