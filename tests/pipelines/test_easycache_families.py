"""EasyCache at the whole-transformer step site on every family's tiny model: the exact
(step, branch) sequence RunState sees with CFG on and off, identity == baseline, remove() is
bit-exact, an aggressive plan skips and stays finite, two calls agree."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import diffcache
from diffcache.generate import Request, generate, pipeline_kwargs
from diffcache.models import builtin_models, load_model
from diffcache.registry import adapters
from diffcache.testing.toys import clean

TINY = sorted(  # the diffusers (latent) families; text and next-scale models have their own tests
    n
    for n, e in builtin_models().items()
    if n.endswith("-tiny") and adapters()[e.family].provides.denoiser == "latent"
)
STEPS = 5
# (extra pipeline keywords, branches per step) with CFG on / off. Flux and HunyuanVideo are
# guidance-distilled (one call); their optional true CFG runs separate cond / uncond calls.
TRUE_CFG = {"true_cfg_scale": 3.0, "negative_prompt": "blurry"}
CFG_CASES: dict[str, dict[str, tuple[dict, dict, tuple[int, ...]]]] = {
    "wan2.1": {"on": ({}, {"guidance": 5.0}, (0, 1)), "off": ({}, {"guidance": 1.0}, (0,))},
    "qwenimage": {"on": ({}, {"guidance": 4.0}, (0, 1)), "off": ({}, {"guidance": 1.0}, (0,))},
    "flux": {"on": (TRUE_CFG, {}, (0, 1)), "off": ({}, {}, (0,))},
    "hunyuanvideo": {"on": (TRUE_CFG, {}, (0, 1)), "off": ({}, {}, (0,))},
    "dit": {"on": ({}, {"guidance": 4.0}, (0,)), "off": ({}, {"guidance": 1.0}, (0,))},
    "cogvideox": {"on": ({}, {"guidance": 6.0}, (0,)), "off": ({}, {"guidance": 1.0}, (0,))},
}


@pytest.fixture(scope="module", params=TINY)
def model(request: pytest.FixtureRequest) -> tuple[str, Any]:
    return request.param, load_model(request.param)


def _plan(family: str, **options: Any) -> dict:
    return {"diffcache": 1, "model": family, "method": "easycache", "options": options}


def _run(pipe: Any, name: str, extra: dict, fields: dict) -> np.ndarray:
    entry = builtin_models()[name]
    req = Request(
        prompt=None if entry.family == "dit" else "a cat surfing", steps=STEPS, **fields
    ).merged(entry.defaults)
    if not extra:
        return generate(pipe, req)
    kwargs = pipeline_kwargs(pipe, req) | extra
    out = pipe(**kwargs)
    return np.asarray(out.frames[0] if hasattr(out, "frames") else out.images[0])


@pytest.mark.parametrize("cfg", ["on", "off"])
def test_step_branch_sequence_and_identity(model: tuple[str, Any], cfg: str) -> None:
    name, pipe = model
    family = builtin_models()[name].family
    extra, fields, branches = CFG_CASES[family][cfg]
    base = _run(pipe, name, extra, fields)
    diffcache.accelerate(pipe, _plan(family, threshold=0.0))
    try:
        same = _run(pipe, name, extra, fields)
        s = diffcache.stats(pipe)
    finally:
        diffcache.remove(pipe)
    seen = [(step, b) for step, b, _ in s.calls]
    assert seen == [(i, b) for i in range(STEPS) for b in branches], f"{name} cfg {cfg}: {seen}"
    assert s.skipped == 0 and np.array_equal(same, base), f"{name}: identity differs"
    assert clean(pipe.transformer, pipe.scheduler)
    assert np.array_equal(_run(pipe, name, extra, fields), base), f"{name}: remove() not exact"


def test_aggressive_skips_and_repeats(model: tuple[str, Any]) -> None:
    name, pipe = model
    family = builtin_models()[name].family
    extra, fields, _ = CFG_CASES[family]["on"]
    diffcache.accelerate(pipe, _plan(family, threshold=1e6, warmup_steps=2))
    try:
        first = _run(pipe, name, extra, fields)
        s = diffcache.stats(pipe)
        second = _run(pipe, name, extra, fields)
    finally:
        diffcache.remove(pipe)
    # warm-up 2 and the last step computed; the two steps between are reused
    assert s.per_step() == [1.0, 1.0, 0.0, 0.0, 1.0], f"{name}: {s.per_step()}"
    assert np.isfinite(first).all() and np.array_equal(first, second)


def test_bundled_plan_runs(model: tuple[str, Any]) -> None:
    name, pipe = model
    diffcache.accelerate(pipe, f"{name}.yaml")
    try:
        media = generate(
            pipe,
            Request(prompt=None if "dit" in name else "a cat surfing").merged(
                builtin_models()[name].defaults
            ),
        )
        s = diffcache.stats(pipe)
    finally:
        diffcache.remove(pipe)
    assert s.steps == 20 and 0 < s.compute_fraction < 1 and np.isfinite(media).all()
