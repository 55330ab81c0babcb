"""The built-in tiny pipelines: deterministic builds, stock generation, adapters, models.yaml."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

import diffcache.pipelines  # noqa: F401  (registers the family adapters)
from diffcache.adapter import Target
from diffcache.generate import Request, call_kwargs
from diffcache.models import model_entry
from diffcache.registry import adapters, find_adapter

MODELS_YAML = Path(importlib.import_module("diffcache.profiles").__file__).parent / "models.yaml"
MODELS: dict[str, dict[str, Any]] = yaml.safe_load(MODELS_YAML.read_text())
TINY = sorted(  # the diffusers (latent) families; text and next-scale ones have their own tests
    n
    for n, e in MODELS.items()
    if n.endswith("-tiny") and adapters()[e["family"]].provides.denoiser == "latent"
)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# Denoiser calls per step and latent batch per call with CFG on, by the adapter's cfg style.
CALLS = {"separate": (2, 1), "batched": (1, 2), "none": (1, 1)}


def _builder(spec: str) -> Any:
    module, func = spec.split(":")
    return getattr(importlib.import_module(module), func)


def _modules(pipe: Any) -> dict[str, torch.nn.Module]:
    return {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


def _request(name: str, steps: int) -> dict[str, Any]:
    """The model's defaults as pipeline keywords, with a prompt and ``steps`` steps."""
    entry = MODELS[name]
    adapter = adapters()[entry["family"]]
    prompt = "a cat surfing" if adapter.field("prompt") else None
    request = Request(prompt=prompt, steps=steps).merged(entry["defaults"])
    return call_kwargs(adapter.fields, request)


@pytest.fixture(scope="module", params=TINY)
def built(request: pytest.FixtureRequest) -> tuple[str, Any, Any]:
    """(model name, pipeline, a second build of it), built once per module."""
    build = _builder(MODELS[request.param]["builder"])
    rng = torch.random.get_rng_state()
    first, second = build(), build()
    assert torch.equal(rng, torch.random.get_rng_state()), "builder moved the global RNG"
    for pipe in (first, second):
        pipe.set_progress_bar_config(disable=True)
    return request.param, first, second


def test_builds_are_bit_identical(built: tuple[str, Any, Any]) -> None:
    _, first, second = built
    a, b = _modules(first), _modules(second)
    assert a.keys() == b.keys() and "transformer" in a
    for key, module in a.items():
        other = dict(b[key].named_parameters())
        params = list(module.named_parameters())
        for pname, p in params[:3] + params[-3:]:
            assert torch.equal(p, other[pname]), f"{key}.{pname} differs between builds"


def test_adapter_matches_pipeline_and_denoiser(built: tuple[str, Any, Any]) -> None:
    name, pipe, _ = built
    adapter = adapters()[MODELS[name]["family"]]
    assert find_adapter(pipe) is adapter
    denoiser = getattr(pipe, adapter.experts[0])
    assert find_adapter(denoiser) is adapter
    assert Target.resolve(adapter, pipe).experts == [denoiser]
    assert Target.resolve(adapter, denoiser).pipe is None
    forward = inspect.signature(denoiser.forward).parameters
    assert adapter.latent_arg in forward and adapter.timestep_arg in forward
    children = [n for n, _ in denoiser.named_children()]
    stacks = [s.attr for s in adapter.stacks]
    for attr in stacks:
        assert isinstance(getattr(denoiser, attr), torch.nn.ModuleList), attr
    assert sorted(stacks, key=children.index) == stacks


def test_sites_resolve_to_the_named_modules(built: tuple[str, Any, Any]) -> None:
    """Every stack and every module the adapter names exists, with the declared structure."""
    name, pipe, _ = built
    adapter = adapters()[MODELS[name]["family"]]
    target = Target.resolve(adapter, pipe)
    blocks, modules = target.sites("block"), target.sites("module")
    expect_blocks = sum(len(getattr(pipe.transformer, s.attr)) for s in adapter.stacks)
    assert len(blocks) == expect_blocks > 0
    per_block = {s.attr: len(s.modules) for s in adapter.stacks}
    assert len(modules) == sum(per_block[b.stack.attr] for b in blocks)
    block_of = {(b.stack.attr, b.index): b.module for b in blocks}
    for site in modules:
        assert site.module is getattr(block_of[site.stack.attr, site.index], site.spec.attr)
        assert site.name == f"transformer.{site.stack.attr}.{site.index}.{site.spec.attr}"


def test_call_args_exist_in_pipeline_signature(built: tuple[str, Any, Any]) -> None:
    name, pipe, _ = built
    adapter = adapters()[MODELS[name]["family"]]
    params = inspect.signature(type(pipe).__call__).parameters
    missing = [f.call_arg for f in adapter.fields if f.call_arg not in params]
    assert not missing, f"{type(pipe).__name__}.__call__ lacks {missing}"


def test_two_step_generation(built: tuple[str, Any, Any]) -> None:
    """Stock pipeline, CFG as in the defaults: finite output, and the adapter's cfg style,
    latent argument and channel axis agree with what the denoiser actually receives."""
    name, pipe, _ = built
    entry = MODELS[name]
    adapter = adapters()[entry["family"]]
    target = Target.resolve(adapter, pipe)
    denoiser, index = target.denoiser, target.arg_index(adapter.latent_arg)
    seen: list[tuple[int, int, int]] = []  # (batch, in channels, out channels)

    def pre_hook(module: Any, args: tuple, kwargs: dict) -> None:
        latent = kwargs.get(adapter.latent_arg, args[index] if index < len(args) else None)
        assert latent is not None and adapter.timestep_arg in kwargs
        seen.append((latent.shape[0], latent.shape[adapter.channel_dim], -1))

    def post_hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output.sample
        seen[-1] = (*seen[-1][:2], out.shape[adapter.channel_dim])

    handles = [
        denoiser.register_forward_pre_hook(pre_hook, with_kwargs=True),
        denoiser.register_forward_hook(post_hook, with_kwargs=True),
    ]
    try:
        result = pipe(
            **_request(name, 2), output_type="np", generator=torch.Generator().manual_seed(0)
        )
    finally:
        for handle in handles:
            handle.remove()

    out = np.asarray(result.frames if adapter.media == "video" else result.images)
    defaults = entry["defaults"]
    if "height" in defaults:
        h, w = defaults["height"], defaults["width"]
    else:  # DiT: fixed latent size times the VAE factor
        h = w = denoiser.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    shape = (1, defaults["frames"], h, w, 3) if adapter.media == "video" else (1, h, w, 3)
    assert out.shape == shape and np.isfinite(out).all()

    calls, batch = CALLS[adapter.cfg]
    assert len(seen) == 2 * calls, seen
    channels = seen[0][1]
    sigma = 2 if adapter.name == "dit" else 1  # DiT also predicts the variance (learned sigma)
    assert set(seen) == {(batch, channels, sigma * channels)}, seen
    assert channels == denoiser.config.in_channels


@pytest.mark.parametrize("name", ["hunyuanvideo-tiny", "qwenimage-tiny"])
def test_template_crop_lands_on_the_prompt(name: str) -> None:
    """The pipelines drop a fixed number of template tokens; our tokenizers must match it."""
    from diffcache.pipelines._tiny import template_prefix_length

    pipe = _builder(MODELS[name]["builder"])()
    if name.startswith("hunyuan"):
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import (
            DEFAULT_PROMPT_TEMPLATE as template,
        )

        text, drop = template["template"], template["crop_start"]
    else:
        text, drop = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx
    assert template_prefix_length(pipe.tokenizer, text) == drop
    ids = pipe.tokenizer(text.format("a cat surfing")).input_ids
    assert pipe.tokenizer.convert_ids_to_tokens(ids[drop : drop + 3]) == ["a", "cat", "surfing"]


def test_prompt_words_are_in_vocabulary(built: tuple[str, Any, Any]) -> None:
    _, pipe, _ = built
    for key in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(pipe, key, None)
        if tokenizer is not None:
            assert tokenizer.unk_token_id not in tokenizer("a cat surfing").input_ids


def test_models_yaml_entries() -> None:
    assert {"wan2.1-tiny", "wan2.1-1.3b-random", "dit-tiny"} <= MODELS.keys()
    for name, entry in MODELS.items():
        required = {"family", "builder", "description", "defaults"}
        assert required <= set(entry) <= required | {"scorer", "prompts", "calibration"}, name
        if "calibration" in entry:  # calibration inputs are never evaluation inputs
            model = model_entry(name)
            own = set(model.calibration_prompts())
            assert own and not own & set(model.default_prompts() or ()), name
        adapter = adapters()[entry["family"]]
        assert callable(_builder(entry["builder"])), name
        unknown = set(entry["defaults"]) - {f.name for f in adapter.fields}
        assert not unknown, f"{name}: defaults {sorted(unknown)} not in {adapter.name} fields"
        if adapter.media == "text":
            continue
        if name not in ("dit-digits-8step", "wan-shapes-8step"):  # guidance distilled in
            assert entry["defaults"]["guidance"] > 1, f"{name}: guidance should be on by default"
        # random-weight models get a negative prompt; trained ones (a scorer) keep the empty
        # prompt they were trained to use as the unconditional branch
        if adapter.cfg == "separate" and adapter.field("negative_prompt") and "scorer" not in entry:
            assert entry["defaults"].get("negative_prompt"), name


def test_a_variant_builder_is_its_class_on_the_tiny_build_of_the_seed() -> None:
    """``on_tiny`` builds (FLUX img2img): the variant class, holding exactly the modules of the
    family's tiny build of the same seed; another seed gives other weights."""
    from diffcache.pipelines import flux

    pipe, base = flux.build_img2img(3), flux.build_tiny(3)
    assert type(pipe).__name__ == "FluxImg2ImgPipeline"
    mine, theirs = _modules(pipe), _modules(base)
    assert mine.keys() == theirs.keys()
    for name, module in theirs.items():
        got = mine[name].state_dict()
        for key, value in module.state_dict().items():
            assert torch.equal(value, got[key]), f"{name}.{key}"
    other = flux.build_img2img(4).transformer.state_dict()
    assert any(not torch.equal(a, other[k]) for k, a in pipe.transformer.state_dict().items())


@pytest.mark.slow
def test_wan_1_3b_random_forward(request: pytest.FixtureRequest) -> None:
    """Real-size Wan2.1-1.3B (random weights): one transformer forward on a tiny latent."""
    expr = request.config.option.markexpr or ""
    if "slow" not in expr or "not slow" in expr:
        pytest.skip("real-size build (~25 s, 6 GB); run with -m slow")
    from diffcache.pipelines.wan import WAN_1_3B_CONFIG, build_1_3b_random

    pipe = build_1_3b_random()
    assert find_adapter(pipe).name == "wan2.1"
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    assert 1.3e9 < n_params < 1.5e9
    for key, value in WAN_1_3B_CONFIG.items():
        got = pipe.transformer.config[key]
        assert (tuple(got) if isinstance(got, list) else got) == value, key
    with torch.no_grad():
        text, _ = pipe.encode_prompt(
            "a cat surfing", do_classifier_free_guidance=False, max_sequence_length=16
        )
        assert text.shape == (1, 16, 4096)
        latent = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(0))
        out = pipe.transformer(
            hidden_states=latent,
            timestep=torch.tensor([500]),
            encoder_hidden_states=text,
            return_dict=False,
        )[0]
    assert out.shape == latent.shape and torch.isfinite(out).all()
