"""``diffcache.lora.LoraWatch``'s rules on dit-tiny with a peft LoRA: which plans warn about
the LoRA state or the weights they run on (calibrated ones, against what they were profiled
with, unless they require it), and the warning's words (the plan, both states, the fix)."""

from __future__ import annotations

import dataclasses
import logging
import re

import pytest
import torch

import diffcache
import diffcache.lora
from diffcache.generate import generate
from diffcache.models import load_model
from diffcache.pipelines.digits.lora import set_weight
from diffcache.plan import Plan
from diffcache.testing.lora import inject_lora
from diffcache.testing.toys import tiny_request

pytest.importorskip("peft")

HASH = "[0-9a-f]{16}"


@pytest.fixture
def dit(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """dit-tiny, its request, and the LoRA warnings of this test only."""
    monkeypatch.setattr(diffcache.lora, "_WARNED", set())
    caplog.set_level(logging.WARNING, logger="diffcache.lora")
    return load_model("dit-tiny"), tiny_request("dit-tiny", 20)[2]


def _run(pipe, req, plan) -> None:
    diffcache.accelerate(pipe, plan)
    try:
        generate(pipe, req)
    finally:
        diffcache.remove(pipe)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "diffcache.lora"]


def test_an_uncalibrated_plan_warns_about_neither_lora_nor_weights(dit, caplog) -> None:
    """EasyCache measures the model as it runs: a profiled EasyCache plan records the LoRA state
    and weights' norm it was profiled on, but other weights (changed in place) or a LoRA do
    not make it warn."""
    pipe, req = dit
    plan = diffcache.profile(pipe, "easycache", prompts=["1"], request=req)
    assert "weights_norm" in plan.provenance and not (plan.calibration or plan.tensors)
    with torch.no_grad():
        next(pipe.transformer.parameters()).mul_(1.5)  # other weights, no LoRA
    _run(pipe, req, plan)
    inject_lora(pipe.transformer, "u", targets=("to_q",))
    _run(pipe, req, plan)
    assert _warnings(caplog) == []


def test_a_plan_profiled_under_a_lora_warns_under_another_state_only(dit, caplog) -> None:
    """Profiled with LoRA ``p`` at weight 1: no warning under that state, one under ``p`` at
    0.5 that names the plan, both states, the fix and the profile call."""
    pipe, req = dit
    inject_lora(pipe.transformer, "p", targets=("to_q",))
    plan = diffcache.profile(pipe, "ertacache", prompts=["1", "2"], target_compute=0.6)
    profiled = plan.provenance["lora"]["sha256"]
    _run(pipe, req, plan)
    assert _warnings(caplog) == []
    set_weight(pipe.transformer, 0.5, "p")
    _run(pipe, req, plan)
    [message] = _warnings(caplog)
    want = (
        f"diffcache: {re.escape(plan.name)} was calibrated with LoRA p=1.0 \\[{profiled}\\] but "
        f"this run has LoRA p=0.5 \\[{HASH}\\]; its calibration may not fit: run `diffcache "
        "profile` on the pipeline with this LoRA \\(diffcache.profile\\(pipe, 'ertacache', "
        "prompts\\)\\) for a plan that does."
    )
    assert plan.name and re.fullmatch(want, message), message


def test_a_plan_that_requires_its_lora_state_does_not_warn_about_it(dit, caplog) -> None:
    """A calibrated plan with ``valid_for.lora`` (here the bundled plan, which records no
    LoRA, made to require the pipeline's): run under that state, it is neither refused nor
    warns that it was profiled without LoRA."""
    pipe, req = dit
    inject_lora(pipe.transformer, "v", targets=("to_q",))
    key = diffcache.lora.adapter_state([pipe.transformer])["sha256"]
    plan = Plan.load("dit-tiny-ertacache.yaml")
    assert "lora" not in plan.provenance
    _run(pipe, req, dataclasses.replace(plan, valid_for={**plan.valid_for, "lora": key}))
    assert _warnings(caplog) == []


def test_describe_words_a_state() -> None:
    """No state: ``no LoRA``; else each adapter at its weight, ``(fused)`` when fused, and
    the hash."""
    describe = diffcache.lora.describe
    assert describe(None) == "no LoRA"
    state = {"adapters": {"a": 1.0, "b": 0.5}, "fused": True, "sha256": "0123456789abcdef"}
    assert describe(state) == "LoRA a=1.0, b=0.5 (fused) [0123456789abcdef]"
    assert describe({**state, "fused": False}) == "LoRA a=1.0, b=0.5 [0123456789abcdef]"


def test_a_plan_on_other_weights_under_its_lora_warns_once_per_weights(dit, caplog) -> None:
    """Profiled under LoRA ``p``, run under ``p`` on base weights changed in place: the LoRA
    state is the one profiled, the weights' norm is not: one warning naming both (the fix:
    profile as you run it); changed again, a new session warns again (other weights)."""
    pipe, req = dit
    inject_lora(pipe.transformer, "p", targets=("to_q",))
    plan = diffcache.profile(pipe, "ertacache", prompts=["1", "2"], target_compute=0.6)
    profiled = plan.provenance["lora"]["sha256"]
    weight = next(pipe.transformer.parameters())
    for factor in (1.5, 2.0):
        with torch.no_grad():
            weight.mul_(factor)
        _run(pipe, req, plan)
    first, second = _warnings(caplog)
    want = (
        f"diffcache: {re.escape(plan.name)} was calibrated with its weights "
        f"\\(provenance.weights_norm\\) but this run has LoRA p=1.0 \\[{profiled}\\] on other "
        "weights \\(their norm differs: a LoRA merged into them, e.g. by peft's "
        "merge_and_unload, or another checkpoint\\); its calibration may not fit: run "
        "`diffcache profile` on the pipeline as you run it \\(diffcache.profile\\(pipe, "
        "'ertacache', prompts\\)\\) for a plan that does."
    )
    assert re.fullmatch(want, first) and second == first, first


def test_lora_tensors_written_in_place_are_another_state(dit) -> None:
    """A plan requiring the pipeline's LoRA state runs; the adapter's tensors then written in
    place between runs (same adapter, same weight, no new tensor) are another state, and the
    next run is refused."""
    from diffcache.errors import PlanError

    pipe, req = dit
    inject_lora(pipe.transformer, "v", targets=("to_q",))
    key = diffcache.lora.adapter_state([pipe.transformer])["sha256"]
    plan = Plan.load("dit-tiny-ertacache.yaml")
    diffcache.accelerate(pipe, dataclasses.replace(plan, valid_for={**plan.valid_for, "lora": key}))
    try:
        generate(pipe, req)
        layer = next(m for m in pipe.transformer.modules() if hasattr(m, "lora_B"))
        with torch.no_grad():
            layer.lora_B["v"].weight.add_(1.0)
        with pytest.raises(PlanError, match=f"valid for LoRA state {key} but this call has LoRA"):
            generate(pipe, req)
    finally:
        diffcache.remove(pipe)


def test_a_second_lora_fused_and_unloaded_while_accelerated_is_seen(tmp_path) -> None:
    """flux-tiny with LoRA ``l0`` fused and unloaded, under a plan requiring that state: a
    second LoRA then fused and unloaded under the same name while accelerated leaves no LoRA
    layer either way, only the pipeline's ``fused_loras`` and the weights tell: the next run
    is refused."""
    from diffcache.errors import PlanError
    from diffcache.testing.lora import write_lora

    pipe = load_model("flux-tiny")
    folders = [write_lora(pipe, tmp_path / f"l{i}", seed=i) for i in range(2)]

    def fuse_unload(folder) -> None:
        pipe.load_lora_weights(folder, adapter_name="x")
        pipe.fuse_lora()
        pipe.unload_lora_weights()

    fuse_unload(folders[0])
    key = diffcache.lora.adapter_state([pipe.transformer], pipe)["sha256"]
    plan = Plan.load("flux-tiny-ertacache.yaml")
    req = tiny_request("flux-tiny", 20)[2]
    diffcache.accelerate(pipe, dataclasses.replace(plan, valid_for={**plan.valid_for, "lora": key}))
    try:
        generate(pipe, req)
        fuse_unload(folders[1])
        with pytest.raises(PlanError, match=f"valid for LoRA state {key} but this call has LoRA"):
            generate(pipe, req)
    finally:
        diffcache.remove(pipe)
