"""``valid_for.weights: profiled``: a calibrated plan that requires the very weights it was
profiled on (their storage and squared norm, ``provenance.weights`` / ``weights_norm``) refuses
other weights at ``accelerate`` in one line with the fix, leaving the pipeline as it was; without
the key such a run only warns (``diffcache.lora.LoraWatch``)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

import diffcache
import diffcache.lora
from diffcache.errors import PlanError
from diffcache.generate import generate
from diffcache.models import load_model
from diffcache.plan import Plan
from diffcache.testing.lora import lora_config, write_lora
from diffcache.testing.toys import clean, tiny_request
from diffcache.weights import check_weights

pytest.importorskip("peft")

STEPS = 20  # the bundled tiny plans' step count


def _norm(module: torch.nn.Module) -> float:
    """The squared norm of every parameter, by hand (float64)."""
    return sum(float(p.detach().double().square().sum()) for p in module.parameters())


def _profiled(name: str, tmp_path: Path) -> Plan:
    """The bundled calibrated plan ``name`` requiring its weights, through a plan file."""
    plan = Plan.load(name)
    plan = dataclasses.replace(plan, valid_for={**plan.valid_for, "weights": "profiled"})
    return Plan.load(plan.save(tmp_path / name))


def _merge_lora(pipe: Any) -> None:
    """A LoRA merged into the transformer by peft alone: no adapter left to see."""
    from peft import get_peft_model

    torch.manual_seed(0)
    config = lora_config(targets=("to_q", "to_v"))
    pipe.transformer = get_peft_model(pipe.transformer, config).merge_and_unload()


def _refused(pipe: Any, plan: Plan, req: Any) -> str:
    """``accelerate`` refuses ``plan`` in one line; the pipeline runs as before the attempt."""
    want = generate(pipe, req)
    with pytest.raises(PlanError) as e:
        diffcache.accelerate(pipe, plan)
    message = str(e.value)
    assert "\n" not in message and not diffcache.is_accelerated(pipe)
    assert clean(pipe, pipe.transformer, pipe.scheduler)
    assert (generate(pipe, req) == want).all()
    return message


def test_merged_lora_is_refused_with_the_key_and_warned_about_without(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the weights it was profiled on the plan runs (and caches); on weights a LoRA was
    merged into, the key refuses it naming both norms (computed here by hand) and the profile
    command; the same plan without the key runs and warns once, as before."""
    pipe, req = load_model("dit-tiny"), tiny_request("dit-tiny", STEPS)[2]
    plan = _profiled("dit-tiny-ertacache.yaml", tmp_path)
    recorded = plan.provenance["weights_norm"]
    assert recorded == pytest.approx([_norm(pipe.transformer)], rel=1e-11)
    diffcache.accelerate(pipe, plan)
    try:
        generate(pipe, req)
        assert diffcache.stats(pipe).compute_fraction < 1
    finally:
        diffcache.remove(pipe)

    _merge_lora(pipe)
    have = _norm(pipe.transformer)
    assert have != pytest.approx(recorded[0], rel=1e-6)
    message = _refused(pipe, plan, req)
    assert message.startswith(f"{plan.source}: valid_for.weights: profiled: ")
    assert f"profiled on weights of squared norm {recorded} but this model's is [" in message
    assert float(message.split("model's is [")[1].split("]")[0]) == pytest.approx(have, rel=1e-11)
    assert "diffcache profile --model MODEL --method ertacache" in message

    monkeypatch.setattr(diffcache.lora, "_WARNED", set())
    caplog.set_level(logging.WARNING, logger="diffcache.lora")
    diffcache.accelerate(pipe, Plan.load("dit-tiny-ertacache.yaml"))
    try:
        generate(pipe, req)
    finally:
        diffcache.remove(pipe)
    assert len(caplog.records) == 1 and "on other weights" in caplog.records[0].getMessage()


def test_fused_and_unloaded_lora_is_refused(tmp_path: Path) -> None:
    """diffusers' ``fuse_lora`` then ``unload_lora_weights`` writes the LoRA into the weights:
    a plan requiring the weights it was profiled on (without LoRA) refuses them."""
    pipe, req = load_model("flux-tiny"), tiny_request("flux-tiny", STEPS)[2]
    plan = _profiled("flux-tiny-ertacache.yaml", tmp_path)
    pipe.load_lora_weights(write_lora(pipe, tmp_path / "lora"), adapter_name="a")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    message = _refused(pipe, plan, req)
    assert f"squared norm {plan.provenance['weights_norm']} but this model's is [" in message


def test_other_storage_and_unreadable_weights_are_refused(tmp_path: Path) -> None:
    """``profiled`` also requires the storage the plan records (``provenance.weights``); a plan
    without a recorded norm, or weights on the meta device, cannot be checked: refused too."""
    plan = _profiled("dit-tiny-ertacache.yaml", tmp_path)
    assert plan.provenance["weights"] == "float32"
    half = [torch.nn.Linear(2, 2).to(torch.float16)]
    with pytest.raises(PlanError, match="calibrated on float32 weights but this model's are "):
        check_weights(plan, half)
    with pytest.raises(PlanError) as err:
        check_weights(plan, [torch.nn.Linear(2, 2, device="meta")])
    assert str(err.value) == (
        f"{plan.source}: valid_for.weights: profiled: this model's weights are not in memory "
        "(on the meta device: sequential offloading), so they cannot be compared; accelerate "
        "before offloading, or drop the key."
    )
    bare = dataclasses.replace(plan, provenance={"weights": "float32"})
    with pytest.raises(PlanError, match=r"records no weights' norm \(provenance.weights_norm\)"):
        check_weights(bare, [torch.nn.Linear(2, 2)])


def test_a_storage_named_in_valid_for_is_the_one_required(tmp_path: Path) -> None:
    """``valid_for.weights: bfloat16`` requires bfloat16 weights, whatever storage the plan was
    profiled on (``provenance.weights``: float32 here); float32 weights are refused."""
    plan = _profiled("dit-tiny-ertacache.yaml", tmp_path)
    bf16 = dataclasses.replace(plan, valid_for={**plan.valid_for, "weights": "bfloat16"})
    assert bf16.provenance["weights"] == "float32"
    with pytest.raises(PlanError, match="calibrated on bfloat16 weights but this model's are "):
        check_weights(bf16, [torch.nn.Linear(2, 2)])
    check_weights(bf16, [torch.nn.Linear(2, 2).to(torch.bfloat16)])
