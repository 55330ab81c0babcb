"""Contract tests run over every registered method (DESIGN.md §8), on toy pipelines of every CFG
style: remove() is bit-exact, identity() equals the baseline, an aggressive setting skips and stays
finite, consecutive calls agree, double accelerate raises, a failed accelerate leaves no hooks."""

from __future__ import annotations

import pytest
import torch

import diffcache
from diffcache import hooks
from diffcache.errors import AlreadyAcceleratedError, DiffCacheError
from diffcache.registry import methods
from tests.toys import ToyPipeline

METHODS = sorted(methods())
CFGS = ["separate", "batched", "none"]


def _plan(method: str, config) -> dict:
    return {"diffcache": 1, "model": "toy", "method": method, "options": config.to_options()}


def _run(pipe: ToyPipeline) -> torch.Tensor:
    return pipe(torch.linspace(-1.0, 1.0, 12).reshape(1, 3, 4), steps=8)


def _clean(pipe: ToyPipeline) -> bool:
    return all(
        hooks.HOOKS_ATTR not in o.__dict__ and "forward" not in o.__dict__
        for o in (pipe.transformer, pipe.scheduler)
    )


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("method", METHODS)
def test_identity_equals_baseline_and_remove_is_exact(method: str, cfg: str) -> None:
    pipe = ToyPipeline(cfg)
    base = _run(pipe)
    diffcache.accelerate(pipe, _plan(method, methods()[method].identity()))
    assert torch.equal(_run(pipe), base), f"{method}/{cfg}: identity() differs from baseline"
    assert diffcache.stats(pipe).skipped == 0
    diffcache.remove(pipe)
    assert _clean(pipe), f"{method}/{cfg}: hooks left after remove()"
    assert torch.equal(_run(pipe), base)


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("method", METHODS)
def test_aggressive_skips_and_is_repeatable(method: str, cfg: str) -> None:
    pipe = ToyPipeline(cfg)
    base = _run(pipe)
    diffcache.accelerate(pipe, _plan(method, methods()[method].aggressive()))
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
    plan = _plan(method, methods()[method].identity())
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
    pipe = ToyPipeline()

    def boom(target, run):
        raise DiffCacheError("driver failed")

    monkeypatch.setattr("diffcache.api._attach_driver", boom)
    with pytest.raises(DiffCacheError, match="driver failed"):
        diffcache.accelerate(pipe, _plan(method, methods()[method].aggressive()))
    assert _clean(pipe) and not diffcache.is_accelerated(pipe)


def test_two_pipelines_of_one_class_stay_independent() -> None:
    a, b = ToyPipeline(), ToyPipeline()
    base = _run(b)
    diffcache.accelerate(a, _plan("easycache", methods()["easycache"].aggressive()))
    _run(a)
    assert torch.equal(_run(b), base)
    assert b.transformer.calls == 2 * 2 * 8, "the plain pipeline must compute every call"
    assert not diffcache.is_accelerated(b)
