"""ERTACache: the profiled schedule, the timestep adjustment, the rectifier, and the method on a
real pipeline family with true CFG (Qwen-Image, flow-matching Euler)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import diffcache
from diffcache.display import rounded
from diffcache.errors import PlanError, TargetUnreachable, UnsupportedModelError
from diffcache.generate import Request, generate
from diffcache.methods.ertacache import EULER, ERTACacheConfig
from diffcache.methods.ertacache_calibrate import fit_threshold
from diffcache.methods.ertacache_schedule import (
    ERTACacheCalibration,
    adjusted_sigmas,
    reuse_steps,
    schedule,
)
from diffcache.plan import Plan
from diffcache.testing import golden
from diffcache.testing.toys import clean, tiny_request

STEPS = 8
REQ = Request(height=64, width=64, steps=STEPS, guidance=4.0, negative_prompt="blurry")
PROMPTS = ["a cat", "a red fox"]


def _calibration(t: int = 6, b: int = 1, c: int = 2, seed: int = 0) -> ERTACacheCalibration:
    g = torch.Generator().manual_seed(seed)
    rel = torch.rand(b, t, t, generator=g, dtype=torch.float64)
    n = torch.full((b, t, t, c), 10.0, dtype=torch.float64)
    u = torch.randn(b, t, t, c, generator=g, dtype=torch.float64)
    uu = u**2 + 1
    moments = torch.stack([n, u * n, 0.5 * u * n + 0.1 * n, uu * n, (0.5 * uu + 0.1 * u) * n], -1)
    ones = torch.ones(b, t, dtype=torch.float64)
    return ERTACacheCalibration(rel, rel / 2, ones, 2 * ones, moments, ones)


def test_reuse_steps_follow_the_last_refresh() -> None:
    rel = torch.tensor(
        [[0, 0.1, 0.3, 0.5, 0.9], [0, 0, 0.05, 0.2, 0.9], [0, 0, 0, 0.1, 0.9], [0, 0, 0, 0, 0.1]]
        + [[0, 0, 0, 0, 0]]
    )
    assert reuse_steps(rel, 0.0) == ()
    assert reuse_steps(rel, 0.2) == (1, 3)  # 2 refreshes (rel[0, 2] = 0.3); rel[2, 3] = 0.1
    assert reuse_steps(rel, 0.4) == (1, 2)  # 3 refreshes (rel[0, 3] = 0.5); 4 is the last step
    assert reuse_steps(rel, 1.0) == (1, 2, 3)


def test_unadjusted_schedule_is_unchanged_and_adjusted_steps_cover_the_interval() -> None:
    sigmas = torch.tensor([1.0, 0.9, 0.7, 0.45, 0.2, 0.0])
    assert torch.allclose(adjusted_sigmas(sigmas, (1.0,) * 5), sigmas.double(), atol=1e-15)
    new = adjusted_sigmas(sigmas, (1.0, 0.3, 0.0, 0.8, 1.0))
    steps = new[:-1] - new[1:]
    assert new[0] == 1.0 and new[-1] == 0.0 and (steps >= 0).all()
    assert torch.isclose(steps.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert steps[2] == 0.0 and steps[1] < sigmas[1] - sigmas[2]  # phi 0: no time; 0.3: shorter


def test_rectifier_fits_the_error_and_is_the_identity_for_zero_error() -> None:
    cal = _calibration()
    sched = schedule(cal, ERTACacheConfig(threshold=1.0))
    assert sched.reuse == (1, 2, 3, 4)
    # the synthetic error is e = 0.5 u + 0.1 exactly: scale 1 - 0.5, shift -0.1
    k = sched.reuse[0]
    assert torch.allclose(sched.scale[:, k], torch.full((1, 2), 0.5))
    assert torch.allclose(sched.shift[:, k], torch.full((1, 2), -0.1))
    zero = torch.zeros_like(cal.moments)
    zero[..., 0], zero[..., 1], zero[..., 3] = 10.0, cal.moments[..., 1], cal.moments[..., 3]
    exact = schedule(dataclasses.replace(cal, moments=zero), ERTACacheConfig(threshold=1.0))
    assert torch.equal(exact.scale, torch.ones_like(exact.scale))
    assert torch.equal(exact.shift, torch.zeros_like(exact.shift))
    assert torch.equal(sched.scale[:, 0], torch.ones(1, 2))  # computed steps untouched
    none = schedule(cal, ERTACacheConfig(threshold=1.0, rectify="none"))
    assert torch.equal(none.scale, torch.ones_like(none.scale))


def test_threshold_meets_a_compute_target_exactly() -> None:
    cal = _calibration(t=10)
    for target in (0.9, 0.6, 0.3):
        tau = fit_threshold(cal, target)
        got = schedule(cal, ERTACacheConfig(threshold=tau)).compute_fraction
        assert got <= target
        # every smaller threshold computes more: the schedule only changes at a profiled value
        rel = cal.pair_rel[0]
        below = rel[(rel < tau) & torch.ones_like(rel, dtype=torch.bool).triu(1)]
        if len(below):
            smaller = ERTACacheConfig(threshold=float(below.max()))
            assert schedule(cal, smaller).compute_fraction > target
    with pytest.raises(diffcache.DiffCacheError, match="above the target"):
        fit_threshold(cal, 0.1)


@pytest.fixture(scope="module")
def qwen():
    return diffcache.load_model("qwenimage-tiny")


@pytest.fixture(scope="module")
def profiled(qwen, tmp_path_factory):
    out = tmp_path_factory.mktemp("erta") / "qwen-erta.yaml"
    plan = diffcache.profile(
        qwen, ERTACacheConfig(), PROMPTS, target_compute=0.5, request=REQ, out=out
    )
    return Plan.load(out), plan


def _gen(pipe, prompt: str = "a cat"):
    return generate(pipe, REQ.replace(prompt=prompt))


def test_profiled_plan_is_followed_exactly_per_branch(qwen, profiled) -> None:
    plan, _ = profiled
    reuse = plan.provenance["measured"]["reuse_steps"]
    assert plan.options["threshold"] > 0 and 0 < len(reuse) and STEPS - len(reuse) <= 4
    base = _gen(qwen)
    diffcache.accelerate(qwen, plan)
    try:
        out = _gen(qwen)
        stats = diffcache.stats(qwen)
        adjusted = qwen.scheduler.sigmas.clone()
    finally:
        diffcache.remove(qwen)
    assert stats.computed == 2 * (STEPS - len(reuse)) and stats.skipped == 2 * len(reuse)
    assert stats.kernels["rectified_residual"] in ("torch", "triton")
    assert out.shape == base.shape and torch.isfinite(torch.as_tensor(out)).all()
    assert not (out == base).all()
    assert (_gen(qwen) == base).all(), "remove() restores the plain pipeline and its scheduler"
    phi = plan.provenance["measured"]["phi"]
    cal, want = plan.tensors, []
    for k in reuse:  # phi_k = clip(1 - E_k / D_k): sums over branches and requests / count
        c = max(s for s in range(k) if s not in reuse)
        n = cal["count"][:, k].sum()
        ratio = (cal["pair_err"][:, c, k].sum() / n) / (cal["out_abs"][:, k].sum() / n)
        want.append(min(max(1 - float(ratio), 0.0), 1.0))
    assert phi == pytest.approx(want, abs=1e-4) and any(f < 1 for f in phi)
    assert not torch.equal(adjusted, qwen.scheduler.sigmas), "reused steps were shortened"
    assert adjusted[0] == qwen.scheduler.sigmas[0] and adjusted[-1] == 0


def test_identity_equals_the_baseline(qwen, profiled) -> None:
    plan, _ = profiled
    base = _gen(qwen)
    ident = dataclasses.replace(plan, options={**plan.options, "threshold": 0.0})
    diffcache.accelerate(qwen, ident)
    try:
        assert (_gen(qwen) == base).all() and diffcache.stats(qwen).skipped == 0
    finally:
        diffcache.remove(qwen)


def test_plan_round_trips_byte_identically_and_profiling_is_deterministic(
    qwen, profiled, tmp_path
) -> None:
    plan, _ = profiled
    first = Path(plan.source)
    again = Plan.load(plan.save(tmp_path / "again.yaml"))
    for a, b in (
        (first, Path(again.source)),
        (first.with_suffix(".safetensors"), tmp_path / "again.safetensors"),
    ):
        assert a.read_bytes().replace(a.stem.encode(), b"X") == b.read_bytes().replace(
            b.stem.encode(), b"X"
        )
    other = diffcache.profile(qwen, ERTACacheConfig(), PROMPTS, target_compute=0.5, request=REQ)
    assert other.options == plan.options and other.calibration == plan.calibration
    assert all(torch.equal(other.tensors[k], plan.tensors[k]) for k in plan.tensors)


def test_set_timesteps_gets_the_adjusted_times_however_it_is_called(qwen, profiled) -> None:
    """The scheduler called directly with positional arguments (steps, device, sigmas, mu) gets
    the plan's adjusted flow times and timesteps = times x num_train_timesteps."""
    plan, _ = profiled
    scheduler = qwen.scheduler
    scheduler.set_timesteps(STEPS, "cpu", None, 1.0)
    plain = scheduler.sigmas.clone()
    phi = schedule(ERTACacheCalibration(**plan.tensors), ERTACacheConfig(**plan.options)).phi
    diffcache.accelerate(qwen, plan)
    try:
        scheduler.set_timesteps(STEPS, "cpu", None, 1.0)
        sigmas, timesteps = scheduler.sigmas.clone(), scheduler.timesteps.clone()
    finally:
        diffcache.remove(qwen)
    want = adjusted_sigmas(plain, phi).float()
    assert not torch.equal(want, plain) and torch.equal(sigmas, want)
    train = scheduler.config.num_train_timesteps
    assert torch.allclose(timesteps, want[:-1] * train, rtol=1e-6)


def test_schedulers_the_adjustment_is_not_defined_for_are_refused() -> None:
    pipe = diffcache.load_model("wan2.1-tiny")  # UniPC
    with pytest.raises(UnsupportedModelError, match="time_adjust=false"):
        diffcache.profile(pipe, ERTACacheConfig(), PROMPTS, request=REQ)
    problems = ERTACacheConfig().plan_problems({"scheduler": "UniPCMultistepScheduler"})
    assert problems and "time_adjust: false" in problems[0]
    assert not ERTACacheConfig(time_adjust=False).plan_problems({"scheduler": "DDIMScheduler"})


def test_a_calibration_for_another_step_count_is_refused(qwen, profiled) -> None:
    plan, _ = profiled
    other = dataclasses.replace(plan, valid_for={**plan.valid_for, "num_inference_steps": 12})
    with pytest.raises(PlanError, match="calibration has 8 steps"):
        diffcache.accelerate(qwen, other)
    assert clean(qwen.transformer, qwen.scheduler)
    assert (_gen(qwen) == _gen(qwen)).all()


def test_calls_outside_the_plan_are_refused_and_the_pipeline_stays_accelerated(
    qwen, profiled
) -> None:
    """Another step count (seen by the timestep adjustment) and more CFG branches than the
    calibration (seen at the first step) are PlanErrors before any denoising step; the next
    call inside the plan runs as planned."""
    plan, _ = profiled
    no_cfg = REQ.replace(guidance=1.0)
    one_branch = diffcache.profile(
        qwen, ERTACacheConfig(), PROMPTS, target_compute=0.5, request=no_cfg
    )
    for p, bad, good, message in (
        (
            plan,
            REQ.replace(steps=STEPS + 2),
            REQ,
            "valid for num_inference_steps=8 but this call runs 10 steps",
        ),
        (
            one_branch,
            REQ,
            no_cfg,
            r"calibrated with 1 denoiser call\(s\) per step and this run has more \(.+\); "
            "profile with the guidance you generate with",
        ),
    ):
        diffcache.accelerate(qwen, p)
        try:
            with pytest.raises(PlanError, match=message + r".*still accelerated"):
                generate(qwen, bad.replace(prompt="a cat"))
            assert diffcache.is_accelerated(qwen)
            generate(qwen, good.replace(prompt="a cat"))
            assert diffcache.stats(qwen).skipped > 0
        finally:
            diffcache.remove(qwen)
        assert clean(qwen.transformer, qwen.scheduler)


@pytest.mark.parametrize(
    "model",
    ["wan2.1-tiny", "hunyuanvideo-tiny", "flux-tiny", "dit-tiny", "cogvideox-tiny"],
)
def test_every_family_profiles_and_follows_its_schedule(model: str) -> None:
    """Every DiT adapter: profile to compute 0.5 at 6 steps (the timestep adjustment where the
    scheduler is flow-matching Euler), then the run computes exactly the planned steps."""
    pipe = diffcache.load_model(model)
    euler = type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    req, prompts, one = tiny_request(model, 6)
    plan = diffcache.profile(
        pipe, ERTACacheConfig(time_adjust=euler), prompts, target_compute=0.5, request=req
    )
    reuse = plan.provenance["measured"]["reuse_steps"]
    assert 6 - len(reuse) <= 3
    diffcache.accelerate(pipe, plan)
    try:
        out = generate(pipe, one)
        stats = diffcache.stats(pipe)
    finally:
        diffcache.remove(pipe)
    branches = stats.computed // (6 - len(reuse))
    assert stats.computed == branches * (6 - len(reuse)) and stats.skipped == branches * len(reuse)
    assert torch.isfinite(torch.as_tensor(out)).all()


@pytest.mark.parametrize("phi", ["output", "step_change"])
def test_phi_is_one_minus_the_reuse_error_over_that_steps_denominator(phi: str) -> None:
    """5 steps, two calibration requests (sums over both, count 2): threshold 0.5 reuses steps
    1 and 2 from step 0 (rel 0.1, 0.2) and computes step 3 (rel 0.9). ``phi_k = 1 - E_k / D_k``
    with ``E_k = pair_err[0, k] / 2`` and ``D_k`` the reused step's own mean|v_k| (``output``) or
    mean|v_k - v_(k-1)| (``step_change``), each summed over the requests / 2."""
    t = 5
    rel = torch.full((1, t, t), 0.9, dtype=torch.float64)
    rel[0, 0, 1], rel[0, 0, 2] = 0.1, 0.2
    err = torch.zeros(1, t, t, dtype=torch.float64)
    err[0, 0, 1], err[0, 0, 2] = 1.0, 3.0  # E_1 = 0.5, E_2 = 1.5
    out_abs = torch.tensor([[16.0, 4.0, 8.0, 32.0, 64.0]], dtype=torch.float64)
    step_change = torch.tensor([[0.0, 2.0, 5.0, 10.0, 12.0]], dtype=torch.float64)
    cal = ERTACacheCalibration(
        2 * rel, err, step_change, out_abs, torch.ones(1, t, t, 1, 5), torch.full((1, t), 2.0)
    )
    got = schedule(cal, ERTACacheConfig(threshold=0.5, phi=phi, rectify="none"))
    assert got.reuse == (1, 2) and got.source == (0, 0, 0, 3, 4)
    # output: D_1 = 4 / 2, D_2 = 8 / 2; step_change: D_1 = 2 / 2, D_2 = 5 / 2
    want = {"output": [1 - 0.5 / 2, 1 - 1.5 / 4], "step_change": [1 - 0.5 / 1, 1 - 1.5 / 2.5]}[phi]
    assert got.phi == pytest.approx((1.0, *want, 1.0, 1.0), abs=1e-12)


def _plain_schedule(tensors: dict, threshold: float, phi_of: str) -> list[tuple]:
    """ERTACache's offline policy and time factor (arXiv 2508.21091, as our docstring reads it)
    written out over the calibration sums: per step (reused?, source step, phi)."""
    count = tensors["count"].sum(0).tolist()
    rel = (tensors["pair_rel"].sum(0) / tensors["count"].sum(0)).tolist()
    err = tensors["pair_err"].sum(0).tolist()
    den = tensors["out_abs" if phi_of == "output" else "step_change"].sum(0).tolist()
    steps = len(count)
    out, c = [], 0
    for k in range(steps):
        if 0 < k < steps - 1 and rel[c][k] < threshold:
            e, d = err[c][k] / count[k], den[k] / count[k]
            out.append((True, c, min(max(1 - e / d, 0.0), 1.0) if d > 0 else float(e == 0)))
        else:
            c = k
            out.append((False, k, 1.0))
    return out


ERTA_GOLDEN = [p for p in golden.golden_plans() if p.endswith("-ertacache.yaml")]


@pytest.mark.parametrize("name", ERTA_GOLDEN)
def test_golden_trace_reuses_the_plain_schedule_with_its_phi(name: str) -> None:
    """The golden trace of each bundled ERTACache plan (pinned to the runtime by
    tests/test_golden.py) takes the reuse set, sources and phi a plain reading of the
    calibration gives, step by step (phi to the trace's 6 digits)."""
    plan = Plan.load(name)
    want = _plain_schedule(plan.tensors, plan.options["threshold"], plan.options["phi"])
    trace = json.loads(golden.trace_file(name).read_text())
    assert {e["branch"] for e in trace} <= set(range(plan.tensors["count"].shape[0]))
    for e in trace:
        reuse, source, phi = want[e["step"]]
        v = e["values"]
        got = (v["planned_reuse"], v["source"], v["phi"], e["action"])
        assert got == (reuse, source, rounded(phi, 6), "reused" if reuse else "computed"), e


def test_some_golden_erta_plan_has_a_phi_strictly_between_0_and_1() -> None:
    """So that the test above pins phi's formula, not only its clipping."""
    phis = []
    for name in ERTA_GOLDEN:
        plan = Plan.load(name)
        want = _plain_schedule(plan.tensors, plan.options["threshold"], plan.options["phi"])
        phis += [phi for reuse, _, phi in want if reuse]
    assert any(0 < p < 1 for p in phis), phis


def _recorder_target():
    from types import SimpleNamespace

    adapter = SimpleNamespace(channel_dim=1, latent_arg="latents")
    return SimpleNamespace(adapter=adapter, arg_index=lambda name: 0)


def _plain_sums(requests: list[list[tuple[list, list]]]) -> dict:
    """The calibration sums of the ERTACacheCalibration docstring, written out over plain lists:
    ``requests[i][k] = (x_k, v_k)`` with ``x[ch][j]`` per latent channel (one branch)."""

    def mean_abs(rows: list[list[float]]) -> float:
        flat = [abs(a) for row in rows for a in row]
        return sum(flat) / len(flat)

    def sub(a: list, b: list) -> list:
        return [[p - q for p, q in zip(ra, rb, strict=True)] for ra, rb in zip(a, b, strict=True)]

    t, ch = len(requests[0]), len(requests[0][0][0])
    rel = [[0.0] * t for _ in range(t)]
    err = [[0.0] * t for _ in range(t)]
    moments = [[[[0.0] * 5 for _ in range(ch)] for _ in range(t)] for _ in range(t)]
    step_change, out_abs, count = [0.0] * t, [0.0] * t, [0.0] * t
    for steps in requests:
        r = [sub(v, x) for x, v in steps]
        for k, (x, v) in enumerate(steps):
            for c in range(k):
                e = sub(r[c], r[k])
                rel[c][k] += mean_abs(e) / mean_abs(r[k])
                err[c][k] += mean_abs(e)
                for i in range(ch):
                    u = [a + b for a, b in zip(x[i], r[c][i], strict=True)]
                    ei = e[i]
                    m = [len(u), sum(u), sum(ei), sum(a * a for a in u)]
                    m.append(sum(a * b for a, b in zip(u, ei, strict=True)))
                    moments[c][k][i] = [p + q for p, q in zip(moments[c][k][i], m, strict=True)]
            if k:
                step_change[k] += mean_abs(sub(v, steps[k - 1][1]))
            out_abs[k] += mean_abs(v)
            count[k] += 1
    return {
        "pair_rel": [rel],
        "pair_err": [err],
        "step_change": [step_change],
        "out_abs": [out_abs],
        "moments": [moments],
        "count": [count],
    }


def test_the_recorder_sums_each_pair_of_steps_as_its_docstring_says() -> None:
    """Two requests of 3 steps, latents of 2 channels x 3 values and an output with a third
    (extra) channel that is not a latent one: the recorded sums equal the docstring's
    definitions written out over plain lists."""
    from types import SimpleNamespace

    from diffcache.methods.ertacache_calibrate import _Recorder

    g = torch.Generator().manual_seed(3)
    rec = _Recorder(_recorder_target())
    requests = []
    for _ in range(2):
        steps = []
        for k in range(3):
            x = torch.randn(1, 2, 3, generator=g)
            v = torch.randn(1, 3, 3, generator=g)
            rec.see(SimpleNamespace(step=k, branch=0, arg=lambda name, pos, x=x: x), v)
            steps.append((x[0].tolist(), v[0, :2].tolist()))
        rec.end_request()
        requests.append(steps)
    got = rec.result()
    want = _plain_sums(requests)
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].dtype == torch.float64, name
        assert torch.allclose(got[name], torch.tensor(value, dtype=torch.float64), atol=1e-5), name


def test_the_recorder_refuses_a_step_out_of_order_and_records_nothing_without_calls() -> None:
    from types import SimpleNamespace

    from diffcache.methods.ertacache_calibrate import _Recorder

    rec = _Recorder(_recorder_target())
    assert rec.result() == {}
    x = torch.ones(1, 2, 3)
    with pytest.raises(diffcache.DiffCacheError) as err:
        rec.see(SimpleNamespace(step=1, branch=0, arg=lambda name, pos: x), 2 * x)
    assert str(err.value) == (
        "ertacache profiling: step 1 of branch 0 came after 0 steps; ERTACache needs one "
        "denoiser call per step and branch"
    )


def test_calibrations_that_do_not_fit_together_are_refused_with_what_is_wrong() -> None:
    cal = _calibration(t=4, b=1, c=2)
    bad_moments = dataclasses.replace(cal, moments=cal.moments[:, :, :3])
    square = dataclasses.replace(cal, pair_rel=cal.pair_rel[:, :, :3])
    one_step = _calibration(t=1)
    no_channel = dataclasses.replace(cal, moments=cal.moments[..., 0])
    remedy = "; re-run diffcache profile"
    for given, message in (
        (bad_moments, "(pair_rel (1, 4, 4); moments (1, 4, 3, 2, 5) (want (1, 4, 4, 2, 5)))"),
        (square, "(pair_rel (1, 4, 3)"),  # not square
        (one_step, "(pair_rel (1, 1, 1); no steps)"),
        (no_channel, "(pair_rel (1, 4, 4); moments (1, 4, 4, 2) (want (1, 4, 4, -1, 5)))"),
    ):
        with pytest.raises(PlanError) as err:
            schedule(given, ERTACacheConfig())
        text = str(err.value)
        assert text.startswith("ertacache calibration: tensors do not fit together " + message)
        assert text.endswith(remedy), text
    unseen = cal.count.clone()
    unseen[0, 2] = 0.0
    with pytest.raises(PlanError, match=r"^ertacache calibration: a \(branch, step\) was never"):
        fit_threshold(dataclasses.replace(cal, count=unseen), 0.5)
    assert schedule(_calibration(t=2), ERTACacheConfig()).reuse == ()  # 2 steps: both compute


def test_the_fitted_threshold_is_the_shortest_rounding_up_that_keeps_the_schedule() -> None:
    """5 steps with rel 0.1, 0.2, 0.205 from step 0: computing 3/5 needs steps 1 and 2 reused
    and step 3 computed, so a threshold in (0.2, 0.205]: 0.21 (two digits, rounded up) would
    reuse step 3 too, 0.201 (three) is the first that keeps the schedule. Below 2/5 no
    schedule reaches: the error names that least fraction."""
    t = 5
    rel = torch.full((1, t, t), 0.9, dtype=torch.float64)
    rel[0, 0, 1], rel[0, 0, 2], rel[0, 0, 3] = 0.1, 0.2, 0.205
    cal = dataclasses.replace(_calibration(t=t), pair_rel=rel)
    assert fit_threshold(cal, 0.6) == 0.201
    assert schedule(cal, ERTACacheConfig(threshold=0.201)).reuse == (1, 2)
    assert fit_threshold(cal, 0.4) == 0.21
    with pytest.raises(TargetUnreachable) as err:
        fit_threshold(cal, 0.3)
    assert str(err.value) == (
        "ertacache: even reusing every step it can, the schedule computes 0.400 of the 5 steps "
        "(the first and last always compute), above the target 0.300"
    )
    assert err.value.least == 2 / 5


def test_adjusted_sigmas_by_hand() -> None:
    """s = (1, 0.5, 0.25, 0), phi = (1, 0.5, 1): s'_1 = 1 (1 - 0.5) = 0.5, s'_2 = 0.5 (1 - 0.5
    * 0.5) = 0.375, s'_3 = 0. A step from flow time 0 takes its whole (empty) remainder: with
    s = (1, 0, 0) and phi = (0.5, 0.5), s'_1 = 0.5 and s'_2 = 0.5 (1 - 0.5) = 0.25."""
    got = adjusted_sigmas(torch.tensor([1.0, 0.5, 0.25, 0.0]), (1.0, 0.5, 1.0))
    assert got.dtype == torch.float64 and got.tolist() == [1.0, 0.5, 0.375, 0.0]
    assert adjusted_sigmas(torch.tensor([1.0, 0.0, 0.0]), (0.5, 0.5)).tolist() == [1.0, 0.5, 0.25]


def test_a_step_from_flow_time_0_is_shortened_in_float64() -> None:
    """s = (1, 0, 0), phi = (0.5, 0.3): the step from time 0 takes its whole remainder (share 1),
    so s'_2 = 0.5 (1 - 0.3) in float64 (Python's floats); in float32, 0.3 is 0.30000001... and
    s'_2 would be 0.34999999..."""
    got = adjusted_sigmas(torch.tensor([1.0, 0.0, 0.0]), (0.5, 0.3))
    assert got.tolist() == [1.0, 0.5, 0.5 * (1 - 0.3)]


@pytest.mark.parametrize(
    "config, euler",
    [
        (None, True),
        ({}, True),
        ({"stochastic_sampling": True}, False),
        ({"invert_sigmas": True}, False),
        ({"stochastic_sampling": False, "invert_sigmas": False}, True),
    ],
)
def test_time_adjust_needs_the_deterministic_flow_matching_euler_update(config, euler) -> None:
    """A scheduler of that class name without a config, or with neither option set, has the
    update the adjustment is defined for; stochastic sampling or inverted sigmas do not."""
    from types import SimpleNamespace

    scheduler = type(EULER, (), {} if config is None else {"config": config})()
    target = SimpleNamespace(driver="scheduler", scheduler=scheduler)
    reasons = ERTACacheConfig().own_reasons(target)
    assert reasons == (
        []
        if euler
        else [
            f"time_adjust is defined for the flow-matching Euler update ({EULER}, deterministic); "
            f"this pipeline uses {EULER}: set option time_adjust=false (reuse and rectification "
            "still apply) or use that scheduler"
        ]
    )
    assert not ERTACacheConfig(time_adjust=False).own_reasons(target)


def test_calibrate_without_a_target_keeps_the_threshold_and_records_the_schedule() -> None:
    """7 steps, only step 1 reused (rel 0.1 from step 0) with E_1 = 1, D_1 = 3: compute 6/7 and
    phi_1 = 2/3, recorded to 6 and 4 digits."""
    from types import SimpleNamespace

    t = 7
    rel = torch.full((1, t, t), 0.9, dtype=torch.float64)
    rel[0, 0, 1] = 0.1
    err = torch.zeros(1, t, t, dtype=torch.float64)
    err[0, 0, 1] = 1.0
    cal = dataclasses.replace(_calibration(t=t), pair_rel=rel, pair_err=err)
    cal = dataclasses.replace(cal, out_abs=torch.full((1, t), 3.0, dtype=torch.float64))
    config = ERTACacheConfig(threshold=0.5)
    profiling = SimpleNamespace(trace=SimpleNamespace(observed=vars(cal)), target_compute=None)
    got = config.calibrate(profiling)
    assert got.config == config
    assert got.measured == {"compute_fraction": 0.857143, "reuse_steps": [1], "phi": [0.6667]}


def test_identity_reuses_nothing_and_aggressive_every_step_but_the_first_and_last() -> None:
    """identity() computes every step even where the default threshold 0.08 reuses (every pair
    0.05 apart); aggressive() reuses every step but the first and the last even where every
    pair is 0.9 apart (the default reuses none there)."""
    cal = _calibration(t=6)
    close = dataclasses.replace(cal, pair_rel=torch.full_like(cal.pair_rel, 0.05))
    far = dataclasses.replace(cal, pair_rel=torch.full_like(cal.pair_rel, 0.9))
    assert schedule(close, ERTACacheConfig()).reuse != ()
    assert schedule(close, ERTACacheConfig.identity()).reuse == ()
    assert schedule(far, ERTACacheConfig()).reuse == ()
    assert schedule(far, ERTACacheConfig.aggressive()).reuse == (1, 2, 3, 4)


def test_a_plan_without_calibration_names_the_profile_command() -> None:
    """The command to make one uses 20 calibration prompts (the paper's 1000 samples)."""
    from diffcache.testing.toys import ToyPipeline

    plan = {"diffcache": 1, "model": "toy", "method": "ertacache", "options": {}}
    with pytest.raises(PlanError) as e:
        diffcache.accelerate(ToyPipeline(), plan)
    assert str(e.value).endswith(
        "make it with: diffcache profile --model MODEL --method ertacache --num-prompts 20 "
        "--out plan.yaml"
    )


def test_a_reused_output_has_the_dtype_of_a_computed_one() -> None:
    """A half-precision latent and a float32 output (the toy denoiser's scale is a float32
    vector; the scheduler keeps the latent's dtype): reused steps return float32 too."""
    from diffcache.testing.toys import ToyPipeline, ToyScheduler, plan_for

    class KeepDtype(ToyScheduler):
        def step(self, model_output, timestep, sample, return_dict=True):
            return (super().step(model_output, timestep, sample)[0].to(sample.dtype),)

    pipe = ToyPipeline(cfg="none")
    pipe.scheduler = KeepDtype()
    pipe.transformer.scale = torch.nn.Parameter(torch.tensor([2.0]))
    plan = plan_for(pipe, ERTACacheConfig(threshold=1e6, time_adjust=False), num_inference_steps=6)
    diffcache.accelerate(pipe, plan)
    try:
        assert pipe(latents=torch.ones(1, 3, 4, dtype=torch.float16), steps=6).dtype == torch.half
        assert diffcache.stats(pipe).per_step() == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    finally:
        diffcache.remove(pipe)
    assert [v.dtype for v in pipe.scheduler.outputs] == [torch.float32] * 6


def test_the_recorder_sums_in_float64_and_keeps_channels_apart_across_the_batch() -> None:
    """A residual 2^24, 1, -2^24 (exact in float32) reused one step later, unchanged: its sum
    is 1 and its sum of squares 2^49 + 1, which float32 sums round to 0 and 2^49. A batch of 2
    keeps one row per channel: each row holds that channel's values of both samples."""
    from types import SimpleNamespace

    from diffcache.methods.ertacache_calibrate import _channels_first, _Recorder

    rec = _Recorder(_recorder_target())
    zero = torch.zeros(1, 1, 3)
    for k, v in enumerate([torch.tensor([[[2.0**24, 1.0, -(2.0**24)]]]), zero]):
        rec.see(SimpleNamespace(step=k, branch=0, arg=lambda name, pos: zero), v)
    moments = rec.result()["moments"][0, 0, 1, 0].tolist()  # u = e = the step-0 residual
    assert moments == [3.0, 1.0, 1.0, 2.0**49 + 1, 2.0**49 + 1]
    batch = torch.arange(12.0).reshape(2, 3, 2)  # (batch, channel, value)
    want = [[0.0, 1.0, 6.0, 7.0], [2.0, 3.0, 8.0, 9.0], [4.0, 5.0, 10.0, 11.0]]
    assert _channels_first(batch, 1).tolist() == want


def test_the_fitted_threshold_keeps_six_digits_or_else_its_exact_value() -> None:
    """rel 0.1, 0.2 and 0.200002 from step 0 (5 steps): computing 3/5 needs a threshold in
    (0.2, 0.200002], first met at six digits (0.200001); with 0.2000001 in place of 0.200002 no
    six-digit value fits and the fit keeps a threshold just above 0.2."""
    t = 5
    for third, want in ((0.200002, 0.200001), (0.2000001, None)):
        rel = torch.full((1, t, t), 0.9, dtype=torch.float64)
        rel[0, 0, 1], rel[0, 0, 2], rel[0, 0, 3] = 0.1, 0.2, third
        cal = dataclasses.replace(_calibration(t=t), pair_rel=rel)
        got = fit_threshold(cal, 0.6)
        assert got == want if want is not None else 0.2 < got < third
        assert schedule(cal, ERTACacheConfig(threshold=got)).reuse == (1, 2)


def test_what_ertacache_cannot_run_on_is_named() -> None:
    from types import SimpleNamespace

    class Heun:
        order = 2

    cfg = ERTACacheConfig(time_adjust=False)
    assert cfg.own_reasons(SimpleNamespace(driver="scheduler", scheduler=None)) == [
        "ERTACache's step schedule needs a pipeline with a scheduler"
    ]
    assert cfg.own_reasons(SimpleNamespace(driver="scheduler", scheduler=Heun())) == [
        "Heun is a second-order scheduler; ERTACache reuses whole steps of first-order samplers"
    ]


def test_schedule_by_hand_per_channel_per_step_and_at_a_zero_denominator() -> None:
    """3 steps, step 1 reused from step 0, 2 branches x 2 channels, each channel's residual
    u = (0, 4) against errors e: the rectifier is 1 - a and -(mean e - a mean u) with
    a = cov(u, e) / var(u) (var 4), per channel or pooled over the channels of a branch
    (``rectify: step``). Step 1 has no error and a zero denominator: phi 1."""
    b, t, c = 2, 3, 2
    errors = [[[0.0, 2.0], [1.0, 1.0]], [[0.0, 4.0], [2.0, 2.0]]]  # [branch][channel] e
    moments = torch.zeros(b, t, t, c, 5, dtype=torch.float64)
    for i in range(b):
        for ch in range(c):
            u, e = [0.0, 4.0], errors[i][ch]
            uu, ue = sum(x * x for x in u), sum(x * y for x, y in zip(u, e, strict=True))
            sums = [2.0, sum(u), sum(e), uu, ue]
            moments[i, 0, 1, ch] = torch.tensor(sums, dtype=torch.float64)
    zeros = torch.zeros(b, t, t, dtype=torch.float64)
    ones = torch.ones(b, t, dtype=torch.float64)
    out_abs = ones.clone()
    out_abs[:, 1] = 0.0
    cal = ERTACacheCalibration(zeros, zeros, ones, out_abs, moments, ones)
    per_channel = schedule(cal, ERTACacheConfig())
    assert per_channel.reuse == (1,) and per_channel.phi == (1.0, 1.0, 1.0)
    assert per_channel.scale[:, 1].tolist() == [[0.5, 1.0], [0.0, 1.0]]  # a = 0.5, 0; 1, 0
    assert per_channel.shift[:, 1].tolist() == [[0.0, -1.0], [0.0, -2.0]]
    pooled = schedule(cal, ERTACacheConfig(rectify="step"))  # a = 1/4 and 2/4 (var 4)
    assert pooled.scale[:, 1].tolist() == [[0.75, 0.75], [0.5, 0.5]]
    assert pooled.shift[:, 1].tolist() == [[-0.5, -0.5], [-1.0, -1.0]]
    short = dataclasses.replace(cal, step_change=ones[:, :2], out_abs=ones[:1])
    with pytest.raises(PlanError) as e:
        schedule(short, ERTACacheConfig())
    assert str(e.value) == (
        "ertacache calibration: tensors do not fit together (pair_rel (2, 3, 3); step_change "
        "(2, 2) (want (2, 3)); out_abs (1, 3) (want (2, 3))); re-run diffcache profile"
    )


def test_each_reused_call_is_rectified_with_its_own_branch_and_step_row(monkeypatch) -> None:
    """Two CFG branches, a plan reusing most steps: every reused call gets the plan's scale and
    shift of its own (branch, step), read from ``schedule`` of the plan's calibration here, in a
    first run and again in a second (served from the rows the first one made)."""
    from diffcache import kernels
    from diffcache.api import session_of
    from diffcache.testing.toys import ToyPipeline, plan_for

    seen: list[tuple[int, int, list[float], list[float]]] = []
    rectified = kernels.rectified_residual
    pipe = ToyPipeline(cfg="separate")
    plan = plan_for(pipe, ERTACacheConfig(threshold=1e6, time_adjust=False), num_inference_steps=6)
    sched = schedule(plan.calibration_data, plan.config)
    assert not torch.equal(sched.scale[0], sched.scale[1])  # the branches' rows differ

    def spy(x, r, scale, shift, *args, **kw):
        seen.append((session_run.step, session_run.branch, scale.tolist(), shift.tolist()))
        return rectified(x, r, scale, shift, *args, **kw)

    monkeypatch.setattr(kernels, "rectified_residual", spy)
    diffcache.accelerate(pipe, plan)
    try:
        session_run = session_of(pipe).run
        for _ in range(2):
            pipe(latents=torch.ones(1, 3, 4), steps=6, guidance_scale=4.0)
    finally:
        diffcache.remove(pipe)
    want = [
        (k, b, sched.scale[b, k].tolist(), sched.shift[b, k].tolist())
        for k in sched.reuse
        for b in (0, 1)
    ]
    assert sched.reuse == (1, 2, 3, 4) and seen == want * 2
