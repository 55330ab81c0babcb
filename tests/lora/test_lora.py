"""diffusers LoRA (peft) with every DiT method: loaded before or after ``accelerate``,
re-weighted, fused, unloaded; ``remove`` bit-exact; the adapter state calibrated plans record."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

import diffcache
import diffcache.lora
from diffcache.errors import PlanError
from diffcache.generate import generate
from diffcache.lora import adapter_state, signature
from diffcache.models import load_model
from diffcache.pipelines.digits.lora import set_weight
from diffcache.plan import Plan
from diffcache.testing.lora import inject_lora, write_lora
from diffcache.testing.toys import clean, tiny_request

pytest.importorskip("peft")

METHODS = ("", "-ertacache", "-hyca", "-invardiff")  # the bundled plans of each tiny model
STEPS = 20  # the bundled tiny plans' step count


def _run(pipe, req) -> torch.Tensor:
    return torch.as_tensor(generate(pipe, req))


def _work(pipe) -> dict:
    return diffcache.stats(pipe).as_dict()["work"]


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> tuple:
    """Two flux-tiny pipelines and two LoRA folders (attention and the ``proj_mlp`` sites)."""
    a, b = load_model("flux-tiny"), load_model("flux-tiny")
    root = tmp_path_factory.mktemp("flux-lora")
    folders = [write_lora(a, root / f"l{i}", seed=i) for i in range(2)]
    return a, b, folders, tiny_request("flux-tiny", STEPS)[2]


@pytest.mark.parametrize("suffix", METHODS)
def test_lora_after_accelerate_equals_before(flux, suffix: str) -> None:
    """peft wraps ``proj_mlp`` (a module site) in a LoraLayer when a LoRA loads after
    ``accelerate``: the hook follows it, so the cached run equals loading first, Stats too; and
    unloading after ``accelerate`` equals accelerating the unloaded pipeline."""
    first, second, (folder, _), req = flux
    plan = f"flux-tiny{suffix}.yaml"
    first.load_lora_weights(folder, adapter_name="a")
    diffcache.accelerate(first, plan)
    want, want_work = _run(first, req), _work(first)
    diffcache.accelerate(second, plan)
    second.load_lora_weights(folder, adapter_name="a")
    got = _run(second, req)
    assert torch.equal(got, want) and _work(second) == want_work
    assert sum(w["skipped"] for w in want_work.values()) > 0  # the cache still acts

    first.unload_lora_weights()  # while accelerated: proj_mlp is a Linear again
    plain_after = _run(first, req), _work(first)
    diffcache.remove(first)
    diffcache.remove(second)
    second.unload_lora_weights()
    diffcache.accelerate(second, plan)
    assert torch.equal(_run(second, req), plain_after[0]) and _work(second) == plain_after[1]
    diffcache.remove(second)


FAMILIES = ("flux-tiny", "wan2.1-tiny", "hunyuanvideo-tiny", "qwenimage-tiny", "cogvideox-tiny")


def _lora_ops(pipe, folders, step: int) -> None:
    """The user's LoRA operations, one per ``step``."""
    if step == 0:
        pipe.load_lora_weights(folders[0], adapter_name="a")
    elif step == 1:
        pipe.load_lora_weights(folders[1], adapter_name="b")
        pipe.set_adapters(["a", "b"], [0.5, 1.0])
    elif step == 2:
        pipe.fuse_lora()
    elif step == 3:
        pipe.unfuse_lora()
        pipe.set_adapters(["b"], [0.7])


@pytest.mark.parametrize(
    "model",
    [pytest.param(m, marks=pytest.mark.slow if m != "flux-tiny" else ()) for m in FAMILIES],
)
def test_lora_operations_then_remove_is_bit_exact(model: str, tmp_path: Path) -> None:
    """Each method caches through load / set_adapters / fuse / unfuse / unload done while it is
    attached; after ``remove`` the pipeline equals one that never was accelerated and went
    through the same LoRA operations, bit for bit (the LoRA changes the output, and the cache
    skips work, at every stage)."""
    plain, cached = load_model(model), load_model(model)
    folders = [write_lora(plain, tmp_path / f"l{i}", seed=i) for i in range(2)]
    req = tiny_request(model, STEPS)[2]
    base = _run(plain, req)
    for suffix in METHODS:
        diffcache.accelerate(cached, f"{model}{suffix}.yaml")
        for step in range(4):
            _lora_ops(plain, folders, step)
            _lora_ops(cached, folders, step)
            want = _run(plain, req)
            assert not torch.equal(want, base)
            _run(cached, req)
            assert diffcache.stats(cached).compute_fraction < 1, (suffix, step)
        diffcache.remove(cached)
        assert clean(cached.transformer)
        assert torch.equal(_run(cached, req), want), suffix
        for pipe in (plain, cached):
            pipe.unload_lora_weights()
        assert torch.equal(_run(cached, req), _run(plain, req))  # unfuse: not exactly base


@pytest.fixture
def dit():
    return load_model("dit-tiny"), tiny_request("dit-tiny", STEPS)[2]


def test_dit_lora_by_peft_injection(dit) -> None:
    """DiTPipeline has no LoRA loader: peft's ``inject_adapter_in_model`` on the transformer,
    after ``accelerate``, with every method; ``remove`` then equals the un-accelerated run."""
    pipe, req = dit
    base = _run(pipe, req)
    inject_lora(pipe.transformer, "a", targets=("to_q", "to_v", "net.2"))
    want = _run(pipe, req)
    assert not torch.equal(want, base)
    for suffix in METHODS:
        diffcache.accelerate(pipe, f"dit-tiny{suffix}.yaml")
        _run(pipe, req)
        assert diffcache.stats(pipe).compute_fraction < 1
        diffcache.remove(pipe)
        assert torch.equal(_run(pipe, req), want)


def test_adapter_state_follows_weights_fuse_and_unload(flux) -> None:
    pipe, _, (folder, other), _ = flux
    assert adapter_state([pipe.transformer]) is None
    pipe.load_lora_weights(folder, adapter_name="a")
    one = adapter_state([pipe.transformer])
    assert one["adapters"] == {"a": 1.0} and not one["fused"]
    pipe.set_adapters(["a"], [0.5])
    half = adapter_state([pipe.transformer])
    assert half["adapters"] == {"a": 0.5} and half["sha256"] != one["sha256"]
    pipe.fuse_lora()
    fused = adapter_state([pipe.transformer])
    assert fused["fused"] and fused["sha256"] not in (one["sha256"], half["sha256"])
    pipe.unfuse_lora()
    assert adapter_state([pipe.transformer]) == half
    pipe.unload_lora_weights()
    pipe.load_lora_weights(folder, adapter_name="renamed")  # same tensors, same model
    assert adapter_state([pipe.transformer])["sha256"] == one["sha256"]
    pipe.load_lora_weights(other, adapter_name="b")
    pipe.set_adapters(["renamed", "b"], [1.0, 1.0])
    assert adapter_state([pipe.transformer])["sha256"] != one["sha256"]
    pipe.unload_lora_weights()
    assert adapter_state([pipe.transformer]) is None


def _calibrated(valid_lora: str | None = None, name: str = "dit-tiny-ertacache.yaml") -> Plan:
    plan = Plan.load(name)
    if valid_lora is None:
        return plan
    return dataclasses.replace(plan, valid_for={**plan.valid_for, "lora": valid_lora})


def test_calibrated_plan_warns_once_under_another_lora(dit, caplog, monkeypatch) -> None:
    """A plan profiled without LoRA (bundled, no provenance.lora) run with one: one warning
    per session naming the fix, none without LoRA, and none again for a plan and state that
    this process warned about."""
    pipe, req = dit
    monkeypatch.setattr(diffcache.lora, "_WARNED", set())
    caplog.set_level(logging.WARNING, logger="diffcache.lora")
    diffcache.accelerate(pipe, _calibrated())
    _run(pipe, req)
    assert not caplog.records
    inject_lora(pipe.transformer, "w", targets=("to_q",))
    _run(pipe, req)
    set_weight(pipe.transformer, 0.5, "w")  # another adapter state again: no second warning
    _run(pipe, req)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "no LoRA" in message and "w=1.0" in message and "diffcache profile" in message
    for _ in range(2):  # the state at w=0.5 is news once
        diffcache.remove(pipe)
        diffcache.accelerate(pipe, _calibrated())
        _run(pipe, req)
        assert len(caplog.records) == 2 and "w=0.5" in caplog.records[1].getMessage()
    diffcache.remove(pipe)


def test_valid_for_lora_refused_at_accelerate_and_per_run(dit) -> None:
    pipe, req = dit
    with pytest.raises(PlanError, match=r"valid_for\.lora: .* has no LoRA") as e:
        diffcache.accelerate(pipe, _calibrated("0123456789abcdef"))
    assert "\n" not in str(e.value) and clean(pipe, pipe.transformer, pipe.scheduler)
    inject_lora(pipe.transformer, "v", targets=("to_q",))
    key = adapter_state([pipe.transformer])["sha256"]
    diffcache.accelerate(pipe, _calibrated(key))
    _run(pipe, req)
    set_weight(pipe.transformer, 0.5, "v")  # set_adapters with another weight between calls
    with pytest.raises(PlanError, match=rf"valid for LoRA state {key} .* v=0.5 .*valid_for\.lora"):
        _run(pipe, req)
    assert diffcache.is_accelerated(pipe)
    set_weight(pipe.transformer, 1.0, "v")
    _run(pipe, req)  # the state it was profiled with: runs again


def test_profile_records_the_lora_state(dit) -> None:
    pipe, _ = dit
    inject_lora(pipe.transformer, "p", targets=("to_q",))
    plan = diffcache.profile(pipe, "ertacache", prompts=["1", "2"], target_compute=0.6)
    assert plan.provenance["lora"] == adapter_state([pipe.transformer])
    assert "lora" not in plan.valid_for and plan.provenance["lora"]["adapters"] == {"p": 1.0}


def test_a_lora_merged_by_peft_alone_is_told_apart_by_the_weights_norm(
    dit, caplog, monkeypatch, tmp_path: Path
) -> None:
    """peft's ``merge_and_unload`` leaves no adapter (the state reads "no LoRA"), but the
    weights' norm the plan records (each expert's sum of squares, here by hand) is not the
    merged model's: one warning naming it; none on the weights it was profiled on. The weights
    are read once per session, when it opens (``accelerate``), not in its runs."""
    from peft import get_peft_model

    from diffcache.testing.lora import lora_config

    pipe, req = dit
    plan = diffcache.profile(pipe, "ertacache", prompts=["1", "2"], target_compute=0.6)
    want = sum(float(p.detach().double().square().sum()) for p in pipe.transformer.parameters())
    assert plan.provenance["weights_norm"] == pytest.approx([want], rel=1e-11)  # 12 digits
    plan = Plan.load(plan.save(tmp_path / "p.yaml"))  # the norm as a plan file keeps it
    monkeypatch.setattr(diffcache.lora, "_WARNED", set())
    caplog.set_level(logging.WARNING, logger="diffcache.lora")
    reads = []
    norm = diffcache.lora.weights_norm
    monkeypatch.setattr(diffcache.lora, "weights_norm", lambda m: reads.append(1) or norm(m))

    def two_runs() -> None:
        before = len(reads)
        diffcache.accelerate(pipe, plan)
        try:
            assert len(reads) == before + 1  # read by accelerate, outside the generations
            _run(pipe, req)
            _run(pipe, req)
        finally:
            diffcache.remove(pipe)

    two_runs()
    assert not caplog.records and len(reads) == 1
    torch.manual_seed(0)
    config = lora_config(targets=("to_q", "to_v"))
    pipe.transformer = get_peft_model(pipe.transformer, config).merge_and_unload()
    assert adapter_state([pipe.transformer]) is None  # what the LoRA state alone sees
    two_runs()
    assert len(reads) == 2 and len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "no LoRA on other weights" in message and "merge_and_unload" in message


def test_weights_offloaded_to_meta_have_no_norm() -> None:
    """Weights not in memory (sequential offloading keeps them on the meta device) are not
    read: no norm recorded or compared, where reading them would fail."""
    here, there = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2, device="meta")
    want = float(here.weight.double().square().sum() + here.bias.double().square().sum())
    assert diffcache.lora.weights_norm([here]) == pytest.approx([want], rel=1e-11)
    assert diffcache.lora.weights_norm([here, there]) is None


def test_cli_refuses_a_plan_for_another_lora_state(tmp_path: Path, capsys) -> None:
    from diffcache.cli import main

    path = _calibrated("0123456789abcdef").save(tmp_path / "lora-plan.yaml")
    out = tmp_path / "x.png"
    argv = ["generate", "--model", "dit-tiny", "--plan", str(path), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("diffcache: error: ") and "valid_for.lora" in err[-1]
    assert "0123456789abcdef" in err[-1] and "no LoRA" in err[-1] and not out.exists()


def test_a_lora_fused_then_unloaded_stays_in_the_state(tmp_path: Path) -> None:
    """``fuse_lora`` then ``unload_lora_weights`` leaves the LoRA in the weights: the state
    says so (fused, the adapter ``unloaded``), the same for the same LoRA and weight loaded the
    same way, another for another weight or LoRA; a plan valid for no LoRA is refused, one for
    this state runs. Unfused before unloading, the weights are the base model's: no LoRA."""
    plain = load_model("flux-tiny")
    folders = [write_lora(plain, tmp_path / f"l{i}", seed=i) for i in range(2)]

    def fuse_unload(folder: Path, weight: float = 1.0, unfuse: bool = False):
        pipe = load_model("flux-tiny")
        pipe.load_lora_weights(folder, adapter_name="x")
        pipe.set_adapters(["x"], [weight])
        pipe.fuse_lora()
        if unfuse:
            pipe.unfuse_lora()
        pipe.unload_lora_weights()
        return pipe, adapter_state([pipe.transformer], pipe)

    pipe, state = fuse_unload(folders[0])
    assert state["adapters"] == {"x": "unloaded"} and state["fused"]
    assert fuse_unload(folders[0])[1] == state
    others = {fuse_unload(folders[0], 0.5)[1]["sha256"], fuse_unload(folders[1])[1]["sha256"]}
    assert state["sha256"] not in others and len(others) == 2
    assert fuse_unload(folders[0], unfuse=True)[1] is None
    flux_plan = "flux-tiny-ertacache.yaml"
    with pytest.raises(PlanError, match=r"has LoRA x=unloaded \(fused\)"):
        diffcache.accelerate(pipe, _calibrated("none", flux_plan))
    diffcache.accelerate(pipe, _calibrated(state["sha256"], flux_plan))
    _run(pipe, tiny_request("flux-tiny", STEPS)[2])
    diffcache.remove(pipe)


def test_a_second_lora_fused_under_the_same_name_changes_the_signature(tmp_path: Path) -> None:
    """Two LoRAs fused and unloaded one after the other under one adapter name leave the same
    names in ``pipe.fused_loras`` but other weights: the state's hash differs, so the cheap
    :func:`~diffcache.lora.signature` a run compares before rehashing must differ too (it named
    only the adapters, and a run kept the first LoRA's state)."""
    pipe = load_model("flux-tiny")
    folders = [write_lora(pipe, tmp_path / f"l{i}", seed=i) for i in range(2)]
    seen = []
    for folder in folders:
        pipe.load_lora_weights(folder, adapter_name="x")
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        seen.append((signature([pipe.transformer], pipe), adapter_state([pipe.transformer], pipe)))
    (sig0, state0), (sig1, state1) = seen
    assert state0["adapters"] == state1["adapters"] == {"x": "unloaded"}
    assert state0["sha256"] != state1["sha256"]
    assert sig0 != sig1
