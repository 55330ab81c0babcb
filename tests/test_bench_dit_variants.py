"""``bench/dit_variants.py``'s of-ideal columns: their arithmetic and the shares they divide by."""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "dit_variants.py"


@pytest.fixture(scope="module")
def bench() -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(SCRIPT.parent))  # as `python bench/dit_variants.py` has it
        return runpy.run_path(str(SCRIPT))


def test_the_goal_keeps_the_time_outside_the_counted_work_fixed(bench: dict[str, Any]) -> None:
    """A plain run of 10 s: 8 s in the denoiser, 6 s in its blocks, 5 s in their modules. A plan
    computing 40% of the work its compute fraction counts, in 1 / 1.5 of the time, is at best
    2 + 0.4 x 8 = 5.2 s for a step method (the denoiser calls scale), 4 + 0.4 x 6 = 6.4 s for
    HyCa (its blocks scale), 5 + 0.4 x 5 = 7 s for InvarDiff (its modules scale): the goal
    column (DESIGN.md section 8). The informational one divides by 1 / 0.4 (10 / 4 s)."""
    share = {"denoiser": 0.8, "block": 0.6, "module": 0.5}
    seconds = 10 / 1.5
    of = bench["of_ideals"]
    for method in ("easycache", "ertacache"):
        assert of(method, 1.5, 0.4, share) == pytest.approx((5.2 / seconds, 4 / seconds))
    assert of("hyca", 1.5, 0.4, share) == pytest.approx((6.4 / seconds, 4 / seconds))
    assert of("invardiff", 1.5, 0.4, share) == pytest.approx((7 / seconds, 4 / seconds))
    assert of("hyca", 1.0, 1.0, share) == (None, None)  # skips nothing
    assert of("hyca", 1.0, None, share) == (None, None)


def test_the_shares_nest_blocks_inside_the_denoiser(bench: dict[str, Any]) -> None:
    """On a plain dit-tiny run the modules are inside the blocks, the blocks inside the denoiser,
    the denoiser inside the generation: each share is below the next."""
    share = bench["shares"]("dit-tiny", None, ["3", "5"])
    assert 0 < share["module"] < share["block"] < share["denoiser"] < 1


@pytest.mark.parametrize(
    ("where", "timed"), [("whole", ["denoiser"]), ("blocks", ["denoiser", "block"])]
)
def test_the_shares_of_a_compiled_pipeline_leave_its_graphs_whole(
    bench: dict[str, Any], where: str, timed: list[str]
) -> None:
    """The compiled column: a transformer compiled whole times only its calls, one with its
    blocks compiled on their own (``fullgraph=True``) its calls and blocks; the sites inside a
    graph are not timed (a timer there would break it), and what is timed nests as in eager."""
    compile_pipe = bench["compile_pipe"]
    share = bench["shares"]("dit-tiny", lambda p: compile_pipe(p, where, "eager"), ["3"])
    assert sorted(share) == sorted(timed)
    assert 0 < share[timed[-1]] <= share["denoiser"] < 1
