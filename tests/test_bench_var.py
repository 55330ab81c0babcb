"""``bench/var.py`` on var-tiny (scales 1, 2, 3, 4: 14 history rows before the last scale;
2 layers x 2 heads of 32, K and V fp32, one label and its CFG twin): the plans it builds run,
their measured bytes are diffcache.kv.memory's arithmetic, and bad flags are one usage line."""

from __future__ import annotations

import json
import runpy
import time
from pathlib import Path
from typing import Any

import pytest

from diffcache.kv.history import Schedule
from diffcache.kv.memory import Geometry

BENCH = Path(__file__).resolve().parents[1] / "bench" / "var.py"
SCHEDULE = Schedule.square((1, 2, 3, 4))
GEOMETRY = Geometry(2, 2, 32, SCHEDULE, rows=2, k_bytes=4, v_bytes=4)
METHODS = ["scalekv", "hack", "h2o", "snapkv", "streaming", "pyramidkv"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH.parent))  # as `python bench/var.py` has it
        return runpy.run_path(str(BENCH))


@pytest.fixture(scope="module")
def report(bench: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench-var")
    argv = ["--models", "var-tiny", "--rounds", "1", "--device", "cpu", "--out", str(out)]
    assert bench["main"](argv) == 0
    assert (out / "var.md").read_text().count("| var-tiny |") == len(METHODS) * 3
    return json.loads((out / "var.json").read_text())


def _cell(report: dict[str, Any], method: str, budget: float) -> dict[str, Any]:
    cells = report["models"]["var-tiny"]["cells"]
    return next(c for c in cells if c["method"] == method and c["budget"] == budget)


@pytest.mark.parametrize(
    ("method", "ratio"),
    [
        ("h2o", 0.5),
        ("h2o", 0.3),
        ("snapkv", 0.3),
        ("streaming", 0.5),
        ("hack", 0.5),
        ("snapkv", 0.5),
    ],
)
def test_uniform_budgets_measure_the_memory_arithmetic(
    report: dict[str, Any], method: str, ratio: float
) -> None:
    cell = _cell(report, method, ratio)
    rows = int(ratio * 14)
    assert cell["rows_per_head"] == rows
    full = GEOMETRY.history_before()[-1]
    want = GEOMETRY.history_before(lambda si, layer: rows)[-1]
    assert cell["history_bytes"] == want and cell["full_history_bytes"] == full
    assert cell["history"] == cell["history_arith"] == want / full
    assert cell["exact"], cell  # every scale's bytes and the layer-sweep peak


def test_every_plan_that_runs_is_the_arithmetic_and_refusals_name_their_cause(
    report: dict[str, Any],
) -> None:
    cells = report["models"]["var-tiny"]["cells"]
    ran = [c for c in cells if "refused" not in c]
    assert all(c["exact"] and c["peak"] == c["peak_arith"] for c in ran)
    # 30% and 10% of 14 rows are 4 and 1: below the 4-row window of ScaleKV / SnapKV /
    # PyramidKV (1), StreamingLLM's 5 sinks and the 5 rows of HACK's first two scales
    refused = {(c["method"], c["budget"]) for c in cells if "refused" in c}
    assert refused == {
        ("scalekv", 0.1),
        ("snapkv", 0.1),
        ("pyramidkv", 0.1),
        ("streaming", 0.3),
        ("streaming", 0.1),
        ("hack", 0.3),
        ("hack", 0.1),
    }
    assert "below the 5 tokens it always keeps" in _cell(report, "streaming", 0.3)["refused"]
    # scalekv keeps the history before the last scale at its average (no compression after it)
    scalekv = _cell(report, "scalekv", 0.5)
    assert scalekv["history_bytes"] == GEOMETRY.history_before(lambda si, layer: 7)[-1]
    classes = report["models"]["var-tiny"]["hack_classes"]  # alpha 0.5: 2 of the 4 heads
    assert sorted(c for row in classes for c in row) == [0, 0, 1, 1]


def test_grouped_peak_with_one_group_is_the_plain_sweep_peak() -> None:
    def budget(si: int, layer: int) -> int:
        return (5, 3)[layer]

    one = GEOMETRY.sweep_peak(budget, [[2], [2]])
    assert one == GEOMETRY.sweep_peak(budget)
    # two groups of one head: while a head group holds its transient rows, the layer's other
    # head holds its old (or already kept) rows, so the peak can only be lower
    two = GEOMETRY.sweep_peak(budget, [[1, 1], [1, 1]])
    assert two < one


def test_hack_with_unequal_classes_measures_the_memory_arithmetic(bench: dict[str, Any]) -> None:
    """B = 9 rows split 3:2 (alpha 0.5): contextual heads keep 11 of the 14 history rows,
    structural ones 7; each layer has one head of each class."""
    import diffcache
    from diffcache.generate import Request, generate
    from diffcache.models import load_model

    pipe = load_model("var-tiny")
    schedule, layers, heads = bench["model_shape"](pipe)
    plan = {
        "diffcache": 1,
        "model": "var",
        "method": "hack",
        "options": {"budget": 9, "contextual_ratio": 1.5, "recent_cap": 2},
        "calibration": {"classes": [[0, 1], [1, 0]]},
    }
    diffcache.accelerate(pipe, plan)
    try:
        generate(pipe, Request(seed=0, class_label=1))
        stats = diffcache.stats(pipe)
    finally:
        diffcache.remove(pipe)
    cell = bench["memory_check"](stats, plan, schedule, layers, heads)
    want = layers * (11 + 7) * GEOMETRY.head_row_bytes
    assert cell["history_bytes"] == want and cell["full_history_bytes"] == 2 * 2 * 14 * 512
    assert cell["exact"] and cell["peak"] == cell["peak_arith"], cell


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--budgets", "0.5,1.5"], "--budgets: must be in (0, 1], got 1.5"),
        (["--methods", "scalekv,hak"], "--methods: unknown ['hak']"),
        (["--models", "dit-tiny"], "--models: unknown ['dit-tiny']"),
        (["--rounds", "0"], "--rounds: must be >= 1, got 0"),
        (["--clock", "cpu", "--device", "cuda"], "--clock cpu: CPU time does not count the GPU"),
        (["--clock", "gpu"], "--clock: invalid choice: 'gpu'"),
    ],
)
def test_bad_flags_are_one_usage_line(
    bench: dict[str, Any], argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        bench["parse_args"](argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_infinity_runs_with_its_prompt_and_measures_the_arithmetic(
    bench: dict[str, Any], tmp_path: Path
) -> None:
    """(With ``--clock cpu``: the process's CPU seconds, named in the JSON and the table.)"""
    argv = ["--models", "infinity-tiny", "--methods", "h2o", "--budgets", "0.5", "--rounds", "1"]
    argv += ["--clock", "cpu"]
    assert bench["main"]([*argv, "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "var.json").read_text())
    assert report["clock"] == "cpu" and bench["CLOCKS"]["cpu"] is time.process_time
    assert "time ratio [min, max] (cpu clock)" in (tmp_path / "var.md").read_text()
    res = report["models"]["infinity-tiny"]
    (cell,) = res["cells"]
    schedule = Schedule([tuple(s) for s in res["schedule"]])
    rows = int(0.5 * schedule.start(len(schedule) - 1))
    g = Geometry(res["layers"], res["heads"], 1, schedule, rows=1)  # bytes cancel in the ratio
    want = g.history_before(lambda si, layer: rows)[-1] / g.history_before()[-1]
    assert cell["rows_per_head"] == rows and cell["exact"]
    assert cell["history"] == pytest.approx(want, rel=1e-12)


def test_var_attend_replays_one_generation_into_every_store(tmp_path: Path) -> None:
    """bench/var_attend.py on var-tiny: one recorded call per layer and scale (2 x 4), a cell
    per store (plain + 2 methods x 3 budgets; a plan the model refuses says why), the plain
    cache at 1.0 of itself."""
    script = BENCH.parent / "var_attend.py"
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH.parent))
        attend = runpy.run_path(str(script))
    argv = ["--models", "var-tiny", "--repeats", "1", "--out", str(tmp_path)]
    assert attend["main"](argv) == 0
    res = json.loads((tmp_path / "var_attend.json").read_text())["models"]["var-tiny"]
    assert res["calls"] == 2 * len(SCHEDULE)
    names = ["plain"] + [f"{m}@{b:g}" for m in ("scalekv", "hack") for b in (0.5, 0.3, 0.1)]
    assert sorted(res["cells"]) == sorted(names) and res["cells"]["plain"]["vs_plain"] == 1.0
    assert all("vs_plain" in c or "below" in c["refused"] for c in res["cells"].values())
    # the key rows the queries attended: the plain cache every earlier map and its own, per
    # layer; a compressing store fewer; each replay dispatches aten ops, SDPA among them
    plain = res["cells"]["plain"]
    assert plain["key_rows"] == 2 * sum(SCHEDULE.start(si + 1) for si in range(len(SCHEDULE)))
    ran = [c for c in res["cells"].values() if "vs_plain" in c]
    assert all(c["key_rows"] < plain["key_rows"] for c in ran if c is not plain)
    assert all(c["aten_ops"] >= res["calls"] and c["attention_ms"] > 0 for c in ran)
