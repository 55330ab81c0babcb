"""Bad input through the public API: a clear DiffCacheError subclass, and the model untouched."""

from __future__ import annotations

import pytest
import torch

import diffcache
from diffcache import hooks
from diffcache.errors import DiffCacheError, PlanError, RunError, UnsupportedModelError
from tests.toys import ToyPipeline, ToyScheduler

PLAN = {
    "diffcache": 1,
    "model": "toy",
    "method": "easycache",
    "options": {"threshold": 1e6, "warmup_steps": 2},
}


def _untouched(pipe: ToyPipeline) -> bool:
    return all(
        hooks.HOOKS_ATTR not in o.__dict__ for o in (pipe.transformer, pipe.scheduler)
    ) and not diffcache.is_accelerated(pipe)


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


def test_step_count_outside_valid_for_raises_at_call_and_cleans() -> None:
    pipe = diffcache.accelerate(ToyPipeline(), {**PLAN, "valid_for": {"num_inference_steps": 50}})
    with pytest.raises(PlanError, match=r"num_inference_steps=50 but this call runs 6"):
        pipe(torch.ones(1, 2), steps=6)
    assert _untouched(pipe)


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


def test_replaced_scheduler_is_detected() -> None:
    pipe = diffcache.accelerate(ToyPipeline(), PLAN)
    pipe.scheduler = ToyScheduler()
    with pytest.raises(RunError, match="scheduler was replaced"):
        pipe(torch.ones(1, 2), steps=4)
    assert not diffcache.is_accelerated(pipe)


def test_bare_denoiser_needs_step_count_and_tracks_timesteps() -> None:
    net = ToyPipeline().transformer
    with pytest.raises(UnsupportedModelError, match="valid_for.num_inference_steps"):
        diffcache.accelerate(net, PLAN)
    assert hooks.HOOKS_ATTR not in net.__dict__
    diffcache.accelerate(net, {**PLAN, "valid_for": {"num_inference_steps": 4}})
    for run in range(2):
        for t in (40.0, 30.0, 20.0, 10.0):
            for e in (1.0, -1.0):  # separate CFG: two calls per timestep
                net(torch.full((1, 2), 1.0 + t), torch.tensor(t), torch.tensor([e]))
        s = diffcache.stats(net)
        assert [(st, b) for st, b, _ in s.calls] == [(i, b) for i in range(4) for b in (0, 1)]
        assert s.steps == 4 and s.per_step() == [1.0, 1.0, 0.0, 1.0], f"run {run}: {s}"
