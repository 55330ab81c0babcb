"""The samples a run lost / won against the baseline and the sign test of that split, as the
report's tables and charts show them; the chart axes and the sample grid's caption."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from diffcache.eval import paired, plots
from diffcache.eval import report as rp


@pytest.mark.parametrize("lost, won", [(0, 0), (1, 0), (0, 1), (3, 3), (0, 5), (2, 9), (12, 4)])
def test_sign_test_is_scipys_exact_binomial_test(lost: int, won: int) -> None:
    from scipy.stats import binomtest

    want = 1.0 if lost + won == 0 else binomtest(lost, lost + won, 0.5).pvalue
    assert paired.sign_test(lost, won) == pytest.approx(want, rel=1e-12)


# per request: the baseline's task score and two runs' (run "a" loses request 0 and wins 2; "b"
# scores like the baseline everywhere)
BASE = [1.0, 1.0, 0.0, 1.0, 0.0]
RUNS = {"a": [0.0, 1.0, 1.0, 1.0, 0.0], "b": BASE}


def _toy() -> dict[str, Any]:
    records = [
        {"run": run, "request": i, "task_score": v}
        for run, scores in {"baseline": BASE, **RUNS}.items()
        for i, v in enumerate(scores)
    ]
    runs = [
        {"plan": name, "method": "easycache", "speedup": 1.5 + k, "psnr": 30.0,
         "task_score": sum(s) / len(s), "samples": len(s)}
        for k, (name, s) in enumerate(RUNS.items())
    ]  # fmt: skip
    return {
        "model": "toy",
        "baseline": {"latency_s": 1.0, "task_score": sum(BASE) / len(BASE)},
        "runs": runs,
        "records": records,
        "requests": [{"prompt": "p", "seed": i} for i in range(len(BASE))],
    }


def test_lost_won_counts_of_a_toy_report() -> None:
    flips = paired.flips(_toy(), "task_score")
    assert flips == {"a": (1, 1, 1.0), "b": (0, 0, 1.0)}
    assert paired.flips(_toy(), "accuracy") == {}  # no per-sample values of it


def test_tables_and_chart_show_lost_won_beside_the_task_score(tmp_path: Path) -> None:
    paths = rp.write_report(_toy(), tmp_path)
    md, page = paths["md"].read_text(), paths["html"].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| a |"))
    assert "| 0.6 (lost 1 / won 1, p 1) |" in row  # run a's task score is 3/5
    assert "lost 1 / won 1, p 1" in page.split("<tbody>")[1].split("</tbody>")[0]
    assert "exact sign test" in md and "exact sign test" in page
    fig = plots.quality_figure(
        _toy()["runs"], _toy()["baseline"], paired.flips(_toy(), "task_score")
    )
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "a: task score 0.6 (lost 1 / won 1, p 1)" in legend


def test_share_axes_stay_within_zero_and_one() -> None:
    runs = [
        {"plan": "x", "speedup": 1.2, "tokens_per_s": 5.0, "agreement": 1.0, "accuracy": 1.0},
        {"plan": "y", "speedup": 2.0, "tokens_per_s": 9.0, "agreement": 0.98, "accuracy": 0.97},
    ]
    fig = plots.quality_figure(runs, {"accuracy": 1.0})
    assert [ax.get_ylim() for ax in fig.axes] == [(0.0, 1.0), (0.0, 1.0)]


def test_grid_says_how_many_requests_it_shows(tmp_path: Path) -> None:
    import numpy as np

    report = _toy()
    image = np.zeros((4, 4, 1), dtype=np.float32)
    media = {(run, i): image for run in ("baseline", "a", "b") for i in range(2)}
    rp.write_report(report, tmp_path, media=media)
    page = (tmp_path / "report.html").read_text()
    assert "Showing 2 of 5 requests (the first 2; the table scores all 5)." in page
    media = {(run, i): image for run in ("baseline", "a", "b") for i in range(5)}
    rp.write_report(report, tmp_path, media=media)
    assert "All 5 requests." in (tmp_path / "report.html").read_text()


def test_eval_summary_gives_lost_won_and_no_unit_after_n_a(tmp_path: Path, capsys) -> None:
    from diffcache.cli import _print_report

    report = _toy()
    report["device"] = "cpu"
    for run in report["runs"]:
        run.update(compute_fraction=0.5, macs_fraction=0.5, ssim=0.9)
    report["runs"][1]["psnr"] = None  # an exact match
    _print_report(report, tmp_path)
    a, b = capsys.readouterr().out.splitlines()[1:3]
    assert a.endswith("PSNR 30.00 dB, SSIM 0.9000, task score 0.600 (lost 1 / won 1, p 1)")
    assert "PSNR n/a, SSIM" in b and "task score 0.600 (lost 0 / won 0, p 1)" in b
