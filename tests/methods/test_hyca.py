"""HyCa: the solvers, the schedule and its compute target, and the method on every DiT family
(block sites, single- and dual-stream), profiled and followed exactly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import diffcache
from diffcache.errors import PlanError
from diffcache.generate import generate
from diffcache.methods.hyca import SOLVERS, HyCaConfig, solver_weights
from diffcache.plan import Plan
from tests.toys import clean, tiny_request

STEPS = 8
PROMPTS = ["a cat", "a red fox"]


@pytest.mark.parametrize(
    ("solver", "exact_for"),
    [("reuse", 0), ("linear", 1), ("quadratic", 2), ("ab2", 1)],
)
def test_each_solver_recovers_the_trajectories_it_is_exact_for(solver: str, exact_for: int) -> None:
    steps = [0, 3, 5]  # uneven spacing, as after a warm-up
    for degree in range(3):
        coef = [0.7, -1.3, 0.4][: degree + 1]

        def f(t: float, coef: list[float] = coef) -> float:
            return sum(c * t**i for i, c in enumerate(coef))

        for k in (6, 7, 9):
            w = solver_weights(solver, steps, k)
            got = sum(wi * f(s) for wi, s in zip(w, steps, strict=True))
            if degree <= exact_for:
                assert got == pytest.approx(f(k), abs=1e-9), (solver, degree, k)
            elif k == 9:
                assert got != pytest.approx(f(k), abs=1e-6), (solver, degree)


def test_short_histories_fall_back_to_lower_orders() -> None:
    assert solver_weights("quadratic", [4], 6) == [1.0]
    assert solver_weights("ab2", [2, 4], 6) == pytest.approx([-1.0, 2.0])
    assert all(len(solver_weights(s, [1, 2, 3], 5)) == 3 for s in SOLVERS)


def test_schedule_and_interval_for_a_target() -> None:
    cfg = HyCaConfig(interval=3, warmup_steps=2)
    assert [k for k in range(10) if cfg.full(k)] == [0, 1, 2, 5, 8]
    assert cfg.compute_fraction(10) == 0.5
    with pytest.raises(PlanError, match="solvers"):
        HyCaConfig(solvers=("rk4",))


FAMILIES = [
    "wan2.1-tiny",
    "hunyuanvideo-tiny",
    "flux-tiny",
    "qwenimage-tiny",
    "dit-tiny",
    "cogvideox-tiny",
]


@pytest.mark.parametrize("model", FAMILIES)
def test_every_family_follows_its_plan_exactly(model: str) -> None:
    pipe = diffcache.load_model(model)
    req, prompts, one = tiny_request(model, STEPS)
    base = generate(pipe, one)
    plan = diffcache.profile(
        pipe, HyCaConfig(warmup_steps=2), prompts, target_compute=0.6, request=req
    )
    cfg = plan.config
    full = sum(cfg.full(k) for k in range(STEPS))
    assert full / STEPS <= 0.6 and plan.provenance["measured"]["cluster_solvers"]
    blocks = len(
        diffcache.adapter.Target.resolve(diffcache.registry.find_adapter(pipe), pipe).sites("block")
    )
    diffcache.accelerate(pipe, plan)
    try:
        out = generate(pipe, one)
        stats = diffcache.stats(pipe)
    finally:
        diffcache.remove(pipe)
    branches = stats.computed // (full * blocks)
    assert branches >= 1 and stats.computed == branches * full * blocks
    assert stats.skipped == branches * (STEPS - full) * blocks
    assert stats.kernels["forecast"] in ("torch", "triton")
    assert torch.isfinite(torch.as_tensor(out)).all() and not (out == base).all()
    assert clean(pipe.transformer) and (generate(pipe, one) == base).all()


@pytest.fixture(scope="module")
def flux_plan(tmp_path_factory):
    pipe = diffcache.load_model("flux-tiny")
    req, prompts, _ = tiny_request("flux-tiny", STEPS)
    out = tmp_path_factory.mktemp("hyca") / "flux-hyca.yaml"
    diffcache.profile(pipe, HyCaConfig(warmup_steps=2, interval=3), prompts, request=req, out=out)
    return pipe, req, Plan.load(out)


def test_identity_equals_the_baseline(flux_plan) -> None:
    pipe, req, plan = flux_plan
    base = generate(pipe, req.replace(prompt="a cat"))
    diffcache.accelerate(pipe, dataclasses.replace(plan, options={**plan.options, "interval": 1}))
    try:
        assert (generate(pipe, req.replace(prompt="a cat")) == base).all()
        assert diffcache.stats(pipe).skipped == 0
    finally:
        diffcache.remove(pipe)


def test_round_trip_and_deterministic_profiling(flux_plan, tmp_path) -> None:
    pipe, req, plan = flux_plan
    again = Plan.load(plan.save(tmp_path / "again.yaml"))
    first = Path(plan.source)
    assert (
        first.with_suffix(".safetensors").read_bytes()
        == (tmp_path / "again.safetensors").read_bytes()
    )
    assert first.read_text().replace(first.stem, "X") == Path(again.source).read_text().replace(
        "again", "X"
    )
    other = diffcache.profile(pipe, HyCaConfig(warmup_steps=2, interval=3), PROMPTS, request=req)
    assert other.calibration == plan.calibration
    assert all(torch.equal(other.tensors[k], plan.tensors[k]) for k in plan.tensors)


def test_a_dimension_map_of_another_shape_is_refused(flux_plan) -> None:
    pipe, req, plan = flux_plan
    labels = plan.tensors["labels"]
    bad = dataclasses.replace(plan, tensors={**plan.tensors, "labels": labels[:-1]})
    with pytest.raises(PlanError, match="dimension map has shape"):
        diffcache.accelerate(pipe, bad)
    assert clean(pipe.transformer, pipe.scheduler)
