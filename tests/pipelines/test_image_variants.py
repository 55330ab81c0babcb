"""The FLUX and Qwen-Image pipeline variants (img2img, inpaint, Fill, Kontext) on their tiny
models: the steps counted are the steps the pipeline runs (``strength`` shortens them), each DiT
method runs with its family's bundled plan, Stats count what the model really computed (counted
with forward hooks of our own, independent of diffcache's bookkeeping) and ``remove`` restores
the plain output bit for bit."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import diffcache
from diffcache.adapter import Target
from diffcache.errors import PlanError
from diffcache.generate import Request, pipeline_kwargs
from diffcache.models import builtin_models, load_model
from diffcache.plan import Plan
from diffcache.registry import adapters, find_adapter
from diffcache.testing.toys import clean

#: variant model -> (its base family's tiny model, whether it takes a mask, takes a strength)
VARIANTS = {
    "flux-tiny-img2img": ("flux-tiny", False, True),
    "flux-tiny-inpaint": ("flux-tiny", True, True),
    "flux-tiny-fill": ("flux-tiny", True, True),
    "flux-tiny-kontext": ("flux-tiny", False, False),
    "qwenimage-tiny-img2img": ("qwenimage-tiny", False, True),
    "qwenimage-tiny-inpaint": ("qwenimage-tiny", True, True),
}
METHODS = ("easycache", "ertacache", "invardiff", "hyca")


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


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def model(request: pytest.FixtureRequest) -> tuple[str, Any]:
    return request.param, load_model(request.param)


def _request(name: str, files: dict[str, str], **values: Any) -> Request:
    _, mask, _ = VARIANTS[name]
    given = {"prompt": "a red cat", "image": files["image"], **values}
    if mask:
        given["mask"] = files["mask"]
    return Request(**given).merged(builtin_models()[name].defaults)


def _run(pipe: Any, req: Request) -> np.ndarray:
    kwargs = pipeline_kwargs(pipe, req)
    if type(pipe).__name__ == "FluxKontextPipeline":  # keep the input at 128 x 128 (fast)
        kwargs["_auto_resize"] = False
    with torch.inference_mode():
        return np.asarray(pipe(**kwargs).images[0])


class Counter:
    """What the transformer really computes, seen from inside: distinct timesteps and calls of
    the transformer, whole forwards (its ``proj_out`` runs last) and, per block, calls of the
    block's attention query projection (a skipped block never reaches it)."""

    def __init__(self, transformer: torch.nn.Module, blocks: list[torch.nn.Module]) -> None:
        self.timesteps: list[float] = []
        self.forwards = 0
        self.blocks = 0
        self.handles = [
            transformer.register_forward_pre_hook(self._call, with_kwargs=True),
            transformer.proj_out.register_forward_hook(self._forward),
            *(b.attn.to_q.register_forward_hook(self._block) for b in blocks),
        ]

    def _call(self, module: Any, args: tuple, kwargs: dict) -> None:
        self.timesteps.append(float(kwargs["timestep"].flatten()[0]))

    def _forward(self, *_: Any) -> None:
        self.forwards += 1

    def _block(self, *_: Any) -> None:
        self.blocks += 1

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.fixture
def counted(model: tuple[str, Any]) -> Iterator[tuple[str, Any, Counter, Target]]:
    name, pipe = model
    target = Target.resolve(find_adapter(pipe), pipe)
    counter = Counter(pipe.transformer, [s.module for s in target.sites("block")])
    yield name, pipe, counter, target
    counter.close()


def _plan(name: str, method: str) -> Plan:
    """The base family's bundled plan (flux-tiny.yaml is EasyCache); Fill's transformer takes
    more inputs, so its fingerprint differs: the calibration is borrowed without it."""
    base = VARIANTS[name][0]
    plan = Plan.load(f"{base}.yaml" if method == "easycache" else f"{base}-{method}.yaml")
    valid_for = {k: v for k, v in plan.valid_for.items() if k != "fingerprint"}
    return dataclasses.replace(plan, valid_for=valid_for) if "fill" in name else plan


def test_the_steps_counted_are_the_steps_strength_leaves(
    counted: tuple[str, Any, Counter, Target], files: dict[str, str]
) -> None:
    """steps=10 at strength 0.6 runs the last 6 steps of the schedule: the driver counts 6, a plan
    made for 6 runs and one made for the 10 scheduled is refused; remove() is bit-exact."""
    name, pipe, counter, _ = counted
    takes_strength = VARIANTS[name][2]
    req = _request(name, files, steps=10, **({"strength": 0.6} if takes_strength else {}))
    plain = _run(pipe, req)
    ran, calls = len(set(counter.timesteps)), len(counter.timesteps)
    assert ran == (6 if takes_strength else 10), counter.timesteps
    family = builtin_models()[VARIANTS[name][0]].family
    identity = {"diffcache": 1, "model": family, "method": "easycache"}
    identity["options"] = {"threshold": 0.0, "warmup_steps": 1}
    diffcache.accelerate(pipe, {**identity, "valid_for": {"num_inference_steps": ran}})
    try:
        same = _run(pipe, req)
        s = diffcache.stats(pipe)
    finally:
        diffcache.remove(pipe)
    assert (s.steps, s.model_calls) == (ran, calls) and s.skipped == 0
    assert np.array_equal(same, plain)
    if takes_strength:
        diffcache.accelerate(pipe, {**identity, "valid_for": {"num_inference_steps": 10}})
        try:
            with pytest.raises(PlanError, match="num_inference_steps=10 but this call runs 6"):
                _run(pipe, req)
        finally:
            diffcache.remove(pipe)
    assert clean(pipe.transformer, pipe.scheduler)
    assert np.array_equal(_run(pipe, req), plain)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_counts_what_the_model_computed(
    counted: tuple[str, Any, Counter, Target], files: dict[str, str], method: str
) -> None:
    """The family's bundled 20-step plan on the variant at strength 1 (all 20 steps): Stats'
    steps, calls and computed units equal what the model's own modules saw; remove() restores
    the plain output bit for bit."""
    name, pipe, counter, target = counted
    req = _request(name, files, steps=20, **({"strength": 1.0} if VARIANTS[name][2] else {}))
    plain = _run(pipe, req)
    plain_calls, plain_blocks = len(counter.timesteps), counter.blocks
    counter.timesteps, counter.forwards, counter.blocks = [], 0, 0
    diffcache.accelerate(pipe, _plan(name, method))
    try:
        out = _run(pipe, req)
        s = diffcache.stats(pipe)
    finally:
        diffcache.remove(pipe)
    n_blocks = len(target.sites("block"))
    assert s.steps == len(set(counter.timesteps)) == 20
    assert s.model_calls == len(counter.timesteps) == plain_calls
    assert s.work["step"] == [counter.forwards, s.model_calls]
    assert plain_blocks == n_blocks * plain_calls
    if s.kind == "block":  # a block method skips whole blocks: their attention never runs
        assert s.work["block"] == [counter.blocks, n_blocks * s.model_calls]
    if s.kind == "module":
        assert s.work["module"][1] == len(target.sites("module")) * s.model_calls
    assert 0 < s.compute_fraction < 1, f"{name}/{method}: nothing skipped"
    assert np.isfinite(out).all() and not np.array_equal(out, plain)
    assert clean(pipe.transformer, *pipe.transformer.modules(), pipe.scheduler)
    assert np.array_equal(_run(pipe, req), plain), f"{name}/{method}: remove() not exact"


def test_a_variant_runs_its_base_familys_plans_and_not_anothers() -> None:
    """Plans for flux serve flux-img2img (same transformer); a Qwen-Image plan is refused."""
    family = adapters()["flux-img2img"].family
    assert family == "flux"
    Plan.load("flux-tiny.yaml").check_family(family, "flux-tiny-img2img")
    with pytest.raises(PlanError, match="the plan is for 'qwenimage' but flux-tiny-img2img"):
        Plan.load("qwenimage-tiny.yaml").check_family(family, "flux-tiny-img2img")


def test_strength_steps_follow_diffusers_get_timesteps() -> None:
    """The steps a request runs equal the length of the timesteps diffusers' own img2img
    ``get_timesteps`` keeps, for several step counts and strengths, through the family's rule
    (``steps_run``); a request without steps or strength, or a family without the rule, runs
    its step count (None)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline

    from diffcache.variants import img2img_steps, steps_run

    pipe = FluxImg2ImgPipeline.__new__(FluxImg2ImgPipeline)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    img2img = adapters()["flux-img2img"]
    for steps in (1, 7, 10, 20, 28):
        pipe.scheduler.set_timesteps(steps)
        for strength in (0.0, 0.05, 0.3, 0.6, 0.75, 1.0):
            kept, n = pipe.get_timesteps(steps, strength, "cpu")
            values = {"steps": steps, "strength": strength}
            assert img2img_steps(steps, strength) == steps_run(img2img, values) == n == len(kept)
    for adapter, values in [
        (img2img, {"steps": 10}),
        (img2img, {"strength": 0.6}),
        (adapters()["flux"], {"steps": 10, "strength": 0.6}),
        (None, {"steps": 10, "strength": 0.6}),
    ]:
        assert steps_run(adapter, values) is None


def test_cli_generate_img2img_and_its_bad_input(
    files: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from diffcache.cli import main

    image, mask = files["image"], files["mask"]
    out = tmp_path / "out.png"
    model = ["generate", "--model", "flux-tiny-img2img", "--prompt", "a cat"]
    args = ["--image", image, "--steps", "5", "--strength", "0.6", "--out", str(out)]
    assert main([*model, *args]) == 0
    assert out.is_file() and np.asarray(Image.open(out)).shape == (128, 128, 3)
    capsys.readouterr()
    assert main([*model, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "diffcache: error: --image is required for flux-img2img models", err
    assert main([*model, "--image", image, "--mask", mask, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffcache: error: flux-img2img models take no --mask; they take:")
    assert "\n" not in err


def test_cli_a_plan_counts_the_steps_strength_runs(
    files: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Profiled at --steps 10 --strength 0.6, a plan is valid for the 6 steps run: it serves
    that request, and a request that runs another count is refused in one line before the
    model is built."""
    from diffcache.cli import main

    plan, out = tmp_path / "p.yaml", tmp_path / "out.png"
    model = ["--model", "flux-tiny-img2img", "--image", files["image"]]
    short = ["--steps", "10", "--strength", "0.6"]
    profile = ["profile", *model, "--method", "ertacache", *short, "--num-prompts", "1"]
    assert main([*profile, "--out", str(plan)]) == 0
    assert Plan.load(plan).valid_for["num_inference_steps"] == 6
    stats = tmp_path / "stats.json"
    gen = ["generate", *model, "--prompt", "a cat", "--plan", str(plan), "--out", str(out)]
    assert main([*gen, *short, "--stats-json", str(stats)]) == 0
    assert '"steps": 6' in stats.read_text()
    capsys.readouterr()
    assert main(gen) == 2  # the model's defaults: 20 steps at strength 0.6 run 12
    err = capsys.readouterr().err.strip()
    assert err == (
        "diffcache: error: p.yaml: the plan is valid for runs of 6 denoising steps "
        "(valid_for.num_inference_steps) but steps 20 at strength 0.6 run 12; set --steps and "
        "--strength so that they run 6, or profile at these"
    ), err


def test_cli_profile_refuses_a_warm_up_longer_than_the_steps_strength_runs(
    files: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--steps 10 at --strength 0.3 denoises 3 steps: HyCa's 3 warm-up steps leave nothing to
    forecast, said in one line before any model is built."""
    from diffcache.cli import main

    def no_model(name: str) -> None:
        raise AssertionError(f"{name} was built")

    monkeypatch.setattr(diffcache, "load_model", no_model)

    args = ["profile", "--model", "flux-tiny-img2img", "--image", files["image"], "--method"]
    args += ["hyca", "--steps", "10", "--strength", "0.3", "--out", str(tmp_path / "p.yaml")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "diffcache: error: hyca: this request denoises 3 of its 10 scheduled steps; "
        "options.warmup_steps: hyca with warmup_steps=3 reuses nothing in 3 steps (it needs at "
        "least 5 steps); warmup_steps=1 would act at 3 steps"
    ), err


def test_ertacache_profiled_on_the_steps_strength_runs_follows_its_plan(
    files: dict[str, str],
) -> None:
    """ERTACache profiled at steps 10, strength 0.6 (6 steps run) with time adjustment: the
    plan runs that request, reusing exactly its planned steps; the flow times of the steps run
    are adjusted (the first, where the input is noised, is not) and no time outside them."""
    pipe = load_model("flux-tiny-img2img")
    req = _request("flux-tiny-img2img", files, steps=10, strength=0.6)
    plan = diffcache.profile(pipe, "ertacache", ["a red cat"], request=req, target_compute=0.5)
    reused = plan.provenance["measured"]["reuse_steps"]
    assert plan.valid_for["num_inference_steps"] == 6 and plan.options["time_adjust"] and reused
    target = Target.resolve(find_adapter(pipe), pipe)
    counter = Counter(pipe.transformer, [s.module for s in target.sites("block")])
    try:
        plain = _run(pipe, req)
        seen_plain, counter.timesteps = counter.timesteps, []
        diffcache.accelerate(pipe, plan)
        try:
            out = _run(pipe, req)
            s = diffcache.stats(pipe)
        finally:
            diffcache.remove(pipe)
        seen = counter.timesteps
    finally:
        counter.close()
    assert s.steps == 6 and [i for i, c in enumerate(s.per_step()) if c == 0] == reused
    assert len(seen) == 6 and seen[0] == seen_plain[0] and seen != seen_plain
    assert all(t <= seen_plain[0] for t in seen) and np.isfinite(out).all()
    assert np.array_equal(_run(pipe, req), plain)
