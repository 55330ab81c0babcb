"""The image-to-video and video-to-video pipelines of Wan (Wan2.1 I2V, Wan2.2 two-expert I2V,
V2V), CogVideoX (I2V, V2V) and HunyuanVideo (I2V, token-replace and 33-channel), and Qwen-Image
Edit (an image input too; slow: it encodes the input at 1024 x 1024) under the four DiT
methods: the steps counted are the steps the pipeline runs (``strength`` trims
video-to-video), each expert keeps its own state, the counts follow each method's rule,
``remove`` is bit-exact, and the CLI takes ``--image`` / ``--video``."""

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
from diffcache.methods.hyca import HyCaConfig
from diffcache.methods.invardiff import InvarDiffConfig
from diffcache.models import builtin_models, load_model
from diffcache.pipelines._fields import INPUT_VIDEO
from diffcache.registry import find_adapter
from diffcache.testing.toys import clean

STEPS, STRENGTH = 8, 0.5
#: a variant name's suffix: the model's run with a negative prompt and true CFG (HunyuanVideo)
TRUE_CFG = "+true-cfg"
VARIANTS = ["wan-tiny-i2v", "wan22-tiny-i2v", "wan-tiny-v2v", "cogvideox-tiny-i2v"]
VARIANTS += ["cogvideox-tiny-v2v", "hunyuanvideo-tiny-i2v", "hunyuanvideo-tiny-i2v-33ch"]
VARIANTS += ["hunyuanvideo-tiny-i2v" + TRUE_CFG]
VARIANTS += [pytest.param("qwenimage-tiny-edit", marks=pytest.mark.slow)]
METHODS = ["easycache", "ertacache", "invardiff", "hyca"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An input image, and a palette GIF video (as imageio writes them: a palette first frame)."""
    import imageio.v2 as imageio

    folder, rng = tmp_path_factory.mktemp("inputs"), np.random.default_rng(0)
    frames = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(9)]
    Image.fromarray(frames[0]).save(folder / "in.png")
    imageio.mimsave(folder / "in.gif", frames)
    return {"image": str(folder / "in.png"), "video": str(folder / "in.gif")}


def _request(name: str, inputs: dict[str, str]) -> Request:
    given = {"video": inputs["video"], "strength": STRENGTH} if "v2v" in name else {}
    given = given or {"image": inputs["image"]}
    if name.endswith(TRUE_CFG):
        given |= {"negative_prompt": "blurry", "true_cfg": 3.0}
    small = Request(prompt="a cat", steps=STEPS, height=32, width=32, **given)
    return small.merged(builtin_models()[name.removesuffix(TRUE_CFG)].defaults)


class _Calls:
    """Plain forward pre-hooks on every expert: which expert each denoiser call ran and at what
    timestep (no diffcache involved)."""

    def __init__(self, pipe: Any) -> None:
        self.seen: list[tuple[int, float]] = []
        experts = [m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m]
        self.handles = [
            m.register_forward_pre_hook(self._hook(e), with_kwargs=True)
            for e, m in enumerate(experts)
        ]

    def _hook(self, expert: int) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            self.seen.append((expert, float(kwargs["timestep"].flatten().max())))

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request: pytest.FixtureRequest, inputs: dict[str, str]) -> dict[str, Any]:
    """The model, its request, its plain output and its plain calls, grouped by step."""
    name = request.param
    pipe, req = load_model(name.removesuffix(TRUE_CFG)), _request(name, inputs)
    calls = _Calls(pipe)
    base = generate(pipe, req)
    calls.close()
    times = [t for _, t in calls.seen]
    starts = [i for i, t in enumerate(times) if i == 0 or t != times[i - 1]]
    branches = starts[1] if len(starts) > 1 else len(times)
    experts = [calls.seen[i][0] for i in starts]  # the expert of each step
    return {"name": name, "pipe": pipe, "req": req, "base": base, "branches": branches,
            "experts": experts, "calls": len(times)}  # fmt: skip


def _expert_starts(experts: list[int]) -> set[int]:
    """The steps where an expert runs for the first time."""
    return {k for k, e in enumerate(experts) if e not in experts[:k]}


def test_steps_are_the_steps_the_pipeline_runs(variant: dict[str, Any]) -> None:
    """Independently of diffcache: a video-to-video run runs int(steps x strength) steps, and
    the Wan2.2 run switches experts once, at the boundary."""
    name, experts = variant["name"], variant["experts"]
    want = int(STEPS * STRENGTH) if "v2v" in name else STEPS
    assert len(experts) == want and variant["calls"] == want * variant["branches"]
    # CFG: separate calls / batched / none
    separate = name.startswith(("wan", "qwenimage")) or name.endswith(TRUE_CFG)
    assert variant["branches"] == (2 if separate else 1)
    if name == "wan22-tiny-i2v":
        assert experts == sorted(experts) and experts[0] == 0 and experts[-1] == 1


def _plan(method: str, variant: dict[str, Any]) -> Any:
    pipe, req = variant["pipe"], variant["req"]
    if method == "easycache":
        family = find_adapter(pipe).family
        options = {"threshold": 1e6, "warmup_steps": 2}
        return {"diffcache": 1, "model": family, "method": method, "options": options}
    cfg = {
        "ertacache": ERTACacheConfig(time_adjust=False, threshold=1.0),
        "invardiff": InvarDiffConfig(nonskip_rate=0.2),
        "hyca": HyCaConfig(warmup_steps=2, interval=2),
    }[method]
    return diffcache.profile(pipe, cfg, ["a cat"], request=req)


def _blocks(name: str) -> int:
    """The tiny transformers have two blocks; HunyuanVideo's one dual- and two single-stream."""
    return 3 if name.startswith("hunyuanvideo") else 2


def _computed(method: str, plan: Any, experts: list[int], blocks: int) -> tuple[int, int]:
    """The work units one CFG branch computes under each method's rule, and all it has: whole
    steps, blocks (HyCa) or modules (InvarDiff); an expert's first steps have no state of their
    own, and never take the other expert's."""
    n, first = len(experts), _expert_starts(experts)
    if method == "easycache":  # warm-up, last step; an expert's first two (k needs two)
        return len({0, 1, n - 1} | first | {k + 1 for k in first if k + 1 < n}), n
    if method == "ertacache":  # the planned reuse, except where the expert has no residual
        reuse = set(schedule(plan.calibration_data, plan.config).reuse)
        return n - len(reuse - first), n
    if method == "hyca":
        return blocks * len({k for k in range(n) if plan.config.full(k)} | first), blocks * n
    book = plan.calibration_data.module_book  # (steps, modules of every expert, in order)
    per = book.shape[1] // (max(experts) + 1)
    planned = sum(
        per if k in first else int((~book[k, e * per : (e + 1) * per]).sum())
        for k, e in enumerate(experts)
    )
    return planned, per * n


@pytest.mark.parametrize("method", METHODS)
def test_each_method_counts_runs_and_removes_exactly(variant: dict[str, Any], method: str) -> None:
    pipe, req, experts = variant["pipe"], variant["req"], variant["experts"]
    plan = _plan(method, variant)
    diffcache.accelerate(pipe, plan)
    try:
        out = generate(pipe, req)
        s = diffcache.stats(pipe)
    finally:
        diffcache.remove(pipe)
    n, branches = len(experts), variant["branches"]
    assert s.steps == n and s.model_calls == n * branches
    assert [(k, b) for k, b, _ in s.calls] == [(k, b) for k in range(n) for b in range(branches)]
    computed, total = _computed(method, plan, experts, _blocks(variant["name"]))
    assert (s.computed, s.skipped) == (computed * branches, (total - computed) * branches)
    assert np.isfinite(out).all()
    assert clean(*[m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m])
    assert np.array_equal(generate(pipe, req), variant["base"]), "remove() is not bit-exact"


def test_steps_and_experts_in_the_trace(variant: dict[str, Any]) -> None:
    """A step is one pipeline step whichever expert runs it (Wan2.2): the trace's (step,
    branch, expert) of every call equals the plain run's expert per step."""
    pipe, experts, branches = variant["pipe"], variant["experts"], variant["branches"]
    diffcache.accelerate(pipe, _plan("easycache", variant), trace=True)
    try:
        generate(pipe, variant["req"])
        trace = diffcache.stats(pipe).trace
    finally:
        diffcache.remove(pipe)
    got = [(e["step"], e["branch"], e["expert"]) for e in trace]
    assert got == [(k, b, e) for k, e in enumerate(experts) for b in range(branches)]


def test_a_video_to_video_plan_is_valid_for_the_steps_run(inputs: dict[str, str]) -> None:
    """strength 0.5 of 6 steps runs 3: a plan for 3 steps runs, one for 6 is refused in one
    line naming both counts and strength (the call did set 6 steps), and the pipeline stays
    accelerated."""
    pipe, req = load_model("wan-tiny-v2v"), _request("wan-tiny-v2v", inputs)
    run = int(STEPS * STRENGTH)
    plan = {
        "diffcache": 1,
        "model": "wan2.1",
        "method": "easycache",
        "options": {"warmup_steps": 1},
    }
    diffcache.accelerate(pipe, {**plan, "valid_for": {"num_inference_steps": run}})
    try:
        generate(pipe, req)
        assert diffcache.stats(pipe).steps == run
    finally:
        diffcache.remove(pipe)
    diffcache.accelerate(pipe, {**plan, "valid_for": {"num_inference_steps": STEPS}})
    try:
        with pytest.raises(PlanError) as e:
            generate(pipe, req)
        assert f"num_inference_steps={STEPS} but this call runs {run} steps" in str(e.value)
        said = f"(strength runs {run} of its num_inference_steps={STEPS}); set "
        assert said + f"num_inference_steps and strength so that they run {STEPS}" in str(e.value)
        assert f"run with {STEPS} steps" not in str(e.value)
        assert "\n" not in str(e.value) and diffcache.is_accelerated(pipe)
    finally:
        diffcache.remove(pipe)


def test_profile_probes_see_the_latent_channels_only(inputs: dict[str, str]) -> None:
    """On Wan I2V the transformer input carries 20 image-condition channels after the 16
    latent ones: the step probes' input change is over the latent channels (research/dit.md,
    input semantics), as a plain hook on the transformer measures it."""
    from diffcache.adapter import Target
    from diffcache.methods.easycache import EasyCacheConfig
    from diffcache.profile import record_trace

    pipe, req = load_model("wan-tiny-i2v"), _request("wan-tiny-i2v", inputs)
    seen: list[torch.Tensor] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["hidden_states"].detach().clone()), with_kwargs=True
    )
    try:
        target = Target.resolve(find_adapter(pipe), pipe)
        trace, steps, _ = record_trace(pipe, target, EasyCacheConfig(), [req], False)
    finally:
        hook.remove()
    latent = [x[:, :16].float() for x in seen[0::2]]  # branch 0 of each step
    assert seen[0].shape[1] == 36 and steps == STEPS
    got = [r.values["in_change"] for r in trace.records if r.branch == 0 and r.kind == "step"]
    want = [(b - a).abs().mean().item() for a, b in zip(latent, latent[1:], strict=False)]
    assert got[0] is None and got[1:] == pytest.approx(want, rel=1e-6)


def _gif_frames(path: str) -> list[tuple[str, tuple[int, int]]]:
    return [(f.mode, f.size) for f in INPUT_VIDEO.load(path)]


def test_a_palette_gif_loads_as_rgb_frames(inputs: dict[str, str]) -> None:
    """imageio (and our own --out x.gif) writes a palette first frame: the frames reach the
    pipeline's video processor as RGB images of one size."""
    assert Image.open(inputs["video"]).mode == "P"
    assert _gif_frames(inputs["video"]) == [("RGB", (32, 32))] * 9


def test_cli_generates_image_to_video_and_refuses_a_missing_image(
    inputs: dict[str, str], tmp_path: Any, capsys: pytest.CaptureFixture
) -> None:
    """``--image`` feeds WanImageToVideoPipeline, and the family's bundled tiny plan applies
    (variants take their base family's plans); without ``--image``: one line, exit 2."""
    out, stats = tmp_path / "out.gif", tmp_path / "s.json"
    base = ["generate", "--model", "wan-tiny-i2v", "--prompt", "a cat", "--steps", "4"]
    small = ["--height", "32", "--width", "32", "--frames", "5"]
    plan = ["--plan", "wan2.1-tiny.yaml"]
    assert main([*base, *small, *plan, "--image", inputs["image"], "--out", str(out)]) == 2
    assert "num_inference_steps=20" in capsys.readouterr().err  # the plan is for 20 steps
    argv = [*base[:-1], "20", *small, *plan, "--image", inputs["image"], "--out", str(out)]
    assert main([*argv, "--stats-json", str(stats)]) == 0 and out.stat().st_size > 0
    s = json.loads(stats.read_text())
    assert (s["method"], s["steps"], s["model_calls"]) == ("easycache", 20, 40)
    capsys.readouterr()
    assert main([*base, *small, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "diffcache: error: --image is required for wan2.1-i2v models", err


def test_video_to_video_over_a_text_to_video_pipeline(inputs: dict[str, str]) -> None:
    """``wan.video_to_video`` shares the text-to-video pipeline's parts (the benchmark's V2V
    variant of wan-shapes); it runs int(steps x strength) steps under a method."""
    from diffcache.pipelines.wan import video_to_video

    t2v = load_model("wan2.1-tiny")
    pipe = video_to_video(t2v)
    assert type(pipe).__name__ == "WanVideoToVideoPipeline" and pipe.transformer is t2v.transformer
    req = Request(prompt="a cat", steps=STEPS, height=32, width=32, strength=STRENGTH)
    req = req.replace(video=inputs["video"], guidance=1.0)
    diffcache.accelerate(pipe, {"diffcache": 1, "model": "wan2.1", "method": "easycache"})
    try:
        generate(pipe, req)
        assert diffcache.stats(pipe).steps == int(STEPS * STRENGTH)
    finally:
        diffcache.remove(pipe)


def test_cli_video_to_video_plan_for_the_steps_run(
    inputs: dict[str, str], tmp_path: Any, capsys: pytest.CaptureFixture
) -> None:
    """``--steps 6 --strength 0.5`` runs 3 steps: a plan valid for 3 runs from the CLI (the
    flags' 6 is not compared with it), one valid for 6 is refused in one line before the model
    is built (the family's ``steps_run``: diffusers' video-to-video rounding)."""
    run, stats = int(STEPS * STRENGTH), tmp_path / "s.json"
    argv = ["generate", "--model", "cogvideox-tiny-v2v", "--prompt", "a cat", "--video"]
    argv += [inputs["video"], "--steps", str(STEPS), "--strength", str(STRENGTH)]
    argv += ["--height", "32", "--width", "32", "--out", str(tmp_path / "out.gif")]
    for steps in (run, STEPS):
        plan = diffcache.Plan.load(
            {"diffcache": 1, "model": "cogvideox", "method": "easycache",
             "options": {"warmup_steps": 1}, "valid_for": {"num_inference_steps": steps}}
        ).save(tmp_path / f"p{steps}.yaml")  # fmt: skip
        rc = main([*argv, "--plan", str(plan), "--stats-json", str(stats)])
        if steps == run:
            assert rc == 0 and json.loads(stats.read_text())["steps"] == run
        else:
            # (a library's import warning may precede it: issue 24.7's, not ours)
            err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("diffcache")]
            said = f"but steps {STEPS} at strength {STRENGTH:g} run {run}; set --steps"
            assert rc == 2 and len(err) == 1 and said in err[0], err


@pytest.mark.parametrize("interleave", [4, 2])  # as the pipeline: token-replace, 33-channel
def test_hunyuanvideo_i2v_crops_the_template_to_image_and_prompt(
    inputs: dict[str, str], interleave: int
) -> None:
    """The pipeline's fixed template positions hold on the tiny tokenizer: the Llava encoding
    it keeps is the image's 576 features (every ``interleave``-th) and the text after the
    template's system and user headers: the prompt's tokens and the assistant header's ending
    newlines, nothing of the system text."""
    pipe = load_model("hunyuanvideo-tiny-i2v")
    image = Image.open(inputs["image"]).convert("RGB")
    embeds, _, mask = pipe.encode_prompt(
        image=image, prompt="a red cat", device="cpu", image_embed_interleave=interleave
    )
    words = len(pipe.tokenizer("a red cat\n\n", add_special_tokens=False).input_ids)
    kept = 576 // interleave + words
    assert words == 4 and embeds.shape[1] == mask.shape[1] > kept
    assert mask[0].tolist() == [1.0] * kept + [0.0] * (mask.shape[1] - kept)


def test_cli_hunyuanvideo_image_to_video(
    inputs: dict[str, str], tmp_path: Any, capsys: pytest.CaptureFixture
) -> None:
    """``--image`` feeds HunyuanVideoImageToVideoPipeline: one transformer call per step under
    the family's method; without ``--image``: one line, exit 2."""
    out, stats = tmp_path / "out.gif", tmp_path / "s.json"
    argv = ["generate", "--model", "hunyuanvideo-tiny-i2v", "--prompt", "a cat", "--steps", "4"]
    argv += ["--height", "32", "--width", "32", "--frames", "5", "--out", str(out)]
    plan = tmp_path / "p.yaml"
    diffcache.Plan.load(
        {"diffcache": 1, "model": "hunyuanvideo", "method": "easycache",
         "options": {"warmup_steps": 1}}
    ).save(plan)  # fmt: skip
    rc = main([*argv, "--image", inputs["image"], "--plan", str(plan), "--stats-json", str(stats)])
    assert rc == 0 and out.stat().st_size > 0
    s = json.loads(stats.read_text())
    assert (s["method"], s["steps"], s["model_calls"]) == ("easycache", 4, 4)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == "diffcache: error: --image is required for hunyuanvideo-i2v models", err


def test_hunyuanvideo_i2v_negative_prompt_runs_true_cfg(inputs: dict[str, str]) -> None:
    """``negative_prompt`` + ``true_cfg`` reach HunyuanVideoImageToVideoPipeline as its own
    ``negative_prompt`` / ``true_cfg_scale``: the output is the pipeline's called with them,
    and another negative prompt changes it."""
    pipe = load_model("hunyuanvideo-tiny-i2v")
    req = Request(prompt="a cat", image=inputs["image"], steps=3, height=32, width=32, frames=5)
    cfg = req.replace(negative_prompt="blurry", true_cfg=3.0)
    direct = pipe(
        image=Image.open(inputs["image"]).convert("RGB"),
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


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--negative-prompt", "blurry"], "--negative-prompt needs --true-cfg above 1"),
        (["--negative-prompt", "blurry", "--true-cfg", "1"], "above 1 on hunyuanvideo-i2v models"
         " (--true-cfg 1)"),
        (["--true-cfg", "4.5"], "--true-cfg 4.5 needs --negative-prompt on hunyuanvideo-i2v"),
    ],
)  # fmt: skip
def test_cli_hunyuanvideo_i2v_negative_prompt_without_true_cfg_is_refused(
    inputs: dict[str, str], tmp_path: Any, capsys: pytest.CaptureFixture, monkeypatch, flags, error
) -> None:
    """The pipeline ignores a negative prompt unless true_cfg_scale > 1 (and the scale without
    one): one line before the model is built."""

    def built(name: str) -> None:
        raise AssertionError(f"{name} was built")

    monkeypatch.setattr(diffcache, "load_model", built)
    argv = ["generate", "--model", "hunyuanvideo-tiny-i2v", "--prompt", "a cat"]
    argv += ["--image", inputs["image"], "--out", str(tmp_path / "o.gif"), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffcache: error: ") and error in err[0], err


def test_qwenimage_edit_keeps_the_image_and_the_prompt(inputs: dict[str, str]) -> None:
    """The edit pipeline drops its template's system part (64 tokens) from the Qwen2.5-VL
    encoding: what is left is the image's vision tokens (4 at 56 x 56 pixels, 2 x 2 merged
    patches of 14) and the template's tail with the prompt; built without torchvision."""
    import importlib.util

    pipe = load_model("qwenimage-tiny-edit")
    template = pipe.prompt_template_encode
    tail = template[template.index("<|vision_start|>") :].format("a red cat")
    image = Image.open(inputs["image"]).convert("RGB")
    embeds, mask = pipe.encode_prompt(prompt="a red cat", image=image, device="cpu")
    want = len(pipe.tokenizer(tail).input_ids) - 1 + (56 // 14) ** 2 // 4  # 1 image pad -> 4
    assert embeds.shape[1] == want and (mask is None or mask.all())  # None: all kept
    assert importlib.util.find_spec("torchvision") is None


def test_cli_qwenimage_edit(
    inputs: dict[str, str], tmp_path: Any, capsys: pytest.CaptureFixture
) -> None:
    """``--image`` feeds QwenImageEditPipeline under a Qwen-Image plan (two calls a step: true
    CFG); without ``--image``: one line, exit 2, before the model is built."""
    out, stats = tmp_path / "out.png", tmp_path / "s.json"
    argv = ["generate", "--model", "qwenimage-tiny-edit", "--prompt", "a cat", "--steps", "4"]
    argv += ["--height", "32", "--width", "32", "--out", str(out)]
    plan = tmp_path / "p.yaml"
    diffcache.Plan.load(
        {"diffcache": 1, "model": "qwenimage", "method": "easycache",
         "options": {"warmup_steps": 1}}
    ).save(plan)  # fmt: skip
    rc = main([*argv, "--image", inputs["image"], "--plan", str(plan), "--stats-json", str(stats)])
    assert rc == 0 and np.asarray(Image.open(out)).shape == (32, 32, 3)
    s = json.loads(stats.read_text())
    assert (s["method"], s["steps"], s["model_calls"]) == ("easycache", 4, 8)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == "diffcache: error: --image is required for qwenimage-edit models", err
