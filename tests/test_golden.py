"""Every bundled plan of a small built-in model still gives the output and Stats recorded in
tests/golden/bundled_plans.json (regenerate: ``python -m diffcache.testing.golden --write``, and
explain the change in the commit message). Runs are on one CPU thread. Stats are compared
exactly (without wall time); outputs by the sha256 of their bytes, except where the golden file
marks a plan not ``bit_stable`` (its bytes change with the thread count, so they depend on the
machine): there by dtype, shape and mean / abs-max within their 6-digit rounding, as for every
plan on another platform (torch version or CPU vector unit) than the file was written on.
Each plan's trace (tests/golden/traces/<plan>.json) must match line for line there, and on
another platform in everything but its floats; a mismatch names the first differing event."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from diffcache.profiles import bundled_plans
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


def test_a_trace_mismatch_names_the_first_differing_event() -> None:
    """A float moved in the last golden digit counts on the golden platform only; an action
    changed counts everywhere; a shorter trace is named too."""
    want = GOLDEN["dit-tiny.yaml"]["trace"]
    i = next(i for i, e in enumerate(want) if isinstance(e["values"].get("acc"), float))
    j = next(j for j, e in enumerate(want) if j > i and e["action"] == "reused")
    got = copy.deepcopy(want)
    got[i]["values"]["acc"] *= 1 + 1e-5
    got[j]["action"] = "computed"
    exact = golden.trace_differences(got, want, exact=True)
    assert len(exact) == 1 and exact[0].startswith(f"trace event {i}: ")
    assert golden.trace_lines([got[i]])[0] in exact[0]
    elsewhere = golden.trace_differences(got, want, exact=False)
    assert len(elsewhere) == 1 and elsewhere[0].startswith(f"trace event {j}: ")
    assert golden.trace_differences(want[:-1], want) == [
        f"trace: {len(want) - 1} events != golden {len(want)}"
    ]
    assert golden.trace_differences(copy.deepcopy(want), want) == []


def test_golden_trace_files_are_what_the_writer_writes() -> None:
    """Byte for byte: one event a line, keys sorted, floats rounded to 6 digits."""
    for plan, entry in GOLDEN.items():
        text = golden.trace_file(plan).read_text()
        assert text == golden.dumps_trace(entry["trace"]), plan
        assert golden.rounded(entry["trace"], golden.DIGITS) == entry["trace"], plan
