"""A built-in model's default request (models.yaml ``defaults``) reaches the Python front end
as it reaches the CLI: plain calls of the pipeline ``load_model`` returns, and
``diffcache.profile``."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import numpy as np
import yaml

import diffcache
from diffcache.cli import main
from diffcache.models import builtin_of, model_entry


def _steps(pipe) -> int:
    return len(pipe.scheduler.timesteps)


def test_a_plain_call_of_a_tiny_model_takes_its_defaults() -> None:
    """``load_model("wan2.1-tiny")(prompt=...)`` makes the model's 64x64, 9 frames in 20 steps
    (diffusers' own defaults are 480x832, 81 frames, 50 steps); what the caller gives wins."""
    pipe = diffcache.load_model("wan2.1-tiny")
    want = model_entry("wan2.1-tiny").defaults
    video = pipe(prompt="a cat surfing", output_type="np").frames[0]
    assert video.shape == (want["frames"], want["height"], want["width"], 3)
    assert _steps(pipe) == want["steps"] == 20
    video = pipe("a cat", None, 32, 48, num_frames=5, num_inference_steps=3, output_type="np")
    assert video.frames[0].shape == (5, 32, 48, 3) and _steps(pipe) == 3
    plain = diffcache.pipelines.wan.build_tiny()  # built without load_model: the stock class
    assert type(plain) is type(pipe).__mro__[1] and builtin_of(plain) is None
    assert type(pipe).__name__ == "WanPipeline" and isinstance(pipe, type(plain))


def test_defaults_survive_copies_and_pickles_and_stay_per_model() -> None:
    """Two built-in models of one pipeline class each keep their own defaults, through a deep
    copy and a pickle too."""
    tiny, shapes = diffcache.load_model("wan2.1-tiny"), diffcache.load_model("wan-shapes")
    assert type(tiny) is type(shapes)
    for pipe in (copy.deepcopy(tiny), pickle.loads(pickle.dumps(shapes))):
        want = model_entry(builtin_of(pipe).name).defaults
        video = pipe(prompt="a red square moving left", output_type="np").frames[0]
        assert video.shape[:3] == (want["frames"], want["height"], want["width"])
    assert {builtin_of(tiny).name, builtin_of(shapes).name} == {"wan2.1-tiny", "wan-shapes"}


def test_a_bundled_plan_runs_on_a_plain_call_and_remove_is_bit_exact() -> None:
    """dit-tiny's bundled plan is valid for its 20 default steps, so ``pipe(class_labels=...)``
    runs accelerated (it was refused at diffusers' 50); after ``remove`` the output equals a
    never-accelerated pipeline's, bit for bit."""
    import torch

    def run(pipe) -> np.ndarray:
        return pipe([3], generator=torch.manual_seed(0), output_type="np").images[0]

    reference = run(diffcache.load_model("dit-tiny"))
    pipe = diffcache.accelerate(diffcache.load_model("dit-tiny"), "dit-tiny.yaml")
    cached = run(pipe)
    stats = diffcache.stats(pipe)
    assert stats.steps == 20 and stats.compute_fraction < 1
    assert not np.array_equal(cached, reference)
    assert np.array_equal(run(diffcache.remove(pipe)), reference)


def test_python_profile_plans_as_the_cli(tmp_path: Path) -> None:
    """``diffcache.profile(load_model("dit-tiny"), "easycache", ...)`` starts where
    ``diffcache profile --model dit-tiny --method easycache`` does (the model's bundled plan: 20
    steps, warm-up 4; it was 50 steps and warm-up 10) and writes the same plan."""
    py, cli = tmp_path / "py.yaml", tmp_path / "cli.yaml"
    pipe = diffcache.load_model("dit-tiny")
    diffcache.profile(pipe, "easycache", ["0", "1"], target_compute=0.5, out=py)
    argv = ["profile", "--model", "dit-tiny", "--method", "easycache", "--num-prompts", "2"]
    assert main([*argv, "--target-compute", "0.5", "--out", str(cli)]) == 0
    got, want = yaml.safe_load(py.read_text()), yaml.safe_load(cli.read_text())
    bundled = diffcache.Plan.load("dit-tiny.yaml")
    assert got["valid_for"]["num_inference_steps"] == bundled.valid_for["num_inference_steps"]
    assert got["options"]["warmup_steps"] == bundled.options["warmup_steps"]
    assert got == want


def test_the_defaults_class_calls_its_base_classs_current_call(monkeypatch) -> None:
    """The subclass is made once per class: a ``__call__`` captured at that time outlived a
    test's patch of the base class (the golden test then ran the patch's stand-in)."""
    from diffcache import models

    class Base:
        def __call__(self, x: int = 1) -> tuple[str, int]:
            return ("base", x)

    pipe = models._with_defaults_class(Base)()
    assert pipe(2) == ("base", 2)
    monkeypatch.setattr(Base, "__call__", lambda self, x=1: ("patched", x))
    assert pipe(3) == ("patched", 3)
    monkeypatch.undo()
    assert pipe(4) == ("base", 4)
