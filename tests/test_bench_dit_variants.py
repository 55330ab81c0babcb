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


def test_the_blocks_ideal_keeps_the_time_outside_the_counted_sites_fixed(
    bench: dict[str, Any],
) -> None:
    """A plain run of 10 s: 8 s in the denoiser, 6 s in its blocks, 5 s in their modules. A plan
    computing 40% of the sites in 1 / 1.5 of the time is at best 10 / 4 s (all scales),
    2 + 0.4 x 8 = 5.2 s (the denoiser scales), 4 + 0.4 x 6 = 6.4 s (HyCa's blocks scale) or
    5 + 0.4 x 5 = 7 s (InvarDiff's modules scale)."""
    share = {"denoiser": 0.8, "block": 0.6, "module": 0.5}
    seconds = 10 / 1.5
    of = bench["of_ideals"]
    assert of("hyca", 1.5, 0.4, share) == pytest.approx((4 / seconds, 5.2 / seconds, 6.4 / seconds))
    assert of("invardiff", 1.5, 0.4, share)[2] == pytest.approx(7 / seconds)
    assert of("easycache", 1.5, 0.4, share)[2] is None  # a step method: no such column
    assert of("hyca", 1.0, 1.0, share) == (None, None, None)  # skips nothing
    assert of("hyca", 1.0, None, share) == (None, None, None)


def test_the_shares_nest_blocks_inside_the_denoiser(bench: dict[str, Any]) -> None:
    """On a plain dit-tiny run the modules are inside the blocks, the blocks inside the denoiser,
    the denoiser inside the generation: each share is below the next."""
    share = bench["shares"]("dit-tiny", None, ["3", "5"])
    assert 0 < share["module"] < share["block"] < share["denoiser"] < 1
