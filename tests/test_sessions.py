"""Sessions on real tiny pipelines: offloading in either order, user hooks, deep copies, a
second-order scheduler, two experts (Wan2.2), state released at the end of a run, and block /
module sites counted exactly."""

from __future__ import annotations

import copy
import os
import pickle
from typing import Any

import numpy as np
import pytest
import torch

import diffcache
from diffcache.api import session_of
from diffcache.errors import DiffCacheError
from diffcache.generate import Request, generate
from diffcache.models import builtin_models, load_model
from diffcache.registry import adapters
from diffcache.testing.toys import ToyModulesConfig, clean

EASY = {"diffcache": 1, "model": "wan2.1", "method": "easycache"}
AGGRESSIVE = {**EASY, "options": {"threshold": 1e6, "warmup_steps": 2}}
REQ = Request(prompt="a cat", height=32, width=32, frames=5, steps=6, guidance=3.0)


@pytest.fixture(scope="module")
def wan() -> Any:
    return load_model("wan2.1-tiny")


def _run(pipe: Any, req: Request = REQ) -> np.ndarray:
    return generate(pipe, req)


@pytest.mark.parametrize("offload_first", [True, False], ids=["offload-first", "offload-after"])
def test_caching_survives_model_cpu_offload(offload_first: bool) -> None:
    pipe = load_model("wan2.1-tiny")
    plain = _run(pipe)
    if offload_first:
        pipe.enable_model_cpu_offload(device="cpu")
        diffcache.accelerate(pipe, AGGRESSIVE)
    else:
        diffcache.accelerate(pipe, AGGRESSIVE)
        pipe.enable_model_cpu_offload(device="cpu")
    outs = []
    for call in range(3):  # diffusers re-installs its offload hooks after every call
        outs.append(_run(pipe))
        s = diffcache.stats(pipe)
        assert s.skipped > 0 and s.per_step()[2:4] == [0.0, 0.0], f"call {call}: {s.per_step()}"
    assert np.array_equal(outs[0], outs[2]) and not np.array_equal(outs[0], plain)
    diffcache.remove(pipe)
    assert hasattr(pipe.transformer, "_hf_hook"), "offloading must stay installed"
    assert np.array_equal(_run(pipe), plain)
    assert hasattr(pipe.transformer, "_hf_hook")
    assert clean(pipe.transformer, exact=False) and clean(pipe.scheduler)


@pytest.mark.parametrize("user_first", [True, False], ids=["user-first", "user-after"])
def test_user_forward_hooks_keep_working(wan: Any, user_first: bool) -> None:
    seen: list[int] = []

    def hook(module, args, output):
        seen.append(1)

    if user_first:
        handle = wan.transformer.register_forward_hook(hook)
        diffcache.accelerate(wan, AGGRESSIVE)
    else:
        diffcache.accelerate(wan, AGGRESSIVE)
        handle = wan.transformer.register_forward_hook(hook)
    _run(wan)
    assert len(seen) == 12, "the user's hook sees every call, computed or reused"
    diffcache.remove(wan)
    _run(wan)
    handle.remove()
    assert len(seen) == 24 and clean(wan.transformer)


def test_deepcopy_of_an_accelerated_pipeline_is_plain_and_owns_its_weights(wan: Any) -> None:
    diffcache.accelerate(wan, AGGRESSIVE)
    try:
        twin = copy.deepcopy(wan)
        assert not diffcache.is_accelerated(twin)
        assert clean(twin.transformer, twin.scheduler, exact=False)
        assert twin.transformer.forward.__self__ is twin.transformer
        with torch.no_grad():
            for p in twin.transformer.proj_out.parameters():
                p.zero_()
        twin_out = _run(twin)
        assert twin.transformer is not wan.transformer
        assert not np.array_equal(twin_out, _run(wan)), "the copy must run its own weights"
        with pytest.raises(DiffCacheError, match="remove"):
            pickle.dumps(wan.transformer)
        with pytest.raises(DiffCacheError, match="remove"):
            pickle.dumps(wan)
    finally:
        diffcache.remove(wan)
    pickle.dumps(wan.transformer)  # plain again


def test_second_order_scheduler_counts_user_steps() -> None:
    """Heun: 4 steps are 7 model calls; Stats and valid_for see 4 steps with sub-steps."""
    from diffusers import HeunDiscreteScheduler

    pipe = load_model("dit-tiny")
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    req = Request(class_label=1, steps=4, guidance=4.0)
    plain = _run(pipe, req)
    plan = {
        **EASY,
        "model": "dit",
        "options": {"threshold": 0.0, "warmup_steps": 0},
        "valid_for": {"num_inference_steps": 4, "scheduler": "HeunDiscreteScheduler"},
    }
    diffcache.accelerate(pipe, plan)
    same = _run(pipe, req)
    s = diffcache.stats(pipe)
    assert s.steps == 4 and s.model_calls == 7
    assert [(step, b) for step, b, _ in s.calls] == [(0, 0)] * 2 + [(1, 0)] * 2 + [(2, 0)] * 2 + [
        (3, 0)
    ]
    assert np.array_equal(same, plain)
    diffcache.remove(pipe)


def test_two_experts_are_both_cached_with_their_own_state() -> None:
    """Wan2.2: ``transformer`` for high noise, ``transformer_2`` below the boundary."""
    from diffusers import WanPipeline

    from diffcache.pipelines.wan import build_tiny

    a, b = build_tiny(seed=0), build_tiny(seed=1)
    pipe = WanPipeline(
        tokenizer=a.tokenizer,
        text_encoder=a.text_encoder,
        vae=a.vae,
        scheduler=a.scheduler,
        transformer=a.transformer,
        transformer_2=b.transformer,
        boundary_ratio=0.5,
    )
    pipe.set_progress_bar_config(disable=True)
    plain = _run(pipe)
    experts: list[str] = []
    for name in ("transformer", "transformer_2"):
        getattr(pipe, name).register_forward_pre_hook(lambda m, a, n=name: experts.append(n))
    diffcache.accelerate(pipe, {**EASY, "options": {"threshold": 0.0, "warmup_steps": 0}})
    assert np.array_equal(_run(pipe), plain), "identity over two experts"
    s = diffcache.stats(pipe)
    assert s.steps == 6 and s.model_calls == 12 and s.computed == 12
    assert set(experts) == {"transformer", "transformer_2"}
    diffcache.remove(pipe)
    diffcache.accelerate(pipe, AGGRESSIVE)
    _run(pipe)
    per_step = diffcache.stats(pipe).per_step()
    switch = experts[:12].index("transformer_2") // 2  # first step of the second expert
    assert per_step[switch] == 1.0, "a new expert has no residual yet: it computes"
    assert 0.0 in per_step[:switch] or 0.0 in per_step[switch + 1 :]
    diffcache.remove(pipe)
    assert clean(pipe.transformer, pipe.transformer_2, pipe.scheduler)


def test_an_error_in_the_denoiser_releases_the_run(wan: Any) -> None:
    """An exception (or Ctrl-C) inside a denoiser call ends the run: no cached tensor is held
    until the next call, and the next call runs as planned."""
    diffcache.accelerate(wan, AGGRESSIVE)
    calls = []

    def fail_at_step_1(*args: Any) -> None:
        calls.append(1)
        if len(calls) == 3:  # CFG: the cond call of step 1, with step 0's residuals cached
            raise KeyboardInterrupt

    handle = wan.transformer.blocks[0].register_forward_pre_hook(fail_at_step_1)
    try:
        with pytest.raises(KeyboardInterrupt):
            _run(wan)
        run = session_of(wan).run
        assert not run.active and run._slots == {}  # no method state of the run is held
        handle.remove()
        _run(wan)
        assert diffcache.stats(wan).skipped > 0
    finally:
        handle.remove()
        diffcache.remove(wan)


def test_nothing_of_a_call_is_kept_after_it_returns(wan: Any) -> None:
    diffcache.accelerate(wan, AGGRESSIVE)
    try:
        _run(wan)
        run = session_of(wan).run
        assert not run.active and run._slots == {}  # no method state of the run is held
        assert diffcache.stats(wan).skipped > 0, "Stats stay after the run"
    finally:
        diffcache.remove(wan)


def test_kernel_override_is_checked_at_accelerate(wan: Any, monkeypatch) -> None:
    monkeypatch.setitem(os.environ, "DIFFCACHE_KERNELS", "bogus")
    with pytest.raises(DiffCacheError, match=r"DIFFCACHE_KERNELS='bogus'.*'auto', 'torch'"):
        diffcache.accelerate(wan, AGGRESSIVE)
    assert clean(wan.transformer, wan.scheduler) and not diffcache.is_accelerated(wan)


def test_remove_and_stats_of_other_objects() -> None:
    thing = object()
    assert diffcache.remove(thing) is thing and not diffcache.is_accelerated(thing)
    with pytest.raises(DiffCacheError, match="not accelerated"):
        diffcache.stats(thing)


TINY = sorted(  # the diffusers (latent) families; text and next-scale models have their own tests
    n
    for n, e in builtin_models().items()
    if n.endswith("-tiny") and adapters()[e.family].provides.denoiser == "latent"
)


@pytest.mark.parametrize("name", TINY)
def test_block_and_module_sites_are_counted_exactly(name: str) -> None:
    """Toy block and module methods on every tiny family: identity is exact, and the computed
    counts per site kind equal the method's decisions (compute on even steps)."""
    from diffcache.adapter import Target

    pipe = load_model(name)
    entry = builtin_models()[name]
    req = Request(prompt=None if entry.family == "dit" else "a cat", steps=4).merged(entry.defaults)
    plain = _run(pipe, req)
    target = Target.resolve(diffcache.registry.find_adapter(pipe), pipe)
    roles = ToyModulesConfig().roles
    for method, kind in (("toy_blocks", "block"), ("toy_modules", "module")):
        n_sites = len([s for s in target.sites(kind) if kind == "block" or s.role in roles])
        base = {"diffcache": 1, "model": entry.family, "method": method}
        diffcache.accelerate(pipe, {**base, "options": {"every": 1}})
        assert np.array_equal(_run(pipe, req), plain), f"{name}/{method}: identity differs"
        diffcache.remove(pipe)
        diffcache.accelerate(pipe, {**base, "options": {"every": 2}})
        out = _run(pipe, req)
        s = diffcache.stats(pipe)
        diffcache.remove(pipe)
        calls_per_step = s.model_calls // 4
        done, total = s.work[kind]
        assert total == n_sites * s.model_calls, f"{name}/{method}: {s.work}"
        assert done == n_sites * calls_per_step * 2, f"{name}/{method}: steps 0 and 2 compute"
        assert np.isfinite(out).all() and not np.array_equal(out, plain)
        assert clean(pipe.transformer, *pipe.transformer.modules())
    assert np.array_equal(_run(pipe, req), plain)


def test_a_schedule_trimmed_by_strength_counts_the_steps_run() -> None:
    """img2img pipelines call set_begin_index(t_start) after set_timesteps and run the rest:
    Stats and valid_for see the steps actually run, and the run ends after the last of them."""
    from diffcache.testing.toys import Img2ImgScheduler, ToyPipeline

    pipe = ToyPipeline(cfg="none")
    pipe.scheduler = Img2ImgScheduler()
    plan = {
        "diffcache": 1,
        "model": "toy",
        "method": "easycache",
        "options": {"threshold": 1e6, "warmup_steps": 1},
        "valid_for": {"num_inference_steps": 5},
    }
    diffcache.accelerate(pipe, plan)
    x = torch.ones(1, 2)
    pipe.scheduler.set_timesteps(8)
    pipe.scheduler.set_begin_index(3)  # strength 5/8
    for t in pipe.scheduler.timesteps[3:]:
        v = pipe.transformer(x, t, torch.tensor([1.0])).sample
        x = pipe.scheduler.step(v, t, x)[0]
    s = diffcache.stats(pipe)
    run = session_of(pipe).run
    # step 1 computes (k needs two computed steps); the last step actually run computes
    assert s.steps == 5 and s.per_step() == [1.0, 1.0, 0.0, 0.0, 1.0], s.per_step()
    assert not run.active, "the run ends after the last step actually run"
    diffcache.remove(pipe)
