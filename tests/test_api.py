"""Bad input through the public API: a clear DiffCacheError subclass, and the model untouched."""

from __future__ import annotations

import pytest
import torch

import diffcache
from diffcache.errors import DiffCacheError, PlanError, RunError, UnsupportedModelError
from diffcache.testing.toys import ToyPipeline, ToyScheduler, clean

PLAN = {
    "diffcache": 1,
    "model": "toy",
    "method": "easycache",
    "options": {"threshold": 1e6, "warmup_steps": 2},
}


def _untouched(pipe: ToyPipeline) -> bool:
    return clean(pipe.transformer, pipe.scheduler, *pipe.transformer.modules()) and (
        not diffcache.is_accelerated(pipe)
    )


@pytest.mark.parametrize(
    "plan, error, match",
    [
        ({**PLAN, "options": {"treshold": 1}}, PlanError, "did you mean 'threshold'"),
        ({**PLAN, "options": {"threshold": -1}}, PlanError, "must be >= 0"),
        ({**PLAN, "options": {"threshold": "x"}}, PlanError, "expected float"),
        ({**PLAN, "model": "flux"}, PlanError, "plan is for 'flux'.*'toy' model"),
        ({**PLAN, "method": "fastcache"}, PlanError, "unknown method 'fastcache'"),
        ("no/such/plan.yaml", PlanError, "no such plan file"),
        (
            {**PLAN, "valid_for": {"scheduler": "UniPCMultistepScheduler"}},
            PlanError,
            "valid for UniPCMultistepScheduler but the pipeline uses ToyScheduler",
        ),
    ],
    ids=["typo", "negative", "type", "other-family", "unknown-method", "missing-file", "scheduler"],
)
def test_bad_plan_leaves_model_untouched(plan, error, match) -> None:
    pipe = ToyPipeline()
    with pytest.raises(error, match=match):
        diffcache.accelerate(pipe, plan)
    assert _untouched(pipe)


def test_step_count_outside_valid_for_refuses_the_call_and_stays_accelerated() -> None:
    pipe = diffcache.accelerate(ToyPipeline(), {**PLAN, "valid_for": {"num_inference_steps": 8}})
    with pytest.raises(PlanError, match=r"num_inference_steps=8 but this call runs 6.*still acc"):
        pipe(torch.ones(1, 2), steps=6)
    assert pipe.transformer.calls == 0, "nothing of the refused call may run"
    assert diffcache.is_accelerated(pipe)
    pipe(torch.ones(1, 2), steps=8)
    assert diffcache.stats(pipe).skipped > 0, "the next call at the plan's steps is cached"


def test_no_adapter_for_family() -> None:
    class MysteryPipeline:
        transformer = torch.nn.Linear(1, 1)

    with pytest.raises(
        UnsupportedModelError, match=r"no adapter for MysteryPipeline.*known families"
    ):
        diffcache.accelerate(MysteryPipeline(), PLAN)


def test_unknown_builtin_model() -> None:
    with pytest.raises(
        UnsupportedModelError, match=r"wan2.1-tiyn: not a built-in model.*did you mean"
    ):
        diffcache.load_model("wan2.1-tiyn")
    for bad in (None, 3, "", " "):  # not the current folder, not a TypeError
        with pytest.raises(UnsupportedModelError, match="takes a built-in model name or a folder"):
            diffcache.load_model(bad)


def test_stats_of_plain_model_raises() -> None:
    with pytest.raises(DiffCacheError, match="not accelerated"):
        diffcache.stats(ToyPipeline())


def test_remove_is_idempotent() -> None:
    pipe = ToyPipeline()
    diffcache.remove(pipe)
    diffcache.accelerate(pipe, PLAN)
    diffcache.remove(pipe)
    diffcache.remove(pipe)
    assert _untouched(pipe)


@pytest.mark.parametrize("part", ["scheduler", "transformer"])
def test_replaced_component_is_detected(part: str) -> None:
    from diffcache.testing.toys import ToyDenoiser

    pipe = diffcache.accelerate(ToyPipeline(), PLAN)
    old = getattr(pipe, part)
    setattr(pipe, part, ToyScheduler() if part == "scheduler" else ToyDenoiser())
    with pytest.raises(RunError, match=f"{part} was replaced"):
        pipe(torch.ones(1, 2), steps=4)
    assert not diffcache.is_accelerated(pipe) and clean(old)


@pytest.mark.parametrize("times", [(40.0, 30.0, 20.0, 10.0), (0.0, 0.25, 0.5, 0.75)])
def test_bare_denoiser_needs_step_count_and_tracks_timesteps(times) -> None:
    """Time may run down (1000 -> 0) or up (0 -> 1); a second run starts cleanly either way."""
    net = ToyPipeline().transformer
    with pytest.raises(UnsupportedModelError, match="valid_for.num_inference_steps"):
        diffcache.accelerate(net, PLAN)
    assert clean(net)
    diffcache.accelerate(net, {**PLAN, "valid_for": {"num_inference_steps": 4}})
    for run in range(2):
        for t in times:
            for e in (1.0, -1.0):  # separate CFG: two calls per timestep
                net(torch.full((1, 2), 1.0 + t), torch.tensor(t), torch.tensor([e]))
        s = diffcache.stats(net)
        assert [(st, b) for st, b, _ in s.calls] == [(i, b) for i in range(4) for b in (0, 1)]
        assert s.steps == 4 and s.per_step() == [1.0, 1.0, 0.0, 1.0], f"run {run}: {s}"


@pytest.mark.parametrize(
    "steps, match",
    [(6, "goes on past step 4.*this call stopped after 4 steps"), (3, "stopped after 3")],
)
def test_bare_denoiser_enforces_valid_for_steps(steps: int, match: str) -> None:
    """A 4-step plan refuses a run that goes past step 4 (before step 5 runs), and notices a run
    that stopped at 3 when the next one starts; the model stays accelerated."""
    net = ToyPipeline().transformer
    diffcache.accelerate(net, {**PLAN, "valid_for": {"num_inference_steps": 4}})
    times = [float(10 * (steps - i)) for i in range(steps)]
    with pytest.raises(PlanError, match=match):
        for _ in range(2):
            for t in times:
                net(torch.ones(1, 2), torch.tensor(t))
    calls = net.calls
    assert diffcache.is_accelerated(net) and calls in (4, 3)
    for t in (40.0, 30.0, 20.0, 10.0):  # a run at the plan's steps works after the refusal
        net(torch.ones(1, 2), torch.tensor(t))
    assert diffcache.stats(net).steps == 4


def test_plan_kernels_triton_runs_the_triton_ops() -> None:
    """kernels: triton runs the Triton kernels (here in the interpreter) and Stats says so."""
    pipe = ToyPipeline(cfg="none")
    base_pipe = ToyPipeline(cfg="none")
    plans = [{**PLAN, "kernels": k} for k in ("triton", "torch")]
    outs = []
    for plan, p in zip(plans, (pipe, base_pipe), strict=True):
        diffcache.accelerate(p, plan)
        outs.append(p(torch.linspace(-1, 1, 8).reshape(1, 8), steps=6))
        assert set(diffcache.stats(p).kernels.values()) == {plan["kernels"]}
    assert torch.allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)


def test_plan_kernels_triton_unavailable_raises_before_attaching(monkeypatch) -> None:
    from diffcache.errors import KernelUnavailableError

    monkeypatch.setattr("diffcache.kernels._dispatch._interpret_enabled", lambda: False)
    pipe = ToyPipeline()
    with pytest.raises(KernelUnavailableError, match=r"l1_change: .*\n.*add_residual"):
        diffcache.accelerate(pipe, {**PLAN, "kernels": "triton"})
    assert _untouched(pipe)


def test_local_checkpoint_folder_loads_and_accelerates(tmp_path) -> None:
    """A real checkpoint is a local diffusers folder: save a tiny one, load it by path."""
    diffcache.load_model("dit-tiny").save_pretrained(tmp_path / "dit")
    pipe = diffcache.load_model(str(tmp_path / "dit"))
    assert type(pipe).__name__ == "DiTPipeline"
    diffcache.accelerate(pipe, "dit-tiny.yaml")
    diffcache.remove(pipe)
    with pytest.raises(UnsupportedModelError, match="no loader recognises this folder"):
        diffcache.load_model(str(tmp_path))


def test_two_real_pipelines_of_one_class_stay_independent() -> None:
    from diffcache.generate import Request, generate

    a, b = diffcache.load_model("wan2.1-tiny"), diffcache.load_model("wan2.1-tiny")
    req = Request(prompt="a cat", height=32, width=32, frames=5, steps=6, guidance=3.0)
    base = generate(b, req)
    diffcache.accelerate(a, {**PLAN, "model": "wan2.1"})
    generate(a, req)
    assert diffcache.stats(a).skipped > 0
    assert (generate(b, req) == base).all() and not diffcache.is_accelerated(b)
    assert clean(b.transformer, b.scheduler)


def test_a_request_field_two_families_declare_must_mean_the_same() -> None:
    """The CLI makes one flag per field name (``generate.request_fields``), so a family whose
    field of a name another family declares differs in type or help is refused at
    registration, and nothing of it is registered."""
    import dataclasses

    from diffcache.registry import adapters, register_adapter

    shared = next(f for a in adapters().values() for f in a.fields)
    other_type = str if shared.type is not str else int
    for field in (
        dataclasses.replace(shared, help=shared.help + ", read another way"),
        dataclasses.replace(shared, type=other_type),
    ):
        adapter = diffcache.Adapter("clash-test", ("ClashTestPipeline",), (), fields=(field,))
        with pytest.raises(ValueError, match=f"request field {shared.name!r} differs"):
            register_adapter(adapter)
        assert "clash-test" not in adapters()
