"""Adapter capabilities against method needs: a model whose adapter lacks something a method
needs is refused at ``accelerate`` (and ``profile``) with the missing capability named, before
anything is attached; whether a method runs depends on what the adapter provides, not its name."""

from __future__ import annotations

import dataclasses
import re

import pytest

import diffcache
from diffcache.adapter import Adapter, Capabilities, Target
from diffcache.errors import UnsupportedModelError
from diffcache.registry import methods
from diffcache.sites import Stack
from diffcache.testing.toys import TOY, ToyPipeline, clean, plan_for
from diffcache.testing.toys_seq import toy_scale_pipeline, toy_text_pipeline

LATENT = "needs a latent denoiser but toy-text's adapter provides a masked-token denoiser"
POSITION = "needs a kv store (position) but toy's adapter provides none"
HISTORY = "needs a kv store (history) but toy-text's adapter provides none"
MODULES = "needs module sites but toy-text's adapter provides none"
#: the toy DiT's adapter, declaring a position-indexed KV store as well
WITH_STORE = dataclasses.replace(
    TOY, name="toy-store", provides=dataclasses.replace(TOY.provides, kv_store="position")
)

#: every registered method, the toy family lacking one of its needs, and the refusal's reasons
REFUSED = {
    "easycache": ("toy-text", [f"easycache {LATENT}"]),
    "ertacache": ("toy-text", [f"ertacache {LATENT}"]),
    "hyca": ("toy-text", [f"hyca {LATENT}"]),
    "invardiff": ("toy-text", [f"invardiff {MODULES}", f"invardiff {LATENT}"]),
    "toy_blocks": ("toy-text", [f"toy_blocks {LATENT}"]),
    "toy_modules": ("toy-text", [f"toy_modules {MODULES}", f"toy_modules {LATENT}"]),
    "toy_static": ("toy-text", [f"toy_static {LATENT}"]),
    "toy_budget": (
        "toy-text",
        ["toy_budget needs a kv store (history) but toy-text's adapter provides none"],
    ),
    "dkv_cache": ("toy", [f"dkv_cache {POSITION}"]),
    **{m: ("toy-text", [f"{m} {HISTORY}"]) for m in ("h2o", "snapkv", "streaming", "pyramidkv")},
    "scalekv": ("toy-text", [f"scalekv {HISTORY}"]),
    "hack": ("toy-text", [f"hack {HISTORY}"]),
    "fast_dllm": ("toy", [f"fast_dllm {POSITION}"]),
    "elastic_cache": ("toy", [f"elastic_cache {POSITION}"]),
    "d2cache": ("toy", [f"d2cache {POSITION}"]),
    "toy_kv": (
        "toy",
        [
            "toy_kv needs attention sites but toy's adapter provides none",
            "toy_kv needs a masked-token denoiser but toy's adapter provides a latent denoiser",
        ],
    ),
}


def test_every_method_has_a_refusal_case() -> None:
    assert sorted(REFUSED) == sorted(methods())


def _plan(method: str, model: str) -> object:
    """A plan of ``method`` for ``model``; a calibrated method's is profiled on the toy DiT
    (where it runs) and then named for ``model``, so that only its needs can refuse it."""
    config = methods()[method]()
    if config.calibration is None:
        return {"diffcache": 1, "model": model, "method": method, "valid_for": {}}
    if method == "hack":  # head classes are measured on a next-scale model: one layer, 2 heads
        plan = {"diffcache": 1, "model": model, "method": method, "valid_for": {}}
        return {**plan, "calibration": {"classes": [[0, 1]]}}
    if method == "ertacache":  # the toy's scheduler is not the flow-matching Euler one
        config = dataclasses.replace(config, time_adjust=False)
    made = plan_for(ToyPipeline(), config, num_inference_steps=6)
    return dataclasses.replace(made, model=model, valid_for={})


@pytest.mark.parametrize("method", sorted(REFUSED))
def test_a_method_is_refused_at_accelerate_naming_what_the_model_lacks(method: str) -> None:
    model, reasons = REFUSED[method]
    pipe = toy_text_pipeline() if model == "toy-text" else ToyPipeline()
    plan = _plan(method, model)
    owner = type(pipe).__name__
    message = f"method '{method}' cannot run on {owner}:\n  - " + "\n  - ".join(reasons)
    with pytest.raises(UnsupportedModelError, match=f"^{re.escape(message)}$"):
        diffcache.accelerate(pipe, plan)
    assert not diffcache.is_accelerated(pipe)
    if model == "toy-text":
        parts = [pipe.model, *pipe.model.layers]
    else:
        parts = [pipe.transformer, *pipe.transformer.blocks, pipe.scheduler]
    assert clean(pipe, *parts), "nothing attached"


@pytest.mark.parametrize("method", ["easycache", "toy_blocks"])
def test_a_latent_method_is_refused_by_a_next_scale_model_it_used_to_fail_inside(method) -> None:
    """An image model that is no latent denoiser: media alone let these methods attach, and the
    first generation failed mid-run; now the refusal names the denoiser kind, and the model
    still runs plain."""
    pipe = toy_scale_pipeline()
    base = pipe("a cat")
    plan = {"diffcache": 1, "model": "toy-scale", "method": method, "valid_for": {}}
    message = (
        f"method '{method}' cannot run on ToyScalePipeline:\n  - {method} needs a latent "
        "denoiser but toy-scale's adapter provides a next-scale denoiser"
    )
    with pytest.raises(UnsupportedModelError, match=f"^{re.escape(message)}$"):
        diffcache.accelerate(pipe, plan)
    assert clean(pipe, pipe.model, *pipe.model.layers)
    assert all(a.equal(b) for a, b in zip(pipe("a cat").scales, base.scales, strict=True))


def test_a_toy_adapter_providing_a_kv_store_is_accepted_by_the_text_methods() -> None:
    """The same toy DiT, under an adapter that declares a position store, is no longer refused
    by the text methods: what they check is the capability, not the family's name."""
    plain = Target.resolve(TOY, ToyPipeline())
    store = Target.resolve(WITH_STORE, ToyPipeline())
    for method in ("dkv_cache", "fast_dllm", "elastic_cache", "d2cache"):
        config = methods()[method]()
        assert config.not_supported_reasons(plain) == [f"{method} {POSITION}"]
        assert config.not_supported_reasons(store) == []


def test_own_reasons_are_asked_only_once_the_needs_are_met() -> None:
    """fast_dllm's own reason (threshold with factor) shows on a model with its needs; on one
    without, only the missing capability is named."""
    config = methods()["fast_dllm"](threshold=0.9, factor=1.0)
    assert config.not_supported_reasons(Target.resolve(WITH_STORE, ToyPipeline())) == [
        "fast_dllm: give threshold or factor, not both"
    ]
    assert config.not_supported_reasons(Target.resolve(TOY, ToyPipeline())) == [
        f"fast_dllm {POSITION}"
    ]


def test_an_adapter_declares_the_block_and_module_sites_its_stacks_give() -> None:
    with pytest.raises(AssertionError, match="toy-flat: block sites and stacks"):
        Adapter("toy-flat", (), (), provides=Capabilities(("step", "block"), denoiser="latent"))
    with pytest.raises(AssertionError, match="toy-flat: module sites and stack modules"):
        Adapter("toy-flat", (), (), stacks=(Stack("blocks"),), provides=TOY.provides)
    with pytest.raises(AssertionError, match="not in"):
        Capabilities(("step", "heads"))


def test_a_method_that_declares_no_needs_is_not_registered() -> None:
    from typing import ClassVar

    from diffcache.methods.base import MethodConfig
    from diffcache.registry import register_method

    @dataclasses.dataclass(frozen=True)
    class Needless(MethodConfig):
        name: ClassVar[str] = "needless"
        granularity: ClassVar[str] = "step"

        @classmethod
        def identity(cls) -> Needless:
            return cls()

        @classmethod
        def aggressive(cls) -> Needless:
            return cls()

    with pytest.raises(TypeError, match="^method 'needless' must define needs$"):
        register_method(Needless)(lambda session, config: None)
    assert "needless" not in methods()
