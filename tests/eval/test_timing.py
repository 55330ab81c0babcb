"""How speed is measured and shown: the shared timing rules (fake clocks, no timed assertions),
the report's speedup aggregation, flags and notes, and one real eval of the same plan twice."""

from __future__ import annotations

import itertools
import re
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from diffcache import hooks
from diffcache.cli import main
from diffcache.eval import plots, runner, timing
from diffcache.eval import report as rp
from diffcache.plan import Plan


def test_timed_reads_the_clock_around_the_call() -> None:
    ticks = iter([10.0, 12.5])
    calls = []
    out, seconds = timing.timed(lambda: calls.append(1) or "out", "cpu", clock=lambda: next(ticks))
    assert (out, seconds, calls) == ("out", 2.5, [1])


def test_rounds_rotate_so_no_configuration_keeps_one_slot() -> None:
    orders = [timing.rotated(["base", "a", "b"], r) for r in range(4)]
    assert orders == [
        ["base", "a", "b"],
        ["a", "b", "base"],
        ["b", "base", "a"],
        ["base", "a", "b"],
    ]
    assert [o.index("base") for o in orders[:3]] == [0, 2, 1]


def test_speedups_are_paired_by_round_and_summarised_by_median_and_range() -> None:
    base, plan = [2.0, 4.0, 3.0], [1.0, 1.0, 2.0]  # round 2 ran under load: both slow
    ratios = timing.paired_speedups(base, plan)
    assert ratios == [2.0, 4.0, 1.5]
    assert timing.summary(ratios) == (2.0, 1.5, 4.0)
    assert timing.summary([]) is None
    with pytest.raises(ValueError, match="2 baseline rounds for 3"):
        timing.paired_speedups([1.0, 1.0], plan)


def test_ideal_speedup_and_its_flag() -> None:
    assert timing.ideal_speedup(0.6) == pytest.approx(1 / 0.6)
    assert timing.ideal_speedup(2.111) == 1.0  # a costlier plan cannot beat the baseline
    assert timing.ideal_speedup(None) is None
    assert timing.above_ideal(14.39, 0.6)  # the report
    assert not timing.above_ideal(1.6, 0.6)
    assert not timing.above_ideal(1.05, 1.0)  # within the tolerance
    assert timing.above_ideal(1.0 * (1 + timing.TOLERANCE) + 0.01, 1.0)
    assert not timing.above_ideal(3.0, None)  # diffusers' caches: unknown compute


def test_the_ideal_with_a_fixed_part_is_amdahls() -> None:
    """A plain run of 10 s with 8 s in the denoiser: computing 40% of the denoiser's work takes
    at best 2 + 0.4 x 8 = 5.2 s."""
    assert timing.ideal_speedup(0.4, share=0.8) == pytest.approx(10 / 5.2)
    assert timing.ideal_speedup(1.7, share=0.8) == 1.0  # costlier: no gain, never a loss
    assert timing.ideal_speedup(0.5, share=0.0) == 1.0  # nothing scales
    assert timing.ideal_speedup(None, share=0.8) is None


class _Sleepy(torch.nn.Module):
    """Sleeps ``seconds`` itself and calls ``child`` (if any) once."""

    def __init__(self, seconds: float, child: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.seconds, self.child = seconds, child

    def forward(self) -> None:
        time.sleep(self.seconds)
        if self.child is not None:
            self.child()


def test_time_inside_sums_the_outermost_calls_only() -> None:
    """Two calls of a module whose child is also timed: the child's time is inside its
    parent's, so the total is the parent's wall time, not parent + child."""
    child = _Sleepy(0.02)
    parent = _Sleepy(0.01, child)
    with timing.time_inside([parent, child]) as inside:
        t0 = time.perf_counter()
        parent()
        parent()
        wall = time.perf_counter() - t0
    assert 0.06 <= inside[0] <= wall
    with timing.time_inside([child]) as only_child:
        _, parent_wall = timing.timed(parent)
    assert 0.02 <= only_child[0] <= parent_wall - 0.01  # the child's sleep, not the parent's
    parent()  # the timers are gone after the block
    assert not hooks.layers(parent) and not hooks.layers(child)


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(self.linear(x))


def test_time_inside_reads_the_clock_it_is_given() -> None:
    """With a clock that ticks 1 a reading: each outermost call adds the gap between its two
    readings, and the nested child reads it once in between (its start; it adds nothing), so
    two parent calls sum 2 x 2 = 4."""
    ticks = itertools.count()
    child = _Sleepy(0.0)
    parent = _Sleepy(0.0, child)
    with timing.time_inside([parent, child], clock=lambda: float(next(ticks))) as inside:
        parent()
        parent()
    assert inside[0] == 4.0


def test_evaluate_times_the_runs_by_its_clock(tmp_path: Path) -> None:
    """``evaluate(clock=...)`` (``bench/dit_variants.py --clock cpu``): every timed run reads
    that clock twice, so with one that ticks 1 a reading each latency is 1 and the speedup 1."""
    ticks = itertools.count()
    plan = Plan.load("dit-tiny.yaml").to_dict()
    plan["options"]["warmup_steps"] = 2
    plan["valid_for"]["num_inference_steps"] = 4
    report = runner.evaluate(
        "dit-tiny", [plan], tmp_path, prompts=["1"], request=runner.Request(steps=4),
        repeats=2, threads=1, samples=0, clock=lambda: float(next(ticks)),
    )  # fmt: skip
    assert report["baseline"]["latency_s"] == 1.0
    assert report["runs"][0]["latency_s"] == 1.0 and report["runs"][0]["speedup"] == 1.0


def test_time_inside_times_a_module_compiled_on_its_own() -> None:
    """A block compiled in place with ``fullgraph=True`` (how bench/dit_variants.py's compiled
    column runs HyCa) is timed outside its graph: the graph still compiles whole, the output is
    the module's, and the time is inside the wall time of the calls."""
    net, x = _Block(), torch.randn(2, 4)
    want = net(x)
    net.compile(backend="eager", fullgraph=True)
    with timing.time_inside([net]) as inside:
        out, wall = timing.timed(lambda: net(x))
    assert torch.equal(out, want)
    assert 0 < inside[0] <= wall
    assert not hooks.layers(net)


def test_measurement_threads_default_and_restore(monkeypatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with timing.measurement_threads() as n:
        assert n == 1 == torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    with timing.measurement_threads() as n:
        assert n == 2 == torch.get_num_threads()
    with timing.measurement_threads(3) as n:
        assert n == 3 == torch.get_num_threads()
    assert torch.get_num_threads() == before


def _comparison(name: str) -> Any:
    return SimpleNamespace(name=name, plan=object(), method="easycache")


def _records(name: str, base: list[list[float]], times: list[list[float]], cf: float) -> list:
    """Records as the runner makes them: per request, the rounds' times and paired speedups."""
    recs = []
    for i, (b, t) in enumerate(zip(base, times, strict=True)):
        recs.append(runner._record("baseline", i, b, None, None, None, None, None))
        stats = SimpleNamespace(compute_fraction=cf, per_step=lambda: [1.0], kv_bytes_peak=0)
        rec = runner._record(name, i, t, None, None, None, None, stats)
        rec["speedup_repeats"] = timing.paired_speedups(b, t)
        recs.append(rec)
    return recs


def _report(name: str, base: list[list[float]], times: list[list[float]], cf: float) -> dict:
    recs = _records(name, base, times, cf)
    for r in recs:
        r.update(task_score=None, psnr=30.0, ssim=0.9, lpips=None)
    return runner._report("m", "cpu", [_comparison(name)], [], recs, None, [], repeats=len(base[0]))


def test_report_speedup_is_the_median_of_every_paired_ratio_with_its_range() -> None:
    base = [[1.0, 1.2, 1.1], [2.0, 2.0, 2.2]]
    plan = [[0.8, 0.6, 0.5], [1.0, 1.6, 1.1]]
    report = _report("p", base, plan, 0.5)
    run = report["runs"][0]
    ratios = [b / t for bs, ts in zip(base, plan, strict=True) for b, t in zip(bs, ts, strict=True)]
    assert run["speedup"] == pytest.approx(statistics.median(ratios))
    assert run["speedup_spread"] == pytest.approx([min(ratios), max(ratios)])
    medians = [statistics.median(ts) for ts in plan]
    assert run["latency_s"] == pytest.approx(statistics.mean(medians))
    assert report["baseline"]["latency_s"] == pytest.approx(1.1 / 2 + 2.0 / 2)
    assert report["records"][1]["latency_repeats"] == plan[0] and report["repeats"] == 3
    assert "median of the paired ratios" in report["notes"]["speedup"]
    assert "measurement problem" not in report["notes"]["speedup"]
    assert rp.speedup_text(run) == (f"{run['speedup']:.2f}× ({min(ratios):.2f}–{max(ratios):.2f})")


def test_a_speedup_above_the_ideal_is_flagged_not_shown_as_a_result(tmp_path: Path) -> None:
    # a baseline that stalled in every round: 14x for a plan computing 60% of the work
    report = _report("fast.yaml", [[14.0, 15.0, 14.5]], [[1.0, 1.0, 1.0]], 0.6)
    run = report["runs"][0]
    assert run["speedup"] == 14.5  # kept in report.json
    note = report["notes"]["speedup"]
    assert "fast.yaml, 14.50x, is above the ideal 1.67x" in note and "measurement problem" in note
    cell = rp.cell(run, "speedup")
    assert cell.startswith("⚠ 14.50× (14.00–15.00)") and "ideal 1.67×" in cell
    rp.write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "⚠ 14.50×" in md and "| 14.5 |" not in md
    page = (tmp_path / "report.html").read_text()
    assert "⚠ 14.50×" in page and "Not placed on the PSNR" in page  # nor on the chart
    assert plots.left_out([run], "psnr") == ["fast.yaml"]
    assert plots.left_out([{**run, "speedup": 1.6}], "psnr") == []


def test_a_compute_fraction_above_one_says_the_plan_costs_more(tmp_path: Path) -> None:
    report = _report("fast_dllm.yaml", [[1.0, 1.0]], [[1.5, 1.5]], 114 / 54)
    run = report["runs"][0]
    assert (
        "fast_dllm.yaml: compute_fraction 2.111 is above 1: the plan costs more than no cache"
        in (report["notes"]["compute_fraction"])
    )
    assert "measurement problem" not in report["notes"]["speedup"]  # 0.67x: no flag
    assert rp.cell(run, "compute_fraction") == "⚠ 2.111: costs more than no cache"
    assert rp.cell({"compute_fraction": 0.5}, "compute_fraction") == "0.5"
    rp.write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "⚠ 2.111: costs more than no cache" in md and "the plan costs more than no cache" in md


def test_print_report_says_a_costlier_plan_costs_more(tmp_path: Path, capsys) -> None:
    from diffcache.cli import _print_report

    _print_report(_report("p.yaml", [[1.0]], [[2.0]], 1.5), tmp_path)
    out = capsys.readouterr().out
    assert "p.yaml: speedup 0.50× (0.50–0.50)" in out
    assert "p.yaml: compute_fraction 1.500 is above 1: the plan costs more than no cache" in out


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--repeats", "0"], "--repeats must be a whole number >= 1, got 0"),
        (["--threads", "0"], "--threads must be a whole number >= 1, got 0"),
    ],
)
@pytest.mark.parametrize("command", ["eval", "demo", "profile"])
def test_bad_timing_flags_are_refused_before_any_work(
    tmp_path: Path, capsys, monkeypatch, command: str, flags: list[str], says: str
) -> None:
    monkeypatch.setattr("diffcache.load_model", lambda *a: pytest.fail("built a model"))
    args = {
        "eval": ["eval", "--model", "dit-tiny", "--plan", "dit-tiny.yaml", "--out", "o"],
        "demo": ["demo", "--model", "dit-tiny", "--out", "o"],
        "profile": ["profile", "--model", "dit-tiny", "--method", "easycache", "--out", "o.yaml"],
    }[command]
    monkeypatch.chdir(tmp_path)
    assert main([*args, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"diffcache: error: {says}"] and not (tmp_path / "o").exists()


def test_the_same_plan_twice_reports_speedups_within_each_others_spread(tmp_path: Path) -> None:
    """The issue's done-criterion, with real clocks: a tiny model, 4 inputs x 5 rounds, so each
    speedup is the median of 20 paired ratios and its spread their range."""
    plan = Plan.load("dit-tiny.yaml").to_dict()
    plan["options"]["warmup_steps"] = 2
    plan["valid_for"]["num_inference_steps"] = 6
    request = runner.Request(steps=6)
    report = runner.evaluate(
        "dit-tiny", [plan, plan], tmp_path, prompts=["1", "2", "3", "4"], request=request,
        repeats=5, threads=1, samples=0,
    )  # fmt: skip
    a, b = report["runs"]
    assert report["environment"]["threads"] == 1 and report["repeats"] == 5
    assert (
        len([s for r in report["records"] if r["run"] == a["plan"] for s in r["speedup_repeats"]])
        == 20
    )
    for one, other in itertools.permutations((a, b)):
        low, high = other["speedup_spread"]
        assert low <= one["speedup"] <= high, (a, b)


def test_generate_says_a_plan_costs_more_than_no_cache(capsys) -> None:
    """The issue's case: Fast-dLLM on dream-tiny, 7 tokens in 3 steps, computes more token-layers
    than the plain generation."""
    args = ["generate", "--model", "dream-tiny", "--plan", "dream-tiny-fast_dllm.yaml"]
    assert main([*args, "--gen-length", "7", "--steps", "3", "--prompt", "hi"]) == 0
    err = capsys.readouterr().err
    computed, total = map(int, re.search(r"computed (\d+) of (\d+) ", err).groups())
    assert computed > total
    said = f"compute_fraction {computed / total:.3f} is above 1: the plan costs more than no cache"
    assert said in err


def test_each_text_record_counts_the_tokens_of_its_own_generation(tmp_path: Path, monkeypatch):
    """Records are made after the rounds: each keeps the tokens its own first-round generation
    made, not those of whichever configuration ran last."""
    import diffcache

    real = runner.generate

    def generate(pipe: Any, req: Any) -> Any:
        out = real(pipe, req)
        pipe.last_output = SimpleNamespace(generated=[5 if diffcache.is_accelerated(pipe) else 3])
        return out

    monkeypatch.setattr(runner, "generate", generate)
    request = runner.Request(gen_length=4, steps=4, block_length=4)
    report = runner.evaluate(
        "llada-tiny", ["llada-tiny-fast_dllm.yaml"], tmp_path, prompts=["hi", "a b"],
        request=request, repeats=2, samples=0,
    )  # fmt: skip
    tokens = {(r["run"], r["request"]): r["tokens"] for r in report["records"]}
    assert tokens == {
        ("baseline", 0): 3,
        ("baseline", 1): 3,
        ("llada-tiny-fast_dllm.yaml", 0): 5,
        ("llada-tiny-fast_dllm.yaml", 1): 5,
    }


def test_prepare_makes_the_pipeline_every_run_uses(tmp_path: Path) -> None:
    """``evaluate(prepare=...)``: the pipeline it returns (here another one) runs the baseline
    and the plans; the loaded one never runs."""
    import diffcache

    calls = {"loaded": 0, "prepared": 0}

    def counting(pipe, key):
        pipe.transformer.register_forward_pre_hook(
            lambda *a: calls.__setitem__(key, calls[key] + 1)
        )
        return pipe

    def prepare(loaded):
        counting(loaded, "loaded")
        return counting(diffcache.load_model("dit-tiny"), "prepared")

    plan = Plan.load("dit-tiny.yaml").to_dict()
    plan["options"]["warmup_steps"] = 2
    plan["valid_for"]["num_inference_steps"] = 4
    runner.evaluate(
        "dit-tiny", [plan], tmp_path, prompts=["1"], request=runner.Request(steps=4),
        repeats=1, threads=1, samples=0, prepare=prepare,
    )  # fmt: skip
    assert calls["loaded"] == 0 and calls["prepared"] >= 2 * 4  # baseline + warm-up at least
