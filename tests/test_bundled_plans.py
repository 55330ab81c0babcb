"""The profiled plans bundled for the reference models are what ``python -m
diffcache.profiles.make`` writes: same method, fixed options, calibration inputs and seeds, and
a measured compute fraction within the target (a slow test regenerates one and compares)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from diffcache.errors import PlanError
from diffcache.plan import Plan
from diffcache.profiles import bundled_plans
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


def _without_sidecar_hash(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.strip().startswith("sha256:")]


@pytest.mark.parametrize(
    "name", ["dit-tiny-ertacache.yaml", "dit-tiny-hyca.yaml", "dit-tiny-invardiff.yaml"]
)
def test_make_rewrites_a_tiny_bundled_plan(name: str, tmp_path) -> None:
    """The fast twin of the slow test above, on dit-tiny: the same plan text (options, measured
    values, provenance), the same integer and boolean tensors (clusters, books) exactly, and
    float tensors within 1e-3 relative (their last bits follow the machine's float sums; the
    slow test compares bytes)."""
    from safetensors.torch import load_file

    new = make(name, tmp_path)
    old = bundled_plans()[name]
    assert _without_sidecar_hash(new.read_text()) == _without_sidecar_hash(old.read_text())
    sidecar = name.replace(".yaml", ".safetensors")
    got, want = load_file(tmp_path / sidecar), load_file(old.with_name(sidecar))
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        if value.is_floating_point():
            torch.testing.assert_close(got[key], value, rtol=1e-3, atol=1e-5, msg=key)
        else:
            assert torch.equal(got[key], value), key


TEMPLATES = [n for n in bundled_plans() if Plan.load(n, template=True).is_template]


def test_templates_carry_published_settings_and_refuse_to_run_uncalibrated() -> None:
    assert {"wan21-ertacache.yaml", "flux-hyca.yaml"} <= set(TEMPLATES)
    for name in TEMPLATES:
        plan = Plan.load(name, template=True)
        assert {"source", "published"} <= set(plan.provenance), name
        with pytest.raises(PlanError, match=f"--from {name}"):
            Plan.load(name)


def test_profile_from_a_template(tmp_path, capsys) -> None:
    from diffcache.cli import main

    out = tmp_path / "flux.yaml"
    args = ["profile", "--model", "flux-tiny", "--from", "flux-hyca.yaml", "--num-prompts", "1"]
    assert main([*args, "--out", str(out)]) == 0
    plan = Plan.load(out)
    template = Plan.load("flux-hyca.yaml", template=True)
    assert plan.method == "hyca" and not plan.is_template
    assert all(plan.options[k] == v for k, v in template.options.items())
    assert plan.valid_for["num_inference_steps"] == template.valid_for["num_inference_steps"]
    assert main(["profile", "--model", "dit-tiny", "--from", "flux-hyca.yaml", "--num-prompts",
                 "1", "--out", str(out)]) == 2  # fmt: skip
    assert "a plan for flux models" in capsys.readouterr().err
    assert main(["profile", "--model", "flux-tiny", "--num-prompts", "1", "--out", str(out)]) == 2
    assert "give --method" in capsys.readouterr().err
