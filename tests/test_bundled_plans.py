"""The profiled plans bundled for the reference models are what ``python -m
diffcache.profiles.make`` writes: same method, fixed options, calibration inputs and seeds, and
a measured compute fraction within the target (a slow test regenerates one and compares)."""

from __future__ import annotations

import hashlib

import pytest

from diffcache.plan import Plan, bundled_plans
from diffcache.profiles.make import PLANS, make


@pytest.mark.parametrize("name", PLANS)
def test_bundled_plan_records_the_inputs_make_uses(name: str) -> None:
    model, method, options, target, inputs, seed = PLANS[name]
    assert name in bundled_plans()
    plan = Plan.load(name)
    assert plan.method == method and plan.provenance["seeds"] == [seed]
    assert all(plan.options[k] == v for k, v in options.items())
    digest = hashlib.sha256("\n".join(inputs()).encode()).hexdigest()
    assert plan.provenance["prompts_sha256"] == digest
    assert plan.provenance["measured"]["compute_fraction"] <= target


@pytest.mark.slow
def test_make_rewrites_a_bundled_plan_byte_for_byte(tmp_path) -> None:
    name = "wan-shapes-ertacache.yaml"
    new = make(name, tmp_path)
    old = bundled_plans()[name]
    assert new.read_text() == old.read_text()
    sidecar = name.replace(".yaml", ".safetensors")
    assert (tmp_path / sidecar).read_bytes() == old.with_name(sidecar).read_bytes()
