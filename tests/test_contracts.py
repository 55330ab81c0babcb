"""Contract tests run over every registered method (DESIGN.md §8), on toy pipelines of every CFG
style: remove() is bit-exact, identity() equals the baseline, an aggressive setting skips and stays
finite, consecutive calls agree, double accelerate raises, a failed accelerate leaves no hooks."""

from __future__ import annotations

import pytest
import torch

import diffcache
from diffcache.errors import AlreadyAcceleratedError, DiffCacheError
from diffcache.registry import methods
from diffcache.testing.toys import ToyPipeline, clean, plan_for


def _runs_on_toy(name: str) -> bool:
    """Methods for other worlds (text and next-scale KV methods) have their own toy pipelines
    and their own contract tests (tests/test_seq_toys.py)."""
    from diffcache.adapter import Target
    from diffcache.testing.toys import TOY

    target = Target.resolve(TOY, ToyPipeline())
    target.valid_for = {"num_inference_steps": STEPS}
    return not methods()[name]().not_supported_reasons(target)


STEPS = 8
METHODS = sorted(m for m in methods() if _runs_on_toy(m))
CFGS = ["separate", "batched", "none"]


def _plan(pipe: ToyPipeline, method: str, which: str) -> dict:
    config = getattr(methods()[method], which)()
    return plan_for(pipe, config, num_inference_steps=STEPS)


def _run(pipe: ToyPipeline) -> torch.Tensor:
    return pipe(torch.linspace(-1.0, 1.0, 12).reshape(1, 3, 4), steps=STEPS)


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("method", METHODS)
def test_identity_equals_baseline_and_remove_is_exact(method: str, cfg: str) -> None:
    pipe = ToyPipeline(cfg)
    base = _run(pipe)
    diffcache.accelerate(pipe, _plan(pipe, method, "identity"))
    assert torch.equal(_run(pipe), base), f"{method}/{cfg}: identity() differs from baseline"
    assert diffcache.stats(pipe).skipped == 0
    diffcache.remove(pipe)
    assert clean(pipe.transformer, pipe.scheduler), f"{method}/{cfg}: hooks left after remove()"
    assert torch.equal(_run(pipe), base)


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("method", METHODS)
def test_aggressive_skips_and_is_repeatable(method: str, cfg: str) -> None:
    pipe = ToyPipeline(cfg)
    base = _run(pipe)
    diffcache.accelerate(pipe, _plan(pipe, method, "aggressive"))
    first = _run(pipe)
    s = diffcache.stats(pipe)
    assert s.skipped > 0 and s.compute_fraction < 1, f"{method}/{cfg}: nothing skipped: {s}"
    assert torch.isfinite(first).all()
    assert not torch.equal(first, base), f"{method}/{cfg}: skipping changed nothing"
    second = _run(pipe)
    assert torch.equal(first, second), f"{method}/{cfg}: state leaked between calls"
    assert diffcache.stats(pipe).as_dict() | {"wall_s": 0} == s.as_dict() | {"wall_s": 0}
    diffcache.remove(pipe)
    assert torch.equal(_run(pipe), base)


@pytest.mark.parametrize("method", METHODS)
def test_double_accelerate_raises(method: str) -> None:
    pipe = ToyPipeline()
    plan = _plan(pipe, method, "identity")
    diffcache.accelerate(pipe, plan)
    with pytest.raises(AlreadyAcceleratedError, match="remove"):
        diffcache.accelerate(pipe, plan)
    other = ToyPipeline()
    other.transformer = pipe.transformer  # a shared component
    with pytest.raises(AlreadyAcceleratedError, match="sharing"):
        diffcache.accelerate(other, plan)
    assert not diffcache.is_accelerated(other)


@pytest.mark.parametrize("method", METHODS)
def test_failed_accelerate_leaves_no_hooks(method: str, monkeypatch) -> None:
    """The driver attaches one hook, then fails: everything the method attached goes too."""
    from diffcache import drivers

    pipe = ToyPipeline()
    plan = _plan(pipe, method, "aggressive")

    class Broken(drivers.SchedulerDriver):
        def attach(self, session) -> None:
            session.attach(session.target.scheduler, "step", "diffcache.x", lambda c, *a: c(*a))
            raise DiffCacheError("driver failed")

    monkeypatch.setitem(drivers.DRIVERS, "scheduler", Broken)
    monkeypatch.setattr("diffcache.api.DRIVERS", drivers.DRIVERS)
    with pytest.raises(DiffCacheError, match="driver failed"):
        diffcache.accelerate(pipe, plan)
    assert clean(pipe.transformer, pipe.scheduler, *pipe.transformer.modules())
    assert not diffcache.is_accelerated(pipe)


def test_two_pipelines_of_one_class_stay_independent() -> None:
    a, b = ToyPipeline(), ToyPipeline()
    base = _run(b)
    diffcache.accelerate(a, _plan(a, "easycache", "aggressive"))
    _run(a)
    assert torch.equal(_run(b), base)
    assert b.transformer.calls == 2 * 2 * STEPS, "the plain pipeline must compute every call"
    assert not diffcache.is_accelerated(b)
