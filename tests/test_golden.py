"""Every bundled plan of a small built-in model still gives the output and Stats recorded in
tests/golden/bundled_plans.json (regenerate: ``python -m diffcache.testing.golden --write``, and
explain the change in the commit message). Runs are on one CPU thread. Stats are compared
exactly (without wall time); outputs by the sha256 of their bytes, except where the golden file
marks a plan not ``bit_stable`` (its bytes change with the thread count, so they depend on the
machine): there by dtype, shape and mean / abs-max within their 6-digit rounding, as for every
plan on another platform (torch version or CPU vector unit) than the file was written on."""

from __future__ import annotations

from typing import Any

import pytest

from diffcache.plan import bundled_plans
from diffcache.testing import golden

GOLDEN, SAME_PLATFORM = golden.load()


@pytest.fixture(scope="module")
def pipes() -> dict[str, Any]:
    """The built models, shared by the plans of one model."""
    return {}


def test_golden_file_covers_the_bundled_plans_of_the_small_models() -> None:
    plans = golden.golden_plans()
    assert sorted(GOLDEN) == sorted(plans)
    assert set(plans) < set(bundled_plans())
    assert {"wan2.1-tiny.yaml", "dit-digits-hyca.yaml", "llada-tiny-d2cache.yaml"} <= set(plans)
    # templates and the plans of real-size models are not run here
    assert not {"wan21.yaml", "flux-hyca.yaml", "llada.yaml", "dit-invardiff.yaml"} & set(plans)


@pytest.mark.parametrize("plan", list(golden.golden_plans()))
def test_bundled_plan_gives_its_golden_output_and_stats(plan: str, pipes: dict[str, Any]) -> None:
    assert golden.differences(golden.entry(plan, pipes), GOLDEN[plan], SAME_PLATFORM) == []


def test_another_platform_compares_summaries_not_bytes() -> None:
    """On another torch or CPU the bytes may differ: the summary numbers and Stats still must
    not."""
    want = next(e for e in GOLDEN.values() if e["bit_stable"])
    other_bytes = {**want, "output": {**want["output"], "sha256": "0" * 64}}
    assert golden.differences(other_bytes, want, exact=False) == []
    assert golden.differences(other_bytes, want, exact=True) == [
        f"output sha256: {'0' * 64} != {want['output']['sha256']}"
    ]
    moved = {
        **other_bytes,
        "output": {**other_bytes["output"], "mean": 1.001 * want["output"]["mean"]},
    }
    assert len(golden.differences(moved, want, exact=False)) == 1
    stats = {**other_bytes, "stats": {**want["stats"], "computed": -1}}
    assert len(golden.differences(stats, want, exact=False)) == 1
