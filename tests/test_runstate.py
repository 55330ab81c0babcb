"""RunState: step and branch bookkeeping for every CFG style, including CFG switched off."""

from __future__ import annotations

import pytest
import torch

import diffcache
from diffcache.testing.toys import ToyPipeline

IDENTITY = {"diffcache": 1, "model": "toy", "method": "easycache", "options": {"threshold": 0.0}}


@pytest.mark.parametrize(
    "cfg, guidance, branches",
    [
        ("separate", 3.0, (0, 1)),
        ("separate", 1.0, (0,)),
        ("batched", 3.0, (0,)),
        ("batched", 1.0, (0,)),
        ("none", 3.0, (0,)),
    ],
    ids=["separate", "separate-off", "batched", "batched-off", "none"],
)
def test_step_branch_sequence(cfg: str, guidance: float, branches: tuple[int, ...]) -> None:
    pipe = diffcache.accelerate(ToyPipeline(cfg), IDENTITY)
    for steps in (3, 5):  # a second call with another step count starts a fresh run
        pipe(torch.ones(1, 2), steps=steps, guidance_scale=guidance)
        s = diffcache.stats(pipe)
        assert [(st, b) for st, b, _ in s.calls] == [(i, b) for i in range(steps) for b in branches]
        assert s.steps == steps and s.model_calls == steps * len(branches)
        assert s.wall_s is not None and s.wall_s > 0


def test_stats_dict_fields() -> None:
    pipe = diffcache.accelerate(ToyPipeline(), IDENTITY)
    pipe(torch.ones(1, 2), steps=3)
    d = diffcache.stats(pipe).as_dict()
    for key in (
        "method",
        "steps",
        "model_calls",
        "computed",
        "skipped",
        "compute_fraction",
        "kv_bytes_peak",
        "wall_s",
    ):
        assert key in d
    assert (
        d["method"] == "easycache" and d["compute_fraction"] == 1.0 and d["kv_bytes_peak"] is None
    )
    assert d["kernels"] == {}, "threshold 0 can never reuse: EasyCache measures nothing"
    diffcache.remove(pipe)
    diffcache.accelerate(pipe, {**IDENTITY, "options": {"threshold": 1e-9, "warmup_steps": 1}})
    pipe(torch.ones(1, 2), steps=3)
    assert diffcache.stats(pipe).as_dict()["kernels"] == {"l1_change": "torch"}


def test_runstate_api_for_own_pipelines() -> None:
    """Our own pipelines' driver events: begin_run / begin_step / end_run; work per kind, KV
    bytes per step, state released at the end of the run, valid_for facts checked."""
    from diffcache.errors import PlanError
    from diffcache.runstate import RunState

    run = RunState("kv_method", kind="token_layer", valid_for={"gen_length": 8})
    run.begin_run(3, gen_length=8)
    for step in range(3):
        run.begin_step()
        run.begin_call()
        state = run.slot(("layer", 0), dict)
        state[step] = True
        run.record("token_layer", computed=2, total=8)
        run.record_kv(1024 * (step + 1))
        run.end_call()
    assert run.slot(("layer", 0), dict) == {0: True, 1: True, 2: True}
    run.end_run()
    assert run.slot(("layer", 0), dict) == {}, "state of a finished run must be released"
    d = run.stats.as_dict()
    assert d["compute_fraction"] == 0.25 and d["steps"] == 3 and d["kv_bytes_peak"] == 3072
    assert d["kv_bytes_per_step"] == [1024, 2048, 3072] and d["per_step_compute"] == [0.25] * 3
    run.begin_run(3, gen_length=16)
    with pytest.raises(PlanError, match=r"gen_length=8 but this call has gen_length=16"):
        run.begin_call()


def test_stats_copy_shares_nothing_with_the_run() -> None:
    """``diffcache.stats`` hands out a copy: changing any part of it, down to a trace event's
    values, leaves the run's own Stats as they were."""
    import copy

    from diffcache.runstate import RunState

    run = RunState("easycache", tracing=True)
    run.begin_call()
    run.record("step", 1.0)
    run.record_kv(64)
    run.trace("transformer", "computed", k=[0.5, 0.25])
    run.end_call()
    run.stats.kernels["l1_change"] = "torch"
    before = copy.deepcopy(run.stats.as_dict())
    given = run.stats.copy()
    given.work["step"][0] = 7.0
    given.kv_bytes_per_step.append(1)
    given.calls.append((9, 9, 0.0))
    given.kernels.clear()
    given.trace[0]["values"]["k"].append(1.0)
    given.trace.append({})
    assert run.stats.as_dict() == before
