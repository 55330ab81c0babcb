"""HyCa: the solvers, the schedule and its compute target, and the method on every DiT family
(block sites, single- and dual-stream), profiled and followed exactly."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

import diffcache
from diffcache.errors import PlanError
from diffcache.generate import generate
from diffcache.methods.hyca import HyCaConfig
from diffcache.methods.hyca_calibrate import choose
from diffcache.methods.hyca_solvers import POINTS, SOLVERS, history_length, solver_weights
from diffcache.plan import Plan
from diffcache.testing.toys import clean, tiny_request

STEPS = 8
PROMPTS = ["a cat", "a red fox"]


EXACT_FOR = {  # the highest polynomial degree each solver forecasts exactly, at any spacing
    "reuse": 0, "linear": 1, "quadratic": 2, "ab2": 1, "ab3": 1, "tf2": 1, "tf3": 1, "rk2": 1,
    "am2": 1, "bdf2": 1,
}  # fmt: skip


def _poly(coef: list[float]):
    return lambda t: sum(c * t**i for i, c in enumerate(coef))


def _apply(w: list[float], steps: list[int], f) -> float:
    return sum(wi * f(s) for wi, s in zip(w, steps, strict=True))


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("steps", [[0, 3, 5], [0, 1, 4, 7]])  # uneven, as after a warm-up
def test_each_solver_recovers_the_trajectories_it_is_exact_for(solver: str, steps: list) -> None:
    assert set(EXACT_FOR) == set(SOLVERS)
    exact_for = EXACT_FOR[solver]
    for degree in range(4):
        f = _poly([0.7, -1.3, 0.4, 0.25][: degree + 1])
        got = {k: _apply(solver_weights(solver, steps, k), steps, f) for k in (8, 9, 12)}
        if degree <= exact_for:
            assert all(v == pytest.approx(f(k), abs=1e-9) for k, v in got.items()), degree
        elif degree == exact_for + 1 and len(steps) >= POINTS[solver]:
            assert got[12] != pytest.approx(f(12), abs=1e-6), degree


def test_the_stencils_on_an_even_grid_one_step_ahead() -> None:
    even = [0, 1, 2]
    assert solver_weights("rk2", even, 3) == pytest.approx([-0.5, 0.0, 1.5])  # 3/2 F_n - 1/2 F_n-2
    assert solver_weights("ab2", even, 3) == pytest.approx([0.5, -2.0, 2.5])
    assert solver_weights("am2", even, 3) == pytest.approx([0.25, -1.5, 2.25])
    assert solver_weights("bdf2", even, 3) == pytest.approx([2 / 3, -7 / 3, 8 / 3])
    ab3 = [-5 / 12, 16 / 12 + 5 / 12, -23 / 12 - 16 / 12, 1 + 23 / 12]
    assert solver_weights("ab3", [0, 1, 2, 3], 4) == pytest.approx(ab3)


def test_am2_and_bdf2_are_their_correctors_on_the_extrapolated_slope() -> None:
    steps, k = [0, 3, 5], 8
    g = torch.Generator().manual_seed(0)
    F = torch.randn(3, generator=g, dtype=torch.float64).tolist()  # noqa: N806
    h, gap = k - steps[2], steps[2] - steps[1]
    f1, f2 = (F[1] - F[0]) / (steps[1] - steps[0]), (F[2] - F[1]) / gap
    pred = F[2] + h * (1.5 * f2 - 0.5 * f1)  # AB2 predictor
    am2 = F[2] + h / 2 * (f2 + (pred - F[2]) / h)  # trapezoidal corrector
    assert _apply(solver_weights("am2", steps, k), steps, lambda s: F[steps.index(s)]) == (
        pytest.approx(am2)
    )
    fk = f2 + (k - steps[2]) * (f2 - f1) / gap  # the slope at k, extrapolated
    w = (
        h / gap
    )  # variable-step BDF2: y_k - (1+w)^2/(1+2w) y_n + w^2/(1+2w) y_n-1 = h(1+w)/(1+2w) f_k
    bdf2 = (
        (1 + w) ** 2 / (1 + 2 * w) * F[2]
        - w**2 / (1 + 2 * w) * F[1]
        + h * (1 + w) / (1 + 2 * w) * fk
    )
    assert _apply(solver_weights("bdf2", steps, k), steps, lambda s: F[steps.index(s)]) == (
        pytest.approx(bdf2)
    )


@pytest.mark.parametrize("order", [2, 3])
def test_tf_is_taylorseers_difference_ladder(order: int) -> None:
    """The ladder updated full step by full step, as TaylorSeer does, then the Taylor sum."""
    steps = [0, 1, 2, 5, 8][-(order + 1) :]
    g = torch.Generator().manual_seed(order)
    values = torch.randn(len(steps), generator=g, dtype=torch.float64).tolist()
    derivs: list[float] = []
    for i, (s, v) in enumerate(zip(steps, values, strict=True)):
        new = [v]
        for m in range(min(i, order)):
            new.append((new[m] - derivs[m]) / (s - steps[i - 1]))
        derivs = new
    for k in (9, 10):
        want = sum(d * (k - steps[-1]) ** m / math.factorial(m) for m, d in enumerate(derivs))
        w = solver_weights(f"tf{order}", steps, k)
        assert _apply(w, steps, lambda s: values[steps.index(s)]) == pytest.approx(want)


def test_the_solvers_are_distinct_stencils() -> None:
    steps = [0, 1, 2, 5, 8]  # warm-up 3, interval 3; forecasting one and two steps ahead
    for k in (9, 10):
        rows = {s: tuple(round(x, 9) for x in solver_weights(s, steps[-4:], k)) for s in SOLVERS}
        assert len(set(rows.values())) == len(SOLVERS), rows


def test_short_histories_fall_back_to_lower_orders() -> None:
    assert solver_weights("quadratic", [4], 6) == [1.0]
    assert solver_weights("ab2", [2, 4], 6) == pytest.approx([-1.0, 2.0])
    assert solver_weights("ab3", [1, 2, 4], 6) == solver_weights("ab2", [1, 2, 4], 6)
    assert solver_weights("tf3", [1, 2, 4], 6) == solver_weights("tf2", [1, 2, 4], 6)
    for s in ("rk2", "am2", "bdf2", "tf2"):
        assert solver_weights(s, [2, 4], 6) == pytest.approx([-1.0, 2.0])
    assert all(len(solver_weights(s, [1, 2, 3], 5)) == 3 for s in SOLVERS)
    assert history_length(["reuse", "linear"]) == 2 and history_length(["tf3"]) == 4


def test_each_cluster_takes_its_lowest_error_solver_from_the_whole_pool() -> None:
    b, d = 2, 8
    g = torch.Generator().manual_seed(0)
    energy = torch.rand(b, d, 4, generator=g, dtype=torch.float64) + 0.1
    energy[:, : d // 2, 1:] *= 100.0  # two clearly separated groups of dimensions
    errors = torch.ones(b, d, len(SOLVERS), dtype=torch.float64)
    errors[:, : d // 2, SOLVERS.index("bdf2")] = 0.1
    errors[:, d // 2 :, SOLVERS.index("tf3")] = 0.1
    cal = choose(HyCaConfig(), errors, energy)
    got = {cal.cluster_solvers[int(cal.labels[0, 0])], cal.cluster_solvers[int(cal.labels[0, -1])]}
    assert got == {"bdf2", "tf3"}
    narrow = choose(HyCaConfig(solvers=("reuse", "linear", "tf3")), errors, energy)
    assert set(narrow.cluster_solvers) == {"tf3", "reuse"}  # ties: the first of the pool


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
    _forecasts_extrapolate_the_computed_residuals(pipe, plan, one, full)


def _forecasts_extrapolate_the_computed_residuals(pipe, plan, request, full: int) -> None:
    """With every cluster on ``linear``, each forecast residual's mean (per block, branch and
    stream) is the line through the last two computed residuals' means, evaluated at the
    forecast step (the weights written out here, the means measured on computed calls)."""
    cal = {
        **plan.calibration,
        "cluster_solvers": ["linear"] * len(plan.calibration["cluster_solvers"]),
    }
    diffcache.accelerate(pipe, dataclasses.replace(plan, calibration=cal), trace=True)
    try:
        generate(pipe, request)
        trace = diffcache.stats(pipe).trace
    finally:
        diffcache.remove(pipe)
    seen: dict[tuple, dict[int, list[float]]] = {}
    forecasts = 0
    for e in trace:
        means = seen.setdefault((e["site"], e["branch"], e["expert"]), {})
        if e["action"] == "computed":
            means[e["step"]] = e["values"]["residual_mean"]
            continue
        assert e["action"] == "forecast", e
        k, (s1, s2) = e["step"], sorted(means)[-2:]
        want = [
            a * (k - s2) / (s1 - s2) + b * (k - s1) / (s2 - s1)
            for a, b in zip(means[s1], means[s2], strict=True)
        ]
        assert e["values"]["history"] == [s1, s2]
        assert e["values"]["residual_mean"] == pytest.approx(want, rel=1e-3, abs=1e-5), e
        forecasts += 1
    assert forecasts > 0 and len({e["step"] for e in trace if e["action"] == "computed"}) == full


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


def _generate_with(pipe, plan, req):
    diffcache.accelerate(pipe, plan)
    try:
        return generate(pipe, req), diffcache.stats(pipe)
    finally:
        diffcache.remove(pipe)


def test_four_point_solvers_run_and_plans_of_the_old_pool_still_do(flux_plan) -> None:
    pipe, req, plan = flux_plan
    one = req.replace(prompt="a cat")
    clusters = len(plan.calibration["cluster_solvers"])
    assert plan.tensors["errors"].shape[-1] == len(SOLVERS)  # every solver was scored
    outs = []
    for solvers in (["linear"] * clusters, ["tf3"] * clusters, ["ab3", "bdf2"][:clusters]):
        cal = {**plan.calibration, "cluster_solvers": solvers}
        out, stats = _generate_with(pipe, dataclasses.replace(plan, calibration=cal), one)
        assert stats.kernels["forecast"] in ("torch", "triton")
        assert torch.isfinite(torch.as_tensor(out)).all()
        outs.append(out)
    assert all(not (o == outs[0]).all() for o in outs[1:])
    # a plan profiled when the pool had four solvers (four error columns) runs as before
    old = dataclasses.replace(
        plan,
        options={**plan.options, "solvers": list(SOLVERS[:4])},
        tensors={**plan.tensors, "errors": plan.tensors["errors"][..., :4]},
    )
    old = Plan.load(old.save(Path(plan.source).with_name("old.yaml")))
    assert (_generate_with(pipe, old, one)[0] == _generate_with(pipe, plan, one)[0]).all()


def _toy_plan(dims: int) -> Plan:
    """HyCa on the two toy blocks, warm-up 2, a full step every 3: block 0's ``dims``
    dimensions forecast by ``linear``, block 1's by ``reuse``."""
    cfg = HyCaConfig(warmup_steps=2, interval=3, solvers=("linear", "reuse"))
    return Plan(
        model="toy",
        method="hyca",
        options=cfg.to_options(),
        calibration={"cluster_solvers": ["linear", "reuse"]},
        tensors={
            "labels": torch.tensor([[0] * dims, [1] * dims]),
            "errors": torch.zeros(2, dims, 2),
            "indicators": torch.zeros(2, dims, 3),
        },
    )


def test_skipped_steps_return_the_solvers_forecast_for_that_step() -> None:
    """Toy blocks on scripted latents ``x_k = k^2``: block 0's residual is ``x_k`` (forecast
    by ``linear``), block 1's is ``-2x_k / 2 = -x_k`` at its computed input ``2x_k`` (by
    ``reuse``). A skipped step ``k`` then returns ``v = 2 (x_k + f_k - x_s) + 1`` with ``s``
    the last full step and ``f_k`` the line through the last two full steps' ``x`` at ``k``;
    full steps return the plain ``2 x_k + 1``."""
    from diffcache.testing.toys import ToyPipeline

    steps, dims = 8, 3
    xs = [float(k * k) for k in range(steps)]
    pipe = ToyPipeline(cfg="none", script=[torch.full((1, 2, dims), x) for x in xs])
    plan = _toy_plan(dims)
    diffcache.accelerate(pipe, plan)
    pipe(torch.full((1, 2, dims), xs[0]), steps=steps)
    full = [0, 1, 2, 5]  # k < 2, and (k - 2) % 3 == 0
    want = []
    for k, x in enumerate(xs):
        if k in full:
            want.append(2 * x + 1)
            continue
        s1, s2 = [s for s in full if s < k][-2:]
        f = xs[s2] + (k - s2) * (xs[s2] - xs[s1]) / (s2 - s1)
        want.append(2 * (x + f - xs[s2]) + 1)
    assert want[3] == 2 * (9 + 7 - 4) + 1  # history (1, 2): f_3 = 4 + 1 * (4 - 1) = 7
    got = [o.flatten().tolist() for o in pipe.scheduler.outputs]
    assert got == [[w] * 2 * dims for w in want]
    assert diffcache.stats(pipe).per_step() == [float(k in full) for k in range(steps)]


def test_the_solver_weights_are_made_once_per_skipped_step_for_all_blocks(monkeypatch) -> None:
    """The forecast weights depend on the history's steps and the step forecast, not on the
    block: a run makes the stencil of each solver the plan uses (not the whole pool) once per
    skipped step, however many blocks."""
    from diffcache.methods import hyca
    from diffcache.testing.toys import ToyPipeline

    made = []
    monkeypatch.setattr(
        hyca, "solver_weights", lambda s, steps, k: made.append(k) or solver_weights(s, steps, k)
    )
    steps, dims = 8, 3
    pipe = ToyPipeline(cfg="none", script=[torch.full((1, 2, dims), float(k)) for k in range(8)])
    plan = _toy_plan(dims)
    diffcache.accelerate(pipe, plan)
    pipe(torch.full((1, 2, dims), 0.0), steps=steps)
    skipped = [k for k in range(steps) if not (k < 2 or (k - 2) % 3 == 0)]
    assert skipped == [3, 4, 6, 7]
    assert made == [k for k in skipped for _ in ("linear", "reuse")]  # the plan's solvers


def test_a_plan_for_a_step_count_makes_its_weights_when_the_session_opens(monkeypatch) -> None:
    """With ``valid_for.num_inference_steps``, the histories of every skipped step follow from
    the schedule: ``accelerate`` makes their weights (the same stencils, in step order) and the
    run makes none, with the same outputs as weights made as the run goes."""
    from diffcache.methods import hyca
    from diffcache.testing.toys import ToyPipeline

    made = []
    monkeypatch.setattr(
        hyca,
        "solver_weights",
        lambda s, steps, k: made.append((steps, k)) or solver_weights(s, steps, k),
    )
    steps, dims = 8, 3
    outputs = []
    for valid_for in ({}, {"num_inference_steps": steps}):
        script = [torch.full((1, 2, dims), float(k * k)) for k in range(steps)]
        pipe = ToyPipeline(cfg="none", script=script)
        diffcache.accelerate(pipe, dataclasses.replace(_toy_plan(dims), valid_for=valid_for))
        opened = list(made)
        pipe(torch.full((1, 2, dims), 0.0), steps=steps)
        outputs.append([o.tolist() for o in pipe.scheduler.outputs])
        made.clear()
    histories = [((1, 2), 3), ((1, 2), 4), ((2, 5), 6), ((2, 5), 7)]  # the last two full steps
    assert opened == [h for h in histories for _ in ("linear", "reuse")] and made == []
    assert outputs[0] == outputs[1]


def _lagrange(steps: list[int], k: int) -> list[float]:
    """Weights of the polynomial through ``steps`` evaluated at ``k`` (written out here)."""
    return [math.prod((k - m) / (s - m) for m in steps if m != s) for s in steps]


@pytest.mark.parametrize(
    "solver,path", [("linear", lambda k: 3.0 * k + 2), ("quadratic", lambda k: k * k - 2.0 * k)]
)
def test_forecasts_extrapolate_a_known_feature_path(solver: str, path) -> None:
    """Scripted latents ``x_k`` on a line / parabola: block 0's residual is ``x_k`` itself, so
    a forecast by the polynomial through the last 2 / 3 full steps is exact: block 0 returns
    ``2 x_k`` at every step, forecast or not, and the trace's forecast events name the full
    steps, the solver and its Lagrange weights (written out in the test) for step ``k``."""
    from diffcache.testing.toys import ToyPipeline

    steps, dims = 9, 2
    xs = [path(k) for k in range(steps)]
    pipe = ToyPipeline(cfg="none", script=[torch.full((1, 2, dims), x) for x in xs])
    cfg = HyCaConfig(warmup_steps=3, interval=3, solvers=(solver,))
    plan = Plan(
        model="toy",
        method="hyca",
        options=cfg.to_options(),
        calibration={"cluster_solvers": [solver]},
        tensors={
            "labels": torch.zeros(2, dims, dtype=torch.int64),
            "errors": torch.zeros(2, dims, 1),
            "indicators": torch.zeros(2, dims, 3),
        },
    )
    block0: list[float] = []
    pipe.transformer.blocks[0].register_forward_hook(
        lambda m, i, o: block0.append(o.flatten()[0].item())
    )
    diffcache.accelerate(pipe, plan, trace=True)
    pipe(torch.full((1, 2, dims), xs[0]), steps=steps)
    full = [k for k in range(steps) if k < 3 or (k - 3) % 3 == 0]  # 0, 1, 2, 3, 6
    assert block0 == pytest.approx([2 * x for x in xs], rel=1e-6, abs=1e-6)
    assert [block0[k] for k in (4, 5)] == [2 * xs[4], 2 * xs[5]]  # integer weights: exact
    events = [e for e in diffcache.stats(pipe).trace if e["site"].endswith("blocks.0")]
    n = {"linear": 2, "quadratic": 3}[solver]
    for k, e in enumerate(events):
        if k in full:
            assert e["action"] == "computed", e
            continue
        history = [s for s in full if s < k][-n:]
        assert e["action"] == "forecast" and e["values"]["history"] == history
        assert e["values"]["solvers"] == [solver]
        assert e["values"]["weights"] == [pytest.approx(_lagrange(history, k), abs=1e-12)]
        assert e["values"]["residual_mean"] == [pytest.approx(xs[k], rel=1e-6, abs=1e-6)]


def _full_steps(steps: int, warmup: int, interval: int) -> int:
    """Full steps of the schedule, counted by hand: the warm-up, then one every ``interval``."""
    return warmup + math.ceil((steps - warmup) / interval)


@pytest.mark.parametrize(
    ("warmup", "target", "interval"),
    [(2, 1.0, 1), (2, 0.9, 2), (2, 0.6, 2), (2, 0.59, 3), (1, 0.2, 9)],
    ids=["all", "below-all", "equal-to-interval-2", "just-below-it", "last-useful-interval"],
)
def test_the_smallest_interval_meeting_the_target(warmup: int, target: float, interval: int):
    """10 steps: interval n computes (warmup + ceil((10 - warmup) / n)) / 10; the profile picks
    the smallest n at or below the target, up to the interval that leaves one full step after
    the warm-up (9 with warm-up 1)."""
    from diffcache.methods.hyca_calibrate import _fit_interval

    fracs = {n: _full_steps(10, warmup, n) / 10 for n in range(1, 11)}
    assert interval == min(n for n, f in fracs.items() if f <= target)
    cfg = HyCaConfig(warmup_steps=warmup, interval=5)
    assert _fit_interval(cfg, 10, target) == dataclasses.replace(cfg, interval=interval)


def test_an_unreachable_target_names_the_least_compute() -> None:
    from diffcache.errors import TargetUnreachable
    from diffcache.methods.hyca_calibrate import _fit_interval

    least = _full_steps(10, 3, 10) / 10  # the warm-up and step 3
    with pytest.raises(TargetUnreachable) as err:
        _fit_interval(HyCaConfig(warmup_steps=3, interval=5), 10, 0.3)
    assert err.value.least == least == 0.4
    assert str(err.value) == (
        "hyca: with warm-up 3 the schedule computes at least 0.400 of the block calls at 10 "
        "steps, above the target 0.300; lower --option warmup_steps or ask for less"
    )


def test_identity_and_aggressive_schedules() -> None:
    """identity() computes every step; aggressive() only step 0 (its warm-up) and step 1 (the
    first after it), then forecasts (past the default interval's next full step, 6)."""
    assert [HyCaConfig.identity().full(k) for k in range(12)] == [True] * 12
    assert [HyCaConfig.aggressive().full(k) for k in range(12)] == [True, True] + [False] * 10


def test_a_dimension_map_of_another_hidden_size_is_refused_at_the_first_forecast(flux_plan):
    from diffcache.errors import RunError

    pipe, req, plan = flux_plan
    labels = plan.tensors["labels"]
    d = labels.shape[1]
    bad = dataclasses.replace(plan, tensors={**plan.tensors, "labels": labels[:, :-1]})
    diffcache.accelerate(pipe, bad)
    with pytest.raises(RunError) as err:
        generate(pipe, req.replace(prompt="a cat"))
    message = str(err.value)
    assert message.startswith(f"hyca: the plan clusters {d - 1} hidden dimensions but this ")
    assert f"block has {d} (step 3, " in message and message.endswith("; profile this model")
    assert clean(pipe.transformer, pipe.scheduler)


def test_an_unknown_cluster_solver_is_refused(flux_plan) -> None:
    pipe, _, plan = flux_plan
    solvers = ["rk4"] + list(plan.calibration["cluster_solvers"][1:])
    bad = dataclasses.replace(plan, calibration={**plan.calibration, "cluster_solvers": solvers})
    with pytest.raises(PlanError) as err:
        diffcache.accelerate(pipe, bad)
    assert str(err.value) == f"hyca: calibration.cluster_solvers ['rk4'] not in {list(SOLVERS)}"
    assert clean(pipe.transformer, pipe.scheduler)


def test_the_plan_records_the_schedules_compute_and_clusters(flux_plan) -> None:
    """Warm-up 2, interval 3 at 8 steps: full steps 0, 1, 2, 5 -> half the block calls."""
    _, _, plan = flux_plan
    measured = plan.provenance["measured"]
    labels = plan.tensors["labels"].flatten()
    clusters = len(plan.calibration["cluster_solvers"])
    assert measured["compute_fraction"] == _full_steps(STEPS, 2, 3) / STEPS == 0.5
    assert measured["cluster_sizes"] == [int((labels == c).sum()) for c in range(clusters)]
    assert measured["cluster_solvers"] == list(plan.calibration["cluster_solvers"])


class _NoBlocks:
    """Profiling of a model whose recorder saw no block call."""

    valid_for = {"num_inference_steps": 4}
    target_compute = None

    class target:  # noqa: N801 - the attribute Profiling has
        @staticmethod
        def sites(kind: str) -> list:
            return []

    @staticmethod
    def record(observer) -> dict:
        return {}


def test_profiling_without_block_calls_is_refused() -> None:
    from diffcache.errors import DiffCacheError

    with pytest.raises(DiffCacheError) as err:
        HyCaConfig().calibrate(_NoBlocks())
    assert str(err.value) == "hyca: no block call was recorded; does the model have blocks?"


class _Block(torch.nn.Module):
    def forward(self, hidden_states):
        return hidden_states


def test_the_recorder_measures_the_residual_energy_and_solver_errors() -> None:
    """One block, two hidden dimensions with residuals ``block(h) - h`` r_k = (k, k^2) at steps
    0-4 on the input h = 10 (warm-up 2, interval 3: steps 3 and 4 are forecast from 0, 1, 2).
    Energies of the differences of order 0-3, summed over steps: (30, 4, 0, 0) for k and
    (354, 84, 12, 0) for k^2. Errors on steps 3 and 4: reuse (r_2) 1 + 4 and 25 + 144; linear
    through steps 1, 2 is exact for k and gives 7, 10 for k^2 (4 + 36); quadratic is exact."""
    from types import SimpleNamespace

    from diffcache.methods.hyca_calibrate import _Recorder
    from diffcache.sites import Site

    site = Site(kind="block", name="blocks.0", module=_Block())
    rec = _Recorder(HyCaConfig(warmup_steps=2, interval=3), [site])
    h = torch.full((1, 1, 2), 10.0)
    for k in range(5):
        call = SimpleNamespace(site=site, branch=0, step=k, arg=lambda name, pos: h)
        rec.see(call, h + torch.tensor([[[k, k**2]]], dtype=torch.float32))
    out = rec.result()
    assert out["energy"].dtype == out["errors"].dtype == torch.float64  # sums over many steps
    assert out["energy"].tolist() == [[[30.0, 4.0, 0.0, 0.0], [354.0, 84.0, 12.0, 0.0]]]
    errors = out["errors"][0]
    assert errors[:, SOLVERS.index("reuse")].tolist() == [5.0, 169.0]
    assert errors[:, SOLVERS.index("linear")].tolist() == [0.0, 40.0]
    assert errors[:, SOLVERS.index("quadratic")].tolist() == [0.0, 0.0]


def test_blocks_of_two_hidden_sizes_are_refused_by_the_recorder() -> None:
    from types import SimpleNamespace

    from diffcache.errors import DiffCacheError
    from diffcache.methods.hyca_calibrate import _Recorder
    from diffcache.sites import Site

    sites = [Site(kind="block", name=f"blocks.{i}", module=_Block()) for i in range(2)]
    rec = _Recorder(HyCaConfig(warmup_steps=2, interval=3), sites)
    for site, d in zip(sites, (2, 3), strict=True):
        h = torch.ones(1, 1, d)
        rec.see(SimpleNamespace(site=site, branch=0, step=0, arg=lambda n, p, h=h: h), 2 * h)
    with pytest.raises(DiffCacheError) as err:
        rec.result()
    assert str(err.value) == (
        "hyca: block sites differ in hidden size ([2, 3]) or were not all called; one dimension "
        "clustering needs one hidden size"
    )


def test_plan_problems_and_an_empty_history() -> None:
    # step W computes (it starts the first interval): warm-up 7 forecasts nothing in 8 steps
    problems = HyCaConfig(warmup_steps=7).plan_problems({"num_inference_steps": 8})
    assert problems == [
        "options.warmup_steps: hyca with warmup_steps=7 reuses nothing in 8 steps (it needs at "
        "least 9 steps); warmup_steps=6 would act at 8 steps"
    ]
    assert HyCaConfig(warmup_steps=6).plan_problems({"num_inference_steps": 8}) == []
    with pytest.raises(ValueError) as err:
        solver_weights("ab3", [], 3)
    assert str(err.value) == "solver_weights: empty history"


def test_more_cluster_solvers_than_clusters_are_refused(flux_plan) -> None:
    pipe, _, plan = flux_plan
    solvers = list(plan.calibration["cluster_solvers"])
    clusters = int(plan.tensors["labels"].max()) + 1
    bad = dataclasses.replace(
        plan, calibration={**plan.calibration, "cluster_solvers": [*solvers, "reuse"]}
    )
    with pytest.raises(PlanError) as err:
        diffcache.accelerate(pipe, bad)
    assert str(err.value) == (
        f"hyca: the plan names {len(solvers) + 1} cluster solvers for {clusters} clusters"
    )
    assert clean(pipe.transformer, pipe.scheduler)


def test_unknown_solvers_are_named() -> None:
    """In the options (none at all reads ``[]``) and in ``solver_weights`` (a KeyError from
    its points table before)."""
    for solvers, shown in ((("rk4", "linear", "euler"), "['rk4', 'euler']"), ((), "[]")):
        with pytest.raises(PlanError) as e:
            HyCaConfig(solvers=solvers)
        assert str(e.value) == f"options.solvers: {shown}; choose from {list(SOLVERS)}"
    with pytest.raises(ValueError) as e:
        solver_weights("rk4", [0, 1, 2], 3)
    assert str(e.value) == f"unknown solver 'rk4'; choose from {list(SOLVERS)}"


def test_the_indicators_are_log_energy_ratios_clustered_on_their_z_scores() -> None:
    """Energies E0..E3 per (block, dimension) give the indicators log(E1/E0), log(E2/E1),
    log(E3/E2) (a zero energy stays finite). Half the dimensions have first and third
    indicators of +0.1 and +0.2, half -0.1 and -0.2; the second spreads each half over -3..3
    and tells nothing: on z-scores the clusters are the two halves (on raw values the spread
    would win). Each cluster takes its own lowest-error solver."""
    b, d = 2, 4
    first = torch.tensor([0.1, 0.1, -0.1, -0.1]).expand(b, d)
    second = torch.tensor([[-3.0, 3.0, -3.0, 3.0], [-1.0, 1.0, -1.0, 1.0]])
    third = 2 * first
    want = torch.stack([first, second, third], -1)
    energy = torch.ones(b, d, 4, dtype=torch.float64)
    energy[..., 1] = first.double().exp()
    energy[..., 2] = energy[..., 1] * second.double().exp()
    energy[..., 3] = energy[..., 2] * third.double().exp()
    errors = torch.ones(b, d, len(SOLVERS), dtype=torch.float64)
    errors[:, :2, SOLVERS.index("linear")] = 0.1
    errors[:, 2:, SOLVERS.index("ab2")] = 0.1
    cal = choose(HyCaConfig(clusters=2), errors, energy)
    assert cal.indicators.shape == (b, d, 3)
    assert torch.allclose(cal.indicators, want, atol=1e-6)
    assert cal.labels.dtype == torch.int64
    assert cal.labels.tolist() == [[cal.labels[0, 0]] * 2 + [1 - cal.labels[0, 0]] * 2] * b
    assert cal.cluster_solvers[int(cal.labels[0, 0])] == "linear"
    assert cal.cluster_solvers[int(cal.labels[0, 2])] == "ab2"
    silent = torch.tensor([[[0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]], dtype=torch.float64)
    cal = choose(HyCaConfig(clusters=1), errors[:1, :2], silent)
    assert cal.indicators[0, 0, 0] == pytest.approx(-math.log(1e-12), rel=1e-6)
    assert cal.indicators[0, 0, 1:].tolist() == [0.0, 0.0] and not cal.indicators[0, 1].any()


class _Recorded:
    """Profiling of 7 steps whose recorder saw hand-made energies and errors: two blocks of four
    dimensions, the first two of each clearly apart from the last two, which ``linear`` /
    ``ab2`` forecast best."""

    valid_for = {"num_inference_steps": 7}
    target = _NoBlocks.target

    def __init__(self, target_compute: float | None) -> None:
        self.target_compute = target_compute
        self.recorders: list = []

    def record(self, observer) -> dict:
        self.recorders.append(observer)
        energy = torch.ones(2, 4, 4, dtype=torch.float64)
        energy[:, :2, 1:] = 100.0
        errors = torch.ones(2, 4, len(SOLVERS), dtype=torch.float64)
        errors[:, :2, SOLVERS.index("linear")] = 0.1
        errors[:, 2:, SOLVERS.index("ab2")] = 0.1
        return {"errors": errors, "energy": energy}


@pytest.mark.parametrize(
    ("target", "interval", "full"), [(None, 3, 4), (0.45, 5, 3)], ids=["options", "target"]
)
def test_calibrate_records_the_schedule_it_profiled_and_its_clusters(target, interval, full):
    """Warm-up 2 at 7 steps: interval 3 computes steps 0, 1, 2, 5 (4/7); a target of 0.45
    needs interval 5 (steps 0, 1, 2: 3/7; interval 4 adds step 6). The recorder runs that
    schedule, and the provenance records its compute to 6 digits and the clusters' sizes and
    solvers (``test_the_plan_records_the_schedules_compute_and_clusters`` checks the same on a
    real profile, but its module-scoped plan is profiled once, so mutation runs miss it)."""
    profiling = _Recorded(target)
    done = HyCaConfig(warmup_steps=2, interval=3).calibrate(profiling)
    assert done.config == HyCaConfig(warmup_steps=2, interval=interval)
    assert [r.cfg for r in profiling.recorders] == [done.config]
    labels = done.calibration.labels
    first, last = int(labels[0, 0]), int(labels[0, 2])
    assert labels.tolist() == [[first, first, last, last]] * 2 and first != last
    solvers = {first: "linear", last: "ab2"}
    assert done.calibration.cluster_solvers == (solvers[0], solvers[1])
    assert done.measured == {
        "compute_fraction": round(full / 7, 6),
        "cluster_sizes": [4, 4],
        "cluster_solvers": [solvers[0], solvers[1]],
    }


def test_the_history_is_kept_in_one_buffer_and_read_oldest_first(monkeypatch) -> None:
    """Scripted latents ``x_k = k^2``: block 0's residual is ``x_k``. Over a run whose full
    steps overrun the history (``quadratic`` keeps 3) several times, every forecast of block 0
    reads the residuals of the last 3 full steps, oldest first, from one buffer allocated once
    (not a history rebuilt at each full step)."""
    from diffcache import kernels
    from diffcache.testing.toys import ToyPipeline

    seen: list[tuple[list[float], int]] = []
    forecast = kernels.forecast

    def spy(x, history, weights, **kw):
        seen.append((history[:, 0, 0, 0].tolist(), history.untyped_storage().data_ptr()))
        return forecast(x, history, weights, **kw)

    monkeypatch.setattr(kernels, "forecast", spy)
    steps, dims = 12, 2
    xs = [float(k * k) for k in range(steps)]
    pipe = ToyPipeline(cfg="none", script=[torch.full((1, 2, dims), x) for x in xs])
    cfg = HyCaConfig(warmup_steps=3, interval=2, solvers=("quadratic",))
    plan = Plan(
        model="toy",
        method="hyca",
        options=cfg.to_options(),
        calibration={"cluster_solvers": ["quadratic"]},
        tensors={
            "labels": torch.zeros(2, dims, dtype=torch.int64),
            "errors": torch.zeros(2, dims, 1),
            "indicators": torch.zeros(2, dims, 3),
        },
    )
    diffcache.accelerate(pipe, plan)
    pipe(torch.full((1, 2, dims), xs[0]), steps=steps)
    full = [k for k in range(steps) if k < 3 or (k - 3) % 2 == 0]  # 0, 1, 2, 3, 5, 7, 9, 11
    skipped = [k for k in range(steps) if k not in full]
    block0 = seen[::2]  # blocks 0 and 1 at each skipped step
    assert [h for h, _ in block0] == [[xs[s] for s in full if s < k][-3:] for k in skipped]
    assert len({ptr for _, ptr in block0}) == 1
