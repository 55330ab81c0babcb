"""RunState: step and branch bookkeeping for every CFG style, including CFG switched off."""

from __future__ import annotations

import pytest
import torch

import diffcache
from tests.toys import ToyPipeline

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
    assert d["kernels"] == {"l1_change": "torch"}


def test_own_pipelines_drive_runstate_directly() -> None:
    """DLM / VAR pipelines call RunState themselves; KV methods record bytes in the stats."""
    from diffcache.runstate import RunState

    run = RunState("kv_method")
    run.begin_run(3)
    for _ in range(3):
        run.begin_call()
        run.record(computed=2, total=8)
        run.stats.kv_bytes_peak = max(run.stats.kv_bytes_peak or 0, 1024)
        run.end_step()
    d = run.stats.as_dict()
    assert d["compute_fraction"] == 0.25 and d["steps"] == 3 and d["kv_bytes_peak"] == 1024
