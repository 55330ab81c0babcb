"""True CFG (``negative_prompt`` + ``true_cfg``) on the families whose pipelines take it: FLUX
(FluxPipeline and its img2img / inpaint / Kontext variants; not Fill) and HunyuanVideo (text-to-
video, as its image-to-video variant). The request reaches the pipeline's own keywords, either
flag alone is refused in one line naming the family before the model is built, and the step
methods count the pipeline's second, separate call per step (branch 1) wherever it makes one."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import diffcache
from diffcache.cli import main
from diffcache.errors import PlanError
from diffcache.generate import Request, generate
from diffcache.methods.ertacache import ERTACacheConfig
from diffcache.methods.ertacache_schedule import schedule
from diffcache.models import builtin_models, load_model
from diffcache.testing.toys import clean

STEPS = 20  # the bundled tiny plans are for 20 steps
#: model -> (its pipeline's output attribute, the CLI's output file, a small request's size)
MODELS = {
    "flux-tiny": ("images", "o.png", {"height": 32, "width": 32}),
    "hunyuanvideo-tiny": ("frames", "o.gif", {"height": 32, "width": 32, "frames": 5}),
}
#: request values around CFG: none, a scale the pipeline ignores (1), true CFG
CASES = {
    "plain": {},
    "scale-1": {"true_cfg": 1.0},
    "true-cfg": {"negative_prompt": "blurry", "true_cfg": 3.0},
}
#: the FLUX variants whose pipelines take a negative prompt, and the input files each needs
VARIANTS = {
    "flux-tiny-img2img": ("image",),
    "flux-tiny-inpaint": ("image", "mask"),
    "flux-tiny-kontext": ("image",),
}


def _calls_per_step(values: dict[str, Any]) -> int:
    """Both pipelines' rule: true CFG (a second transformer call) runs when ``true_cfg_scale >
    1`` and a negative prompt is given; the scale defaults to 1."""
    return 2 if values.get("true_cfg", 1.0) > 1 and "negative_prompt" in values else 1


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def pipe(model: str) -> Any:
    return load_model(model)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A 128 x 128 input image and a mask whose centre is repainted."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(folder / "in.png")
    mask = np.zeros((128, 128), dtype=np.uint8)
    mask[32:96, 32:96] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return {"image": str(folder / "in.png"), "mask": str(folder / "mask.png")}


def _request(model: str, values: dict[str, Any]) -> Request:
    return Request(prompt="a cat", steps=STEPS, **values).merged(builtin_models()[model].defaults)


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


def _direct(pipe: Any, output: str, **kwargs: Any) -> np.ndarray:
    """The pipeline called by hand, with diffusers' own keywords."""
    generator = torch.Generator("cpu").manual_seed(0)
    return getattr(pipe(**kwargs, generator=generator, output_type="np"), output)[0]


def test_true_cfg_reaches_the_pipeline(model: str, pipe: Any) -> None:
    """The request's ``negative_prompt`` / ``true_cfg`` are the pipeline's own keywords: the
    output is the pipeline called with them, and differs without them and with another
    negative prompt."""
    output, _, size = MODELS[model]
    req = Request(prompt="a cat", steps=3, **size)
    cfg = req.replace(negative_prompt="blurry", true_cfg=3.0)
    by_hand = {"num_frames" if k == "frames" else k: v for k, v in size.items()}
    direct = _direct(
        pipe,
        output,
        prompt="a cat",
        negative_prompt="blurry",
        true_cfg_scale=3.0,
        num_inference_steps=3,
        **by_hand,
    )
    out = generate(pipe, cfg)
    assert np.array_equal(out, direct)
    assert not np.array_equal(out, generate(pipe, req))
    assert not np.array_equal(out, generate(pipe, cfg.replace(negative_prompt="x")))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_true_cfg_reaches_each_flux_variant(name: str, files: dict[str, str]) -> None:
    """img2img, inpaint and Kontext take the two fields too: the output of the request is
    their pipeline called with ``negative_prompt`` / ``true_cfg_scale`` (and the input files),
    and differs from the run without true CFG."""
    from diffusers.utils import load_image

    variant = load_model(name)
    inputs = {k: files[k] for k in VARIANTS[name]}
    base = Request(prompt="a cat", steps=2, **inputs).merged(builtin_models()[name].defaults)
    cfg = base.replace(negative_prompt="blurry", true_cfg=3.0)
    by_hand = {k: v for k, v in base.values.items() if k not in ("steps", "guidance", *inputs)}
    if "mask" in inputs:
        by_hand["mask_image"] = load_image(inputs["mask"])
    direct = _direct(
        variant,
        "images",
        **by_hand,
        image=load_image(inputs["image"]),
        negative_prompt="blurry",
        true_cfg_scale=3.0,
        num_inference_steps=2,
        guidance_scale=base.values["guidance"],
    )
    out = generate(variant, cfg)
    assert np.array_equal(out, direct)
    assert not np.array_equal(out, generate(variant, base))


def _check_counts(model: str, pipe: Any, plan: Any, values: dict[str, Any]) -> tuple[Any, int]:
    """Run ``plan`` on the request ``values``; the calls and computed calls Stats count equal
    the plain hooks' and the pipeline's rule. Returns the Stats and the calls per step."""
    branches = _calls_per_step(values)
    diffcache.accelerate(pipe, plan)
    try:
        with _Forwards(pipe) as seen:
            out = generate(pipe, _request(model, values))
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
def test_easycache_bundled_plan_counts_each_call(model: str, pipe: Any, case: str) -> None:
    """The bundled plan (EasyCache, warm-up 4 of 20) runs with and without true CFG; each branch
    decides on its own, computing its warm-up and last step and reusing some steps."""
    s, branches = _check_counts(model, pipe, f"{model}.yaml", CASES[case])
    computed = {b: {k for k, c, f in s.calls if c == b and f == 1.0} for b in range(branches)}
    for b, steps in computed.items():
        assert {0, 1, 2, 3, STEPS - 1} <= steps and len(steps) < STEPS, (b, sorted(steps))


@pytest.mark.parametrize("case", ["plain", "scale-1"])
def test_ertacache_bundled_plan_counts_its_reused_steps(model: str, pipe: Any, case: str) -> None:
    """The bundled ERTACache plan (one call per step) computes every step but its planned
    reused ones, where the pipeline makes one call per step."""
    plan = diffcache.Plan.load(f"{model}-ertacache.yaml")
    s, branches = _check_counts(model, pipe, plan, CASES[case])
    reuse = set(schedule(plan.calibration_data, plan.config).reuse)
    assert branches == 1 and 0 < len(reuse) and s.computed == STEPS - len(reuse)


def test_ertacache_counts_the_true_cfg_call(model: str, pipe: Any) -> None:
    """Profiled with true CFG (two calls per step), ERTACache reuses the planned steps in both
    branches; the bundled one-call plan refuses a true-CFG run, naming the calls it has."""
    values = CASES["true-cfg"]
    config = ERTACacheConfig(time_adjust=False, threshold=0.05)
    plan = diffcache.profile(pipe, config, ["a cat"], request=_request(model, values))
    s, branches = _check_counts(model, pipe, plan, values)
    reuse = set(schedule(plan.calibration_data, plan.config).reuse)
    assert branches == 2 and 0 < len(reuse) and s.computed == 2 * (STEPS - len(reuse))
    diffcache.accelerate(pipe, f"{model}-ertacache.yaml")
    try:
        with pytest.raises(PlanError, match=r"calibrated with 1 denoiser call\(s\) per step"):
            generate(pipe, _request(model, values))
    finally:
        diffcache.remove(pipe)


def test_cli_bundled_plan_with_true_cfg(model: str, tmp_path: Any) -> None:
    """``--negative-prompt`` + ``--true-cfg`` under the model's bundled plan: two transformer
    calls per step."""
    stats = tmp_path / "s.json"
    argv = ["generate", "--model", model, "--prompt", "a cat", "--plan", f"{model}.yaml"]
    out = tmp_path / MODELS[model][1]
    argv += ["--negative-prompt", "blurry", "--true-cfg", "3", "--out", str(out)]
    assert main([*argv, "--stats-json", str(stats)]) == 0
    s = json.loads(stats.read_text())
    assert (s["method"], s["steps"], s["model_calls"]) == ("easycache", STEPS, 2 * STEPS)


@pytest.mark.parametrize(
    ("name", "flags", "error"),
    [
        ("hunyuanvideo-tiny", ["--negative-prompt", "blurry"],
         "--negative-prompt needs --true-cfg above 1 on hunyuanvideo models"),
        ("hunyuanvideo-tiny", ["--negative-prompt", "blurry", "--true-cfg", "1"],
         "--negative-prompt needs --true-cfg above 1 on hunyuanvideo models (--true-cfg 1)"),
        ("hunyuanvideo-tiny", ["--true-cfg", "4.5"],
         "--true-cfg 4.5 needs --negative-prompt on hunyuanvideo models"),
        ("flux-tiny", ["--negative-prompt", "blurry"],
         "--negative-prompt needs --true-cfg above 1 on flux models"),
        ("flux-tiny", ["--negative-prompt", "blurry", "--true-cfg", "1"],
         "--negative-prompt needs --true-cfg above 1 on flux models (--true-cfg 1)"),
        ("flux-tiny", ["--true-cfg", "4.5"],
         "--true-cfg 4.5 needs --negative-prompt on flux models"),
        ("flux-tiny-kontext", ["--image", "IMAGE", "--negative-prompt", "blurry"],
         "--negative-prompt needs --true-cfg above 1 on flux-kontext models"),
        ("flux-tiny-fill", ["--image", "IMAGE", "--mask", "IMAGE", "--negative-prompt", "blurry",
                            "--true-cfg", "3"],
         "flux-fill models take no --negative-prompt; they take: --prompt, --image, --mask, "
         "--strength, --height, --width, --steps, --guidance; flux-fill models take no "
         "--true-cfg; they take: --prompt, --image, --mask, --strength, --height, --width, "
         "--steps, --guidance (--height 128, --width 128, --steps 20, --guidance 30.0, "
         "--strength 1.0: flux-tiny-fill's default; pass the flag to change it)"),
    ],
)  # fmt: skip
def test_cli_one_flag_without_the_other_is_refused(
    tmp_path: Any,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    files: dict[str, str],
    name: str,
    flags: list[str],
    error: str,
) -> None:
    """The pipeline ignores a negative prompt unless the scale is above 1, and the scale without
    one; FluxFillPipeline takes neither: one line naming the flags given and the family, before
    the model is built."""

    def built(model: str) -> None:
        raise AssertionError(f"{model} was built")

    monkeypatch.setattr(diffcache, "load_model", built)
    flags = [files["image"] if f == "IMAGE" else f for f in flags]
    argv = ["generate", "--model", name, "--prompt", "a cat", "--out", str(tmp_path / "o.png")]
    assert main([*argv, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"diffcache: error: {error}"], err
