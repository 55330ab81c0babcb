"""Few-step runs (issue 24 item 2): a method's options that reuse nothing in a run of N steps say
so with the smallest step count they support and the option value that would act at N; refused
where the plan's ``valid_for`` (or the CLI request) gives N, warned about once at the first step
of a Python call otherwise. ``diffcache profile`` works at 4, 6 and 8 steps."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch

import diffcache
from diffcache.cli import main
from diffcache.errors import PlanError
from diffcache.generate import generate
from diffcache.methods.easycache import EasyCacheConfig
from diffcache.methods.ertacache import ERTACacheConfig
from diffcache.methods.hyca import HyCaConfig
from diffcache.methods.invardiff import InvarDiffConfig
from diffcache.plan import Plan
from diffcache.testing.toys import clean, tiny_request

CONFIGS = [
    EasyCacheConfig(),
    EasyCacheConfig(warmup_steps=4),
    EasyCacheConfig(warmup_steps=0),
    HyCaConfig(),
    HyCaConfig(warmup_steps=1),
    InvarDiffConfig(),
    InvarDiffConfig(nonskip_rate=0.6),
    ERTACacheConfig(),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.name}-{c.to_options()}")
def test_limit_message_least_count_and_fix_agree(config) -> None:
    """The smallest count the message names is the first count without a problem, and the
    option value it names removes the problem at the asked count."""
    problems = [config.steps_problem(n) for n in range(1, 40)]
    least = next(n for n, p in zip(range(1, 40), problems, strict=True) if p is None)
    assert all(p is None for p in problems[least - 1 :])
    limit = config.step_limit(least - 1)
    assert limit.least == least
    message = config.steps_problem(least - 1)
    assert config.name in message and f"at least {least} steps" in message
    if limit.option:
        assert f"options.{limit.option}: " in message
        assert f"{limit.option}={getattr(config, limit.option)} " in message
    for n in range(2, least):
        fix = config.step_limit(n).fix
        if fix is not None:
            assert f"{limit.option}={fix} would act at {n} steps" in config.steps_problem(n)
            assert dataclasses.replace(config, **{limit.option: fix}).steps_problem(n) is None


def test_the_limits_of_the_default_options() -> None:
    """What users meet at 4, 6 and 8 steps with each method's default options."""
    assert EasyCacheConfig().steps_problem(8) == (
        "options.warmup_steps: easycache with warmup_steps=10 reuses nothing in 8 steps (it needs "
        "at least 12 steps); warmup_steps=6 would act at 8 steps"
    )
    assert HyCaConfig().steps_problem(4) == (
        "options.warmup_steps: hyca with warmup_steps=3 reuses nothing in 4 steps (it needs at "
        "least 5 steps); warmup_steps=2 would act at 4 steps"
    )
    assert EasyCacheConfig().steps_problem(3).endswith("no warmup_steps acts at 3 steps")
    for config in (HyCaConfig(), InvarDiffConfig(), ERTACacheConfig()):
        assert config.steps_problem(6) is config.steps_problem(8) is None
    assert ERTACacheConfig().steps_problem(2) == (
        "ertacache reuses nothing in 2 steps: it needs at least 3 steps"
    )


def _stepless(name: str, **options) -> Plan:
    """A bundled dit-tiny plan with ``options`` and no ``valid_for.num_inference_steps``."""
    plan = Plan.load(name)
    valid_for = {k: v for k, v in plan.valid_for.items() if k != "num_inference_steps"}
    return dataclasses.replace(plan, options={**plan.options, **options}, valid_for=valid_for)


@pytest.fixture(scope="module")
def pipe():
    return diffcache.load_model("dit-tiny")


# the aggressive options of each uncalibrated-schedule method, at the counts around its limit
AROUND = [
    ("dit-tiny.yaml", {"threshold": 1e6, "warmup_steps": 0}, 4),
    ("dit-tiny.yaml", {"threshold": 1e6, "warmup_steps": 3}, 5),
    ("dit-tiny-hyca.yaml", {"interval": 1000, "warmup_steps": 1}, 3),
    ("dit-tiny-hyca.yaml", {"interval": 1000, "warmup_steps": 2}, 4),
]


@pytest.mark.parametrize(("name", "options", "least"), AROUND)
def test_runs_reuse_from_the_least_count_and_warn_below_it(pipe, name, options, least) -> None:
    """A Python call below the limit warns once (per step count) and computes every step,
    giving the plain output bit for bit; at the limit the same plan reuses."""
    plan = _stepless(name, **options)
    assert plan.config.step_limit(least - 1).least == least
    outputs = {}
    for steps in (least - 1, least):
        one = tiny_request("dit-tiny", steps)[2]
        outputs[steps, "plain"] = generate(pipe, one)
        diffcache.accelerate(pipe, plan)
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                outputs[steps] = generate(pipe, one)
                stats = diffcache.stats(pipe)
                generate(pipe, one)  # once per step count
        finally:
            diffcache.remove(pipe)
        said = [str(w.message) for w in seen if "reuses nothing" in str(w.message)]
        if steps < least:
            assert said == [
                f"diffcache: DiTPipeline: {plan.config.steps_problem(steps)}; this {steps}-step "
                "run computes every step"
            ]
            assert stats.skipped == 0 and (outputs[steps] == outputs[steps, "plain"]).all()
        else:
            assert said == [] and stats.skipped > 0
    assert clean(pipe.transformer)


def test_the_warning_says_when_strength_made_the_step_count() -> None:
    """img2img at strength 3/8 (8 steps scheduled, the last 3 run) with a plan that states no
    step count: the warning names the 3 steps run and the 8 scheduled, as the refusal does."""
    from diffcache.testing.toys import Img2ImgScheduler, ToyPipeline

    pipe = ToyPipeline(cfg="none")
    pipe.scheduler = Img2ImgScheduler()
    config = EasyCacheConfig(threshold=1e6, warmup_steps=3)
    assert config.step_limit(3).least == 5
    diffcache.accelerate(
        pipe,
        {"diffcache": 1, "model": "toy", "method": "easycache", "options": config.to_options()},
    )
    x = torch.ones(1, 2)
    pipe.scheduler.set_timesteps(8)
    pipe.scheduler.set_begin_index(5)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for t in pipe.scheduler.timesteps[5:]:
                x = pipe.scheduler.step(pipe.transformer(x, t, torch.tensor([1.0])).sample, t, x)[0]
        assert diffcache.stats(pipe).skipped == 0
    finally:
        diffcache.remove(pipe)
    assert [str(w.message) for w in seen] == [
        f"diffcache: ToyPipeline: {config.steps_problem(3)}; this 3-step run (strength runs 3 "
        "of its num_inference_steps=8) computes every step"
    ]


def test_a_plan_stating_its_step_count_refuses_a_few_step_run_without_warning() -> None:
    """A plan for 8 steps run at 3 (a count its options reuse nothing in): the run is refused
    for the step count, and no few-step warning comes first (it is for stepless plans)."""
    from diffcache.testing.toys import ToyPipeline

    pipe = ToyPipeline(cfg="none")
    config = EasyCacheConfig(threshold=1e6, warmup_steps=3)
    assert config.steps_problem(3) is not None and config.steps_problem(8) is None
    plan = {"diffcache": 1, "model": "toy", "method": "easycache"}
    diffcache.accelerate(
        pipe, {**plan, "options": config.to_options(), "valid_for": {"num_inference_steps": 8}}
    )
    pipe.scheduler.set_timesteps(3)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            t = pipe.scheduler.timesteps[0]
            with pytest.raises(PlanError, match="num_inference_steps=8"):
                pipe.transformer(torch.ones(1, 2), t, torch.tensor([1.0]))
    finally:
        diffcache.remove(pipe)
    assert [str(w.message) for w in seen] == []


def test_a_plan_for_too_few_steps_is_refused_at_load() -> None:
    plan = Plan.load("dit-tiny.yaml")
    with pytest.raises(PlanError) as err:
        dataclasses.replace(plan, valid_for={**plan.valid_for, "num_inference_steps": 4})
    assert str(err.value) == plan.source + (
        ": options.warmup_steps: easycache with warmup_steps=4 reuses nothing in 4 "
        "steps (it needs at least 6 steps); warmup_steps=2 would act at 4 steps"
    )


def test_cli_refuses_before_building_the_model(tmp_path: Path, capsys, monkeypatch) -> None:
    """A plan without a step count, run by the CLI at a count it cannot act in: one line naming
    the plan, the count and the fix, exit 2, no model built."""
    plan = _stepless("dit-tiny-hyca.yaml")
    path = plan.save(tmp_path / "hyca.yaml")
    monkeypatch.setattr(diffcache, "load_model", lambda *a, **k: pytest.fail("model built"))
    argv = ["generate", "--model", "dit-tiny", "--plan", str(path), "--steps", "4"]
    assert main([*argv, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"diffcache: error: hyca.yaml at 4 steps: {HyCaConfig().steps_problem(4)}"), err


@pytest.mark.parametrize("steps", [4, 6, 8])
@pytest.mark.parametrize(
    "config",
    [
        EasyCacheConfig(warmup_steps=2),
        HyCaConfig(warmup_steps=2, interval=2),
        ERTACacheConfig(time_adjust=False),
        InvarDiffConfig(),
    ],
    ids=lambda c: c.name,
)
def test_profile_at_few_steps(pipe, config, steps: int) -> None:
    """``diffcache profile`` at 4, 6 and 8 steps makes a plan for that count whose run follows
    the target (at most 0.75 of the work) and reuses something."""
    req, prompts, one = tiny_request("dit-tiny", steps)
    plan = diffcache.profile(pipe, config, prompts, target_compute=0.75, request=req)
    assert plan.valid_for["num_inference_steps"] == steps
    diffcache.accelerate(pipe, plan)
    try:
        generate(pipe, one)
        stats = diffcache.stats(pipe)
    finally:
        diffcache.remove(pipe)
    assert stats.steps == steps and 0 < stats.compute_fraction <= 0.75 + 1e-9
