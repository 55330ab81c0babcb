"""``valid_for.weights: profiled``: a calibrated plan that requires the very weights it was
profiled on (their storage and squared norm, ``provenance.weights`` / ``weights_norm``) refuses
other weights at ``accelerate`` in one line with the fix, leaving the pipeline as it was, and at
each later run whose weights changed in place since (``diffcache.weights.WeightsWatch``), leaving
it accelerated; without the key such a run only warns (``diffcache.lora.LoraWatch``)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import diffcache
import diffcache.lora
import diffcache.weights
from diffcache.errors import PlanError
from diffcache.generate import generate
from diffcache.models import load_model
from diffcache.plan import Plan
from diffcache.runstate import RunState
from diffcache.testing.lora import lora_config, write_lora
from diffcache.testing.toys import clean, tiny_request
from diffcache.weights import WeightsWatch, check_weights

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


def test_a_run_reads_what_it_can() -> None:
    """At a run, weights offloaded to the meta device after ``accelerate`` read them cannot be
    read again: they pass; other storage is refused there as at ``accelerate``."""
    plan = Plan.load("dit-tiny-ertacache.yaml")
    plan = dataclasses.replace(plan, valid_for={**plan.valid_for, "weights": "profiled"})
    run = RunState("ertacache", owner="DiTPipeline")
    meta = [torch.nn.Linear(2, 2, device="meta")]
    assert WeightsWatch(meta, plan, run).facts() == {}
    with pytest.raises(PlanError, match=r"not in memory \(on the meta device"):
        check_weights(plan, meta)
    half = [torch.nn.Linear(2, 2).to(torch.float16)]
    with pytest.raises(PlanError, match="calibrated on float32 weights but this model's are "):
        WeightsWatch(half, plan, run).facts()


def _one_line_refusal(pipe: Any, req: Any) -> str:
    """A run refused at its start: one line, no denoising step ran, still accelerated."""
    with pytest.raises(PlanError) as e:
        generate(pipe, req)
    message = str(e.value)
    assert "\n" not in message and diffcache.is_accelerated(pipe)
    owner = type(pipe).__name__
    assert message.endswith(
        f"; no denoising step of this call ran and {owner} is still accelerated (the next "
        "call starts a new run)."
    ), message
    return message


def test_a_lora_fused_between_calls_is_refused_and_unfused_runs_again(tmp_path: Path) -> None:
    """Profiled on flux-tiny with a LoRA loaded (not fused): the plan runs; ``fuse_lora`` between
    two calls refuses the next one, naming both norms (the fused one computed here by hand) and
    the fix, with the pipeline still accelerated; after ``unfuse_lora`` it runs again with the
    same per-step decisions and the output of before, up to the rounding of peft's unmerge
    (W + BA - BA in float32), and bit for bit that of a session opened on these weights anew."""
    pipe, req = load_model("flux-tiny"), tiny_request("flux-tiny", STEPS)[2]
    pipe.load_lora_weights(write_lora(pipe, tmp_path / "lora"), adapter_name="a")
    plan = diffcache.profile(pipe, "ertacache", ["a cat", "a red fox"], request=req)
    plan = dataclasses.replace(plan, valid_for={**plan.valid_for, "weights": "profiled"})
    plan = Plan.load(plan.save(tmp_path / "p.yaml"))
    recorded = plan.provenance["weights_norm"]
    assert recorded == pytest.approx([_norm(pipe.transformer)], rel=1e-11)
    diffcache.accelerate(pipe, plan)
    try:
        before, calls = generate(pipe, req), diffcache.stats(pipe).calls
        assert diffcache.stats(pipe).compute_fraction < 1

        pipe.fuse_lora()
        fused = _norm(pipe.transformer)
        assert fused != pytest.approx(recorded[0], rel=1e-6)
        message = _one_line_refusal(pipe, req)
        assert message.startswith(f"{plan.source}: valid_for.weights: profiled: the plan was ")
        assert f"profiled on weights of squared norm {recorded} but this model's is [" in message
        shown = float(message.split("model's is [")[1].split("]")[0])
        assert shown == pytest.approx(fused, rel=1e-11)
        assert "diffcache profile --model MODEL --method ertacache" in message
        assert "pipe.unfuse_lora() undoes fuse_lora()" in message

        pipe.unfuse_lora()
        after = generate(pipe, req)
        assert diffcache.stats(pipe).calls == calls
        assert np.allclose(after, before, rtol=0, atol=1e-5)
    finally:
        diffcache.remove(pipe)
    diffcache.accelerate(pipe, plan)
    try:
        assert np.array_equal(generate(pipe, req), after)
    finally:
        diffcache.remove(pipe)


def test_a_lora_merged_by_peft_between_calls_is_refused_until_the_weights_are_back(
    tmp_path: Path,
) -> None:
    """peft's ``merge_and_unload`` between two calls leaves no adapter (the LoRA state is the
    same "no LoRA") and bumps no version counter (it writes through ``.data``): only the
    weights' norm, read at that run, tells; the weights loaded back, the next run's output is
    the first one's bit for bit."""
    pipe, req = load_model("dit-tiny"), tiny_request("dit-tiny", STEPS)[2]
    plan = _profiled("dit-tiny-ertacache.yaml", tmp_path)
    saved = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    transformer = pipe.transformer
    diffcache.accelerate(pipe, plan)
    try:
        before, calls = generate(pipe, req), diffcache.stats(pipe).calls
        versions = [p._version for p in transformer.parameters()]
        _merge_lora(pipe)
        assert (
            pipe.transformer is transformer and diffcache.lora.adapter_state([transformer]) is None
        )
        assert [p._version for p in transformer.parameters()] == versions
        message = _one_line_refusal(pipe, req)
        assert f"squared norm {plan.provenance['weights_norm']} but this model's is [" in message
        transformer.load_state_dict(saved)
        assert np.array_equal(generate(pipe, req), before)
        assert diffcache.stats(pipe).calls == calls
    finally:
        diffcache.remove(pipe)
    assert clean(pipe, pipe.transformer, pipe.scheduler)


def test_the_norm_is_read_once_per_run_only_when_the_plan_requires_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``valid_for.weights: profiled`` the weights' norm is read at ``accelerate`` and once
    per run (three runs: four reads, and no warning's read besides); without the key, once per
    session (the warning's, at the first run)."""
    pipe, req = load_model("dit-tiny"), tiny_request("dit-tiny", STEPS)[2]
    reads: list[int] = []
    norm = diffcache.lora.weights_norm

    def counted(modules: Any) -> Any:
        reads.append(1)
        return norm(modules)

    monkeypatch.setattr(diffcache.lora, "weights_norm", counted)
    monkeypatch.setattr(diffcache.weights, "weights_norm", counted)
    for plan, want in (
        (_profiled("dit-tiny-ertacache.yaml", tmp_path), 4),
        (Plan.load("dit-tiny-ertacache.yaml"), 1),
    ):
        reads.clear()
        diffcache.accelerate(pipe, plan)
        try:
            for _ in range(3):
                generate(pipe, req)
        finally:
            diffcache.remove(pipe)
        assert len(reads) == want, (plan.valid_for, len(reads))


def test_a_storage_named_in_valid_for_is_the_one_required(tmp_path: Path) -> None:
    """``valid_for.weights: bfloat16`` requires bfloat16 weights, whatever storage the plan was
    profiled on (``provenance.weights``: float32 here); float32 weights are refused."""
    plan = _profiled("dit-tiny-ertacache.yaml", tmp_path)
    bf16 = dataclasses.replace(plan, valid_for={**plan.valid_for, "weights": "bfloat16"})
    assert bf16.provenance["weights"] == "float32"
    with pytest.raises(PlanError, match="calibrated on bfloat16 weights but this model's are "):
        check_weights(bf16, [torch.nn.Linear(2, 2)])
    check_weights(bf16, [torch.nn.Linear(2, 2).to(torch.bfloat16)])
