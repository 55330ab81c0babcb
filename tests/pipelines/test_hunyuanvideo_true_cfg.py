"""HunyuanVideo text-to-video's true CFG (``negative_prompt`` + ``true_cfg``, as on the
image-to-video variant): the request reaches the pipeline's own keywords, either flag alone is
refused in one line before the model is built, and the step methods count the pipeline's second,
separate call per step (branch 1) wherever the pipeline makes one."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch

import diffcache
from diffcache.cli import main
from diffcache.errors import PlanError
from diffcache.generate import Request, generate
from diffcache.methods.ertacache import ERTACacheConfig
from diffcache.methods.ertacache_schedule import schedule
from diffcache.models import builtin_models, load_model
from diffcache.testing.toys import clean

MODEL, STEPS = "hunyuanvideo-tiny", 20  # the bundled tiny plans are for 20 steps
#: request values around CFG: none, a scale the pipeline ignores (1), true CFG
CASES = {
    "plain": {},
    "scale-1": {"true_cfg": 1.0},
    "true-cfg": {"negative_prompt": "blurry", "true_cfg": 3.0},
}


def _calls_per_step(values: dict[str, Any]) -> int:
    """HunyuanVideoPipeline's rule: true CFG (a second transformer call) runs when
    ``true_cfg_scale > 1`` and a negative prompt is given; the scale defaults to 1."""
    return 2 if values.get("true_cfg", 1.0) > 1 and "negative_prompt" in values else 1


@pytest.fixture(scope="module")
def pipe() -> Any:
    return load_model(MODEL)


def _request(values: dict[str, Any]) -> Request:
    return Request(prompt="a cat", steps=STEPS, **values).merged(builtin_models()[MODEL].defaults)


class _Forwards:
    """Plain forward pre-hooks (no diffcache): every transformer call, and the calls that run
    its first block, that is the calls a step method computed."""

    def __init__(self, pipe: Any) -> None:
        self.calls = self.computed = 0
        t = pipe.transformer
        self.handles = [
            t.register_forward_pre_hook(lambda *_: self._count("calls")),
            t.transformer_blocks[0].register_forward_pre_hook(lambda *_: self._count("computed")),
        ]

    def _count(self, what: str) -> None:
        setattr(self, what, getattr(self, what) + 1)

    def __enter__(self) -> _Forwards:
        return self

    def __exit__(self, *_: Any) -> None:
        for h in self.handles:
            h.remove()


def test_true_cfg_reaches_the_pipeline(pipe: Any) -> None:
    """The request's ``negative_prompt`` / ``true_cfg`` are the pipeline's own keywords: the
    output is the pipeline called with them, and differs without them and with another
    negative prompt."""
    small = {"steps": 3, "height": 32, "width": 32, "frames": 5}
    req = Request(prompt="a cat", **small)
    cfg = req.replace(negative_prompt="blurry", true_cfg=3.0)
    direct = pipe(
        prompt="a cat",
        negative_prompt="blurry",
        true_cfg_scale=3.0,
        num_inference_steps=3,
        height=32,
        width=32,
        num_frames=5,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    ).frames[0]
    out = generate(pipe, cfg)
    assert np.array_equal(out, direct)
    assert not np.array_equal(out, generate(pipe, req))
    assert not np.array_equal(out, generate(pipe, cfg.replace(negative_prompt="x")))


def _check_counts(pipe: Any, plan: Any, values: dict[str, Any]) -> tuple[Any, int]:
    """Run ``plan`` on the request ``values``; the calls and computed calls Stats count equal
    the plain hooks' and the pipeline's rule. Returns the Stats and the calls per step."""
    branches = _calls_per_step(values)
    diffcache.accelerate(pipe, plan)
    try:
        with _Forwards(pipe) as seen:
            out = generate(pipe, _request(values))
        s = diffcache.stats(pipe)
    finally:
        diffcache.remove(pipe)
    assert seen.calls == STEPS * branches == s.model_calls
    want = [(k, b) for k in range(STEPS) for b in range(branches)]
    assert [(k, b) for k, b, _ in s.calls] == want
    assert (s.computed, s.computed + s.skipped) == (seen.computed, STEPS * branches)
    assert s.compute_fraction == pytest.approx(seen.computed / (STEPS * branches))
    assert np.isfinite(out).all() and clean(pipe.transformer, pipe.scheduler)
    return s, branches


@pytest.mark.parametrize("case", CASES)
def test_easycache_bundled_plan_counts_each_call(pipe: Any, case: str) -> None:
    """The bundled plan (EasyCache, warm-up 4 of 20) runs with and without true CFG; each branch
    decides on its own, computing its warm-up and last step and reusing some steps."""
    s, branches = _check_counts(pipe, f"{MODEL}.yaml", CASES[case])
    computed = {b: {k for k, c, f in s.calls if c == b and f == 1.0} for b in range(branches)}
    for b, steps in computed.items():
        assert {0, 1, 2, 3, STEPS - 1} <= steps and len(steps) < STEPS, (b, sorted(steps))


@pytest.mark.parametrize("case", ["plain", "scale-1"])
def test_ertacache_bundled_plan_counts_its_reused_steps(pipe: Any, case: str) -> None:
    """The bundled ERTACache plan (one call per step) computes every step but its planned
    reused ones, where the pipeline makes one call per step."""
    plan = diffcache.Plan.load(f"{MODEL}-ertacache.yaml")
    s, branches = _check_counts(pipe, plan, CASES[case])
    reuse = set(schedule(plan.calibration_data, plan.config).reuse)
    assert branches == 1 and 0 < len(reuse) and s.computed == STEPS - len(reuse)


def test_ertacache_counts_the_true_cfg_call(pipe: Any) -> None:
    """Profiled with true CFG (two calls per step), ERTACache reuses the planned steps in both
    branches; the bundled one-call plan refuses a true-CFG run, naming the calls it has."""
    values = CASES["true-cfg"]
    config = ERTACacheConfig(time_adjust=False, threshold=0.05)
    plan = diffcache.profile(pipe, config, ["a cat"], request=_request(values))
    s, branches = _check_counts(pipe, plan, values)
    reuse = set(schedule(plan.calibration_data, plan.config).reuse)
    assert branches == 2 and 0 < len(reuse) and s.computed == 2 * (STEPS - len(reuse))
    diffcache.accelerate(pipe, f"{MODEL}-ertacache.yaml")
    try:
        with pytest.raises(PlanError, match=r"calibrated with 1 denoiser call\(s\) per step"):
            generate(pipe, _request(values))
    finally:
        diffcache.remove(pipe)


def test_cli_bundled_plan_with_true_cfg(tmp_path: Any) -> None:
    """``--negative-prompt`` + ``--true-cfg`` on hunyuanvideo-tiny under its bundled plan: two
    transformer calls per step."""
    stats = tmp_path / "s.json"
    argv = ["generate", "--model", MODEL, "--prompt", "a cat", "--plan", f"{MODEL}.yaml"]
    argv += ["--negative-prompt", "blurry", "--true-cfg", "3", "--out", str(tmp_path / "o.gif")]
    assert main([*argv, "--stats-json", str(stats)]) == 0
    s = json.loads(stats.read_text())
    assert (s["method"], s["steps"], s["model_calls"]) == ("easycache", STEPS, 2 * STEPS)


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--negative-prompt", "blurry"], "--negative-prompt needs --true-cfg above 1 on "
         "hunyuanvideo models"),
        (["--negative-prompt", "blurry", "--true-cfg", "1"], "--negative-prompt needs "
         "--true-cfg above 1 on hunyuanvideo models (--true-cfg 1)"),
        (["--true-cfg", "4.5"], "--true-cfg 4.5 needs --negative-prompt on hunyuanvideo models"),
    ],
)  # fmt: skip
def test_cli_one_flag_without_the_other_is_refused(
    tmp_path: Any, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, flags, error
) -> None:
    """The pipeline ignores a negative prompt unless the scale is above 1, and the scale without
    one: one line naming the flags given, before the model is built."""

    def built(name: str) -> None:
        raise AssertionError(f"{name} was built")

    monkeypatch.setattr(diffcache, "load_model", built)
    argv = ["generate", "--model", MODEL, "--prompt", "a cat", "--out", str(tmp_path / "o.gif")]
    assert main([*argv, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"diffcache: error: {error}"], err
