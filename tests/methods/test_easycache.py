"""EasyCache on toys with exact arithmetic: the steps it computes and skips follow the rule in
research/dit.md §1.1.2 for a hand-computed input sequence."""

from __future__ import annotations

import pytest
import torch

import diffcache
from diffcache.errors import RunError
from diffcache.profile import Profiling
from diffcache.testing.toys import ToyPipeline, clean

# Scripted latents a_i (every element equal). The denoiser returns v = 2x + e.
# cond branch (e = +1), threshold 0.3, warm-up 2, 6 steps:
#   step 0, 1: warm-up -> computed.            k = |v1 - v0| / |x1 - x0| = 2 ; mean|v1| = 17
#   step 2: dx = |7 - 8| = 1 -> E = 2 * 1/17 = 0.1176 < 0.3  -> reuse: 7 + (17 - 8) = 16
#   step 3: dx = 1 -> E = 0.2353 < 0.3                       -> reuse: 6 + 9 = 15
#   step 4: dx = 1 -> E = 0.3529 >= 0.3 -> compute (E = 0): v = 11
#   step 5: last step -> compute: v = 2*3 + 1 = 7
SCRIPT = [16.0, 8.0, 7.0, 6.0, 5.0, 3.0]
EXPECT_COMPUTED = [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
EXPECT_COND = [33.0, 17.0, 16.0, 15.0, 11.0, 7.0]
EXPECT_UNCOND = [31.0, 15.0, 14.0, 13.0, 9.0, 5.0]  # its own residual: 7 + (15 - 8) = 14, ...
PLAN = {
    "diffcache": 1,
    "model": "toy",
    "method": "easycache",
    "options": {"threshold": 0.3, "warmup_steps": 2},
}


def _pipe(cfg: str) -> ToyPipeline:
    return ToyPipeline(cfg=cfg, script=[torch.full((1, 2, 3), a) for a in SCRIPT])


def _guided(cond: float, unc: float, g: float = 2.0) -> float:
    return unc + g * (cond - unc)


@pytest.mark.parametrize("cfg", ["separate", "none"])
def test_skips_follow_the_rule(cfg: str) -> None:
    pipe = diffcache.accelerate(_pipe(cfg), PLAN)
    pipe(torch.full((1, 2, 3), SCRIPT[0]), steps=6)
    s = diffcache.stats(pipe)
    assert s.per_step() == EXPECT_COMPUTED
    outs = [float(o.flatten()[0]) for o in pipe.scheduler.outputs]
    if cfg == "separate":
        expect = [_guided(c, u) for c, u in zip(EXPECT_COND, EXPECT_UNCOND, strict=True)]
        assert [b for _, b, _ in s.calls] == [0, 1] * 6
    else:
        expect = EXPECT_COND
    assert outs == expect, f"cfg={cfg}: outputs per step {outs} != {expect}"
    assert pipe.transformer.calls == sum(EXPECT_COMPUTED) * (2 if cfg == "separate" else 1)
    assert s.compute_fraction == pytest.approx(4 / 6)


def test_threshold_just_above_accumulated_error_skips_one_more_step() -> None:
    plan = {**PLAN, "options": {"threshold": 0.36, "warmup_steps": 2}}
    pipe = diffcache.accelerate(_pipe("none"), plan)
    pipe(torch.full((1, 2, 3), SCRIPT[0]), steps=6)
    # E after step 4 = 3 * 2/17 = 0.3529 < 0.36 -> step 4 reuses too; step 5 is last -> computed
    assert diffcache.stats(pipe).per_step() == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]


def test_warmup_covers_everything() -> None:
    plan = {**PLAN, "options": {"threshold": 100.0, "warmup_steps": 6}}
    pipe = diffcache.accelerate(_pipe("none"), plan)
    pipe(torch.full((1, 2, 3), SCRIPT[0]), steps=6)
    assert diffcache.stats(pipe).per_step() == [1.0] * 6


def test_nan_entering_the_cache_raises_and_cleans() -> None:
    pipe = ToyPipeline(cfg="none", nan_at_call=1)
    diffcache.accelerate(pipe, PLAN)
    with pytest.raises(RunError, match=r"NaN.*step 1, branch 0, method 'easycache'"):
        pipe(torch.ones(1, 4), steps=6)
    assert clean(pipe.transformer, pipe.scheduler) and not diffcache.is_accelerated(pipe)


def test_shape_change_within_a_run_raises() -> None:
    script = [torch.full((1, 2, 3), a) for a in SCRIPT[:3]] + [torch.full((1, 2, 4), 6.0)] * 3
    pipe = diffcache.accelerate(ToyPipeline(cfg="none", script=script), PLAN)
    with pytest.raises(RunError) as err:
        pipe(torch.full((1, 2, 3), SCRIPT[0]), steps=6)
    assert str(err.value) == (
        "easycache: ToyDenoiser input shape changed from (1, 2, 3) to (1, 2, 4) within a run "
        "(step 3, branch 0, method 'easycache'); generate at one size per call."
    )
    assert not diffcache.is_accelerated(pipe)


def test_learned_variance_channels_are_cached_raw() -> None:
    """Output with more channels than the input (DiT's learned sigma): extra channels reuse the
    last computed raw values, the latent channels reuse the residual."""
    from diffcache.adapter import Adapter
    from diffcache.registry import adapters, register_adapter

    class Sigma(torch.nn.Module):
        def forward(self, hidden_states, timestep):
            return (torch.cat([2 * hidden_states, hidden_states + 100], dim=1),)

    if "sigma" not in adapters():
        register_adapter(Adapter(name="sigma", pipelines=(), denoisers=("Sigma",), media="image"))
    model = diffcache.accelerate(
        Sigma(),
        {
            **PLAN,
            "model": "sigma",
            "options": {"threshold": 1e6, "warmup_steps": 2},
            "valid_for": {"num_inference_steps": 4},
        },
    )
    outs = [
        model(torch.full((1, 1, 2), a), torch.tensor(10.0 - i))[0][0, :, 0].tolist()
        for i, a in enumerate([4.0, 2.0, 1.0, 0.5])
    ]
    # step 2 reused: latent 1 + (4 - 2) = 3, variance channel = last computed 2 + 100
    assert outs[2] == [3.0, 102.0]
    assert diffcache.stats(model).per_step() == [1.0, 1.0, 0.0, 1.0]


def _rule(script: list[float], threshold: float, warmup: int) -> tuple[list[bool], list[float]]:
    """The rule of research/dit.md §1.1.2 on scalar latents of ``v = 2x + 1``, written out:
    (computed per step, output per step)."""
    computed, outs = [], []
    k = prev_x = v_c = x_c = None
    acc = 0.0
    for i, x in enumerate(script):
        if i < warmup or i == len(script) - 1:
            compute, acc = True, 0.0
        elif k is None:
            compute = True
        else:
            acc += k * abs(x - prev_x) / abs(v_c)
            compute = not acc < threshold
            if compute:
                acc = 0.0
        if compute:
            v = 2 * x + 1
            if v_c is not None:
                k = abs(v - v_c) / abs(x - x_c)
            v_c, x_c = v, x
        else:
            v = x + (v_c - x_c)
        prev_x = x
        computed.append(compute)
        outs.append(v)
    return computed, outs


def _run(script: list[float], threshold: float, warmup: int) -> tuple[list[bool], list[float]]:
    plan = {**PLAN, "options": {"threshold": threshold, "warmup_steps": warmup}}
    pipe = ToyPipeline(cfg="none", script=[torch.full((1, 2, 3), a) for a in script])
    diffcache.accelerate(pipe, plan)
    pipe(torch.full((1, 2, 3), script[0]), steps=len(script))
    computed = [f == 1.0 for f in diffcache.stats(pipe).per_step()]
    return computed, [float(o.flatten()[0]) for o in pipe.scheduler.outputs]


def test_the_accumulator_restarts_after_a_computed_step() -> None:
    # steps 2, 3 reuse (E = 2/17, 4/17); step 4 computes (E = 6/17 >= 0.3) and resets E; then
    # k = |11 - 17| / |5 - 8| = 2 and mean|v_4| = 11: step 5 has E = 2/11 < 0.3 and reuses
    # (E kept at 6/17 would compute it); step 6 has E = 4/11 and computes; 7 is the last
    script = [16.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0]
    want = _rule(script, 0.3, 2)
    assert want[0] == [True, True, False, False, True, False, True, True]
    assert _run(script, 0.3, 2) == want


def test_an_accumulated_change_equal_to_the_threshold_computes() -> None:
    # mean|v_1| = 2 * 7.5 + 1 = 16, k = 2: step 2 has E = 2 * 1 / 16 = 0.125 exactly, and
    # E < threshold fails at equality, so it computes; a hair above, it reuses
    script = [15.5, 7.5, 6.5, 5.5]
    at = _rule(script, 0.125, 2)
    assert at[0] == [True, True, True, True]
    assert _run(script, 0.125, 2) == at
    above = _rule(script, 0.1251, 2)
    assert above[0] == [True, True, False, True]
    assert _run(script, 0.1251, 2) == above


def _plain_easycache(xs: list[float], threshold: float, warmup: int) -> list[tuple]:
    """EasyCache's rule (arXiv 2507.02860, H-EmbodVis/EasyCache) written out on scalar latents
    (every element equal) for the toy ``v = 2x + 1``: per step the action and, where the rule
    compared, the accumulated change ``acc`` (before its reset) and ``k``."""
    out, acc, k = [], 0.0, None
    prev_x = last_x = last_v = None
    for i, x in enumerate(xs):
        compared = None
        if i < warmup or i == len(xs) - 1:
            compute, acc = True, 0.0
        elif k is None:
            compute = True
        else:
            acc += k * (abs(x - prev_x) / abs(last_v))
            compared = (acc, k)
            compute = not acc < threshold
            if compute:
                acc = 0.0
        if compute:
            v = 2 * x + 1
            if last_v is not None:
                k = abs(v - last_v) / abs(x - last_x)
            last_x, last_v = x, v
        prev_x = x
        out.append(("computed" if compute else "reused", compared))
    return out


@pytest.mark.parametrize("threshold", [0.125, 0.13, 0.2])
def test_trace_follows_a_plain_easycache_at_the_threshold_and_after_a_reset(threshold) -> None:
    """Latents 10, 7.5, 6.5, 6, 5.5, 5 (warm-up 2): k = 2 and mean|v_1| = 16, so step 2's
    accumulated change is exactly 2 * 1/16 = 0.125. At threshold 0.125 it is not below: step 2
    computes and resets the accumulator, step 3 (2 * 0.5/14 = 0.0714) reuses, step 4 (0.1429)
    computes. Above 0.125 step 2 reuses and the sum goes on (0.1875 at step 3)."""
    xs = [10.0, 7.5, 6.5, 6.0, 5.5, 5.0]
    plan = {**PLAN, "options": {"threshold": threshold, "warmup_steps": 2}}
    pipe = diffcache.accelerate(_pipe_of(xs), plan, trace=True)
    pipe(torch.full((1, 2, 3), xs[0]), steps=len(xs))
    trace = diffcache.stats(pipe).trace
    want = _plain_easycache(xs, threshold, 2)
    got = [
        (e["action"], (e["values"]["acc"], e["values"]["k"]) if "acc" in e["values"] else None)
        for e in trace
    ]
    assert got == want
    assert all(e["values"]["threshold"] == threshold for e in trace if "acc" in e["values"])
    expect = {0.125: "CCCRCC", 0.13: "CCRCRC", 0.2: "CCRRCC"}[threshold]
    assert "".join(a[0].upper() for a, _ in want) == expect


def _pipe_of(xs: list[float]) -> ToyPipeline:
    return ToyPipeline(cfg="none", script=[torch.full((1, 2, 3), a) for a in xs])


def _bare(module: torch.nn.Module, options: dict, steps: int | None = 4) -> torch.nn.Module:
    """``module`` (a bare denoiser ``forward(hidden_states, timestep)``) under EasyCache, with
    an adapter registered under its class name."""
    from diffcache.adapter import Adapter
    from diffcache.registry import adapters, register_adapter

    name = type(module).__name__
    if name.lower() not in adapters():
        register_adapter(Adapter(name=name.lower(), pipelines=(), denoisers=(name,), media="image"))
    plan = {**PLAN, "model": name.lower(), "options": options}
    if steps is not None:
        plan["valid_for"] = {"num_inference_steps": steps}
    return diffcache.accelerate(module, plan)


class Conditioned(torch.nn.Module):
    """Wan I2V's shape: 2 latent channels and a conditioning channel in, 2 channels out."""

    def forward(self, hidden_states, timestep):
        return (2 * hidden_states[:, :2] + hidden_states[:, 2:],)


def test_conditioning_channels_beyond_the_output_are_not_the_input() -> None:
    """Only the latent channels (those the output has) are the input: a reuse returns
    latent + (v_c - latent_c) on them, whatever the conditioning channel holds. Before the fix
    the first call kept all 3 channels and step 1 failed with 'input shape changed'."""
    model = _bare(Conditioned(), {"threshold": 1e6, "warmup_steps": 2})
    latents, conds = [4.0, 2.0, 1.0, 0.5], [0.0, 10.0, 20.0, 30.0]
    outs = []
    for i, (a, c) in enumerate(zip(latents, conds, strict=True)):
        x = torch.cat([torch.full((1, 2, 2), a), torch.full((1, 1, 2), c)], dim=1)
        outs.append(model(x, torch.tensor(10.0 - i))[0])
    assert diffcache.stats(model).per_step() == [1.0, 1.0, 0.0, 1.0]
    computed = [2 * a + c for a, c in zip(latents, conds, strict=True)]
    reused = latents[2] + (computed[1] - latents[1])  # step 2: x_2 + (v_1 - x_1), latent only
    expect = [computed[0], computed[1], reused, computed[3]]
    assert [o.tolist() for o in outs] == [torch.full((1, 2, 2), e).tolist() for e in expect]


class Upcast(torch.nn.Module):
    """A half-precision input and a float32 output (``v = 2x + 1``)."""

    def forward(self, hidden_states, timestep):
        return (2 * hidden_states.float() + 1,)


def test_a_reused_output_has_the_dtype_of_a_computed_one() -> None:
    model = _bare(Upcast(), {"threshold": 1e6, "warmup_steps": 2})
    outs = [
        model(torch.full((1, 2, 2), a, dtype=torch.float16), torch.tensor(10.0 - i))[0]
        for i, a in enumerate([4.0, 2.0, 1.0, 0.5])
    ]
    assert diffcache.stats(model).per_step() == [1.0, 1.0, 0.0, 1.0]
    assert [o.dtype for o in outs] == [torch.float32] * 4
    assert float(outs[2][0, 0, 0]) == 1.0 + (5.0 - 2.0)  # x_2 + (v_1 - x_1)


def test_a_step_without_k_computes() -> None:
    """Warm-up 1: step 1 has an input and an output to compare with but no k yet (k needs two
    computed steps), so it computes; reuse starts at step 2."""
    script = [16.0, 8.0, 7.0, 6.0, 5.0, 3.0]
    want = _rule(script, 1e6, 1)
    assert want[0] == [True, True, False, False, False, True]
    assert _run(script, 1e6, 1) == want


def test_identity_and_aggressive_configs() -> None:
    """identity() computes every step (the plain outputs 2x + 1), even where the default
    threshold 0.05 would reuse (step 2: E = 2 * 0.125 / 17); aggressive() reuses every step
    after its 2 warm-up steps but the last."""
    from diffcache.methods.easycache import EasyCacheConfig

    script = [16.0, 8.0, 7.875, 7.75, 7.625, 3.0]
    assert _rule(script, 0.05, 0)[0][2] is False
    identity = EasyCacheConfig.identity()
    plain = ([True] * 6, [2 * x + 1 for x in script])
    assert _run(script, identity.threshold, identity.warmup_steps) == plain
    aggressive = EasyCacheConfig.aggressive()
    want = _rule(script, 1e6, 2)
    assert want[0] == [True, True, False, False, False, True]
    assert _run(script, aggressive.threshold, aggressive.warmup_steps) == want


def test_plan_problems_name_a_warmup_covering_every_step() -> None:
    """The warm-up, then ``k`` (two computed steps) and the computed last step: warm-up 7 leaves
    nothing to reuse in 8 steps, warm-up 6 leaves step 6."""
    from diffcache.methods.easycache import EasyCacheConfig

    problems = EasyCacheConfig(warmup_steps=7).plan_problems({"num_inference_steps": 8})
    assert problems == [
        "options.warmup_steps: easycache with warmup_steps=7 reuses nothing in 8 steps (it needs "
        "at least 9 steps); warmup_steps=6 would act at 8 steps"
    ]
    assert EasyCacheConfig(warmup_steps=6).plan_problems({"num_inference_steps": 8}) == []
    assert EasyCacheConfig(warmup_steps=8).plan_problems({}) == []


def test_a_bare_denoiser_needs_the_step_count() -> None:
    with pytest.raises(diffcache.DiffCacheError) as err:
        _bare(Upcast(), {"threshold": 0.3, "warmup_steps": 2}, steps=None)
    assert (
        "a bare denoiser has no scheduler to tell the step count, and EasyCache always computes "
        "the last step: set valid_for.num_inference_steps in the plan"
    ) in str(err.value)


@pytest.mark.parametrize(
    "script",
    [[4.0, 4.0, 3.0, 2.0], [4.0, -0.5, -1.0, -2.0]],
    ids=["same input twice: k = 0/0", "zero output: mean|v_1| = 0"],
)
def test_a_zero_denominator_forces_a_compute(script: list[float]) -> None:
    """k = mean|v_1 - v_0| / mean|x_1 - x_0| with x_1 = x_0, or E's normaliser mean|v_1| = 0
    (v = 2x + 1 at x = -0.5): the ratio is infinite and step 2 computes at any threshold."""
    assert _run(script, 1e6, 2) == ([True] * 4, [2 * x + 1 for x in script])


def test_a_threshold_of_one_is_a_threshold() -> None:
    """Only threshold 0 skips the rule (nothing could be reused); threshold 1 reuses."""
    want = _rule(SCRIPT, 1.0, 2)
    assert want[0] == [True, True, False, False, False, True]
    assert _run(SCRIPT, 1.0, 2) == want


def test_trace_records_the_new_k_on_the_deciding_branch() -> None:
    """With CFG the cond branch (0) decides and measures k: its computed calls trace new_k
    (None after step 0, then 2 = |dv| / |dx| of v = 2x + 1), the uncond branch traces none."""
    pipe = diffcache.accelerate(_pipe("separate"), PLAN, trace=True)
    pipe(torch.full((1, 2, 3), SCRIPT[0]), steps=6)
    trace = diffcache.stats(pipe).trace
    assert [e["values"]["new_k"] for e in trace if "new_k" in e["values"]] == [None, 2.0, 2.0, 2.0]
    assert all(e["branch"] == 0 for e in trace if "new_k" in e["values"])


class _StepProfiling:
    """Calibration runs that compute everything below the threshold ``knee`` and half above it
    (the real bisection of ``Profiling.tune`` runs on them)."""

    def __init__(self, knee: float, target_compute: float | None) -> None:
        self.knee, self.target_compute, self.runs = knee, target_compute, 0

    def measure(self, config, calibration=None) -> dict:
        self.runs += 1
        return {"compute_fraction": 1.0 if config.threshold < self.knee else 0.5}

    tune = Profiling.tune


@pytest.mark.parametrize("knee", [0.0123, 12.3])
def test_calibrate_finds_the_smallest_threshold_meeting_the_target(knee: float) -> None:
    from diffcache.methods.easycache import EasyCacheConfig

    cfg = EasyCacheConfig(threshold=0.05, warmup_steps=3)
    tuned = cfg.calibrate(_StepProfiling(knee, 0.5))
    assert knee <= tuned.config.threshold <= knee * 1.01  # 3 significant digits, rounded up
    assert tuned.config.warmup_steps == 3 and tuned.measured["compute_fraction"] == 0.5
    kept = cfg.calibrate(_StepProfiling(knee, None))
    assert kept.config == cfg and kept.measured == {"compute_fraction": 0.5 if knee < 0.05 else 1.0}
