"""wan-shapes-8step, the few-step student of wan-shapes: loads offline through the stock
WanPipeline with the teacher's autoencoder and text encoder, follows its prompts per the
wan-shapes checker in 8 Euler steps without CFG (one transformer call a step), every DiT method
runs on it at the options of its few-step limit and leaves it bit-exact, and it distils
deterministically."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import diffcache
import diffcache.pipelines  # noqa: F401  (registers the wan2.1 adapter)
from diffcache.generate import Request, generate
from diffcache.methods.easycache import EasyCacheConfig
from diffcache.methods.ertacache import ERTACacheConfig
from diffcache.methods.hyca import HyCaConfig
from diffcache.methods.invardiff import InvarDiffConfig
from diffcache.models import builtin_models, load_model
from diffcache.pipelines import shapes, shapes_fewstep
from diffcache.pipelines.shapes import data
from diffcache.testing.toys import clean

DEFAULTS = builtin_models()["wan-shapes-8step"].defaults
#: one prompt per colour and per direction (the diagonal of PROMPTS), as tests/test_shapes.py
QUICK = [shapes.PROMPTS[i * len(data.DIRECTIONS) + i] for i in range(len(data.COLOURS))]


@pytest.fixture(scope="module")
def pipe():
    return load_model("wan-shapes-8step")


def _generate(pipe, prompt: str, seed: int = 0) -> np.ndarray:
    return generate(pipe, Request(prompt=prompt, seed=seed).merged(DEFAULTS))


def test_defaults_are_the_distilled_sampler(pipe) -> None:
    """8 steps, guidance 1; the scheduler samples at the sigmas the student was trained on;
    the autoencoder and text encoder are the teacher's, weight for weight."""
    from diffcache.pipelines.shapes_fewstep.train import grid

    assert DEFAULTS["steps"] == shapes_fewstep.STEPS == 8 and DEFAULTS["guidance"] == 1.0
    assert type(pipe).__name__ == "WanPipeline"
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    pipe.scheduler.set_timesteps(DEFAULTS["steps"])
    assert torch.equal(pipe.scheduler.sigmas, grid())
    teacher = shapes.load()
    for name in ("vae", "text_encoder"):
        mine, theirs = getattr(pipe, name).state_dict(), getattr(teacher, name).state_dict()
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), name


def test_one_transformer_call_a_step(pipe) -> None:
    """guidance 1.0 skips WanPipeline's unconditional pass: 8 calls for 8 steps."""
    calls = []
    handle = pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        video = _generate(pipe, shapes.PROMPTS[0])
    finally:
        handle.remove()
    assert len(calls) == DEFAULTS["steps"]
    assert video.shape == (data.FRAMES, data.SIZE, data.SIZE, 3) and np.isfinite(video).all()


def test_follows_the_quick_prompts(pipe) -> None:
    """4 prompts (every colour and every direction once) x seed 0 at 8 steps: the checker reads
    colour and direction right in >= 3 (the card reports the 80-clip measurement)."""
    right = [shapes.score(p, _generate(pipe, p)) for p in QUICK]
    assert sum(right) >= 3, f"only {sum(right)} of {len(QUICK)} prompts followed: {right}"


def test_generate_and_eval_use_the_defaults_and_the_checker(pipe, tmp_path) -> None:
    """``diffcache generate --model wan-shapes-8step`` writes the clip the defaults give, and
    ``eval`` scores the plain runs with the wan-shapes checker."""
    import imageio.v3 as iio

    from diffcache.cli import main
    from diffcache.eval.runner import evaluate

    out = tmp_path / "clip.gif"
    argv = ["generate", "--model", "wan-shapes-8step", "--prompt", QUICK[0], "--out", str(out)]
    assert main(argv) == 0
    frames = iio.imread(out)[..., :3].astype(np.float32)
    video = _generate(pipe, QUICK[0]) * 255
    assert frames.shape == video.shape and np.abs(frames - video).mean() < 8  # GIF's palette
    prompts = QUICK[:2]
    report = evaluate(
        "wan-shapes-8step", ["wan-shapes-8step.yaml"], tmp_path / "eval", prompts=prompts,
        repeats=1, samples=0, warmup=False,
    )  # fmt: skip
    want = np.mean([shapes.score(p, _generate(pipe, p)) for p in prompts])
    assert report["baseline"]["task_score"] == pytest.approx(want)


@pytest.mark.slow
def test_follows_80_percent_of_prompts(pipe) -> None:
    """The model card's measurement: 16 prompts x seeds 0-4 at 8 steps, >= 80% followed."""
    right = [shapes.score(p, _generate(pipe, p, s)) for s in range(5) for p in shapes.PROMPTS]
    assert np.mean(right) >= 0.8, f"{sum(right)} of {len(right)} prompts followed"


def _at_limit(config):
    """``config`` with the value of its limiting option that reuses the least that still acts
    at the student's 8 steps (the fix its ``StepLimit`` names); ERTACache's limit is a rule."""
    limit = config.step_limit(shapes_fewstep.STEPS)
    return config if limit is None else dataclasses.replace(config, **{limit.option: limit.fix})


@pytest.mark.parametrize(
    "config",
    [
        EasyCacheConfig(threshold=1e6, warmup_steps=20),
        HyCaConfig(warmup_steps=20),
        InvarDiffConfig(nonskip_rate=0.99),
        ERTACacheConfig(threshold=1e6),
    ],
    ids=lambda c: c.name,
)
def test_methods_run_at_their_few_step_limits(pipe, config) -> None:
    """Each method's options that reuse nothing in 8 steps (ERTACache: its rule allows 3 on),
    moved to the value their ``StepLimit`` names, profiled on two calibration prompts: the run
    reuses work on the student; ``remove`` gives the plain output back bit for bit."""
    steps = shapes_fewstep.STEPS
    assert (config.step_limit(steps) is None) == isinstance(config, ERTACacheConfig)
    config = _at_limit(config)
    assert config.step_limit(steps) is None
    request = Request(seed=0).merged(DEFAULTS)
    plain = _generate(pipe, QUICK[0])
    plan = diffcache.profile(pipe, config, list(shapes.CALIBRATION[:2]), request=request)
    assert plan.valid_for["num_inference_steps"] == steps
    diffcache.accelerate(pipe, plan)
    try:
        cached = _generate(pipe, QUICK[0])
        stats = diffcache.stats(pipe)
    finally:
        diffcache.remove(pipe)
    assert stats.steps == steps and stats.compute_fraction < 1 and np.isfinite(cached).all()
    assert clean(pipe.transformer)
    assert np.array_equal(_generate(pipe, QUICK[0]), plain)


def test_distillation_is_deterministic() -> None:
    """Two short seeded distillations (4 teacher trajectories, 3 batches) give the same losses;
    another seed gives other losses, so the comparison can fail."""
    from diffcache.pipelines.shapes_fewstep.train import distil

    teacher = shapes.load()
    runs = [distil(teacher, n=4, steps=3, seed=s, batch=8)[1] for s in (1, 1, 2)]
    assert len(runs[0]) == 3 and np.allclose(runs[0], runs[1], atol=1e-6, rtol=0)
    assert not np.allclose(runs[0], runs[2], atol=1e-6, rtol=0)


def test_teacher_trajectories_start_at_the_noise_and_follow_the_guided_flow() -> None:
    """A trajectory starts at its seeded noise; its first grid step agrees with a fine
    integration (the midpoint rule) of the teacher's guided velocity through the stock 512-token
    forward (the short padded cross-attention stands for WanPipeline's 512 tokens)."""
    from diffcache.pipelines.shapes_fewstep.train import (
        CAPTIONS,
        GUIDANCE,
        LATENT_SHAPE,
        NOISE_SEED,
        grid,
        trajectories,
    )

    teacher = shapes.load()
    states, prompts = trajectories(teacher, 2)
    noise = torch.randn((2, *LATENT_SHAPE), generator=torch.Generator().manual_seed(NOISE_SEED))
    assert torch.equal(states[:, 0], noise) and states.shape[1] == shapes_fewstep.STEPS + 1
    captions = [CAPTIONS[int(p)] for p in prompts]
    cond, uncond = teacher.encode_prompt(captions, [""] * 2, max_sequence_length=512)
    x, sigmas = noise, grid()

    def velocity(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        t = (s * 1000).expand(2)
        c = teacher.transformer(x, timestep=t, encoder_hidden_states=cond).sample
        u = teacher.transformer(x, timestep=t, encoder_hidden_states=uncond).sample
        return u + GUIDANCE * (c - u)

    fine = torch.linspace(float(sigmas[0]), float(sigmas[1]), 21)
    with torch.no_grad():  # the midpoint rule on a 10x finer grid
        for s, s_next in zip(fine[:-1], fine[1:], strict=True):
            h = s_next - s
            x = x + h * velocity(x + h / 2 * velocity(x, s), s + h / 2)
    # the trajectories take 2 Heun steps per grid step: about 1e-2 off the fine integration
    assert torch.allclose(states[:, 1], x, atol=3e-2), float((states[:, 1] - x).abs().max())
    assert not torch.allclose(states[:, 1], noise, atol=3e-1)
